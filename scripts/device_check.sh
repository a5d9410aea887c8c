#!/usr/bin/env bash
# The GPU checks, as one prepared call on a machine with a CUDA device (about 10 minutes at most):
#   bash scripts/device_check.sh [OUT_DIR]
# 1. the CUDA tests (tests/test_cuda.py: every step implementation against the float64 reference,
#    no host-device synchronisation inside step() (MetaOptimize and MetaOptimize.around), bit-exact
#    resume; the CUDA data test);
#    the impl="auto" fallback on CUDA (tests/test_impl_fallback.py: torch.compile failing, and running);
# 2. the optimizer step on the ResNet-18 and 15M-transformer parameter sets against torch's fused AdamW
#    (with weight-wise blocks, and the first step's compile time), and the wrapped optimizer
#    (MetaOptimize.around(torch AdamW fused)) against fused AdamW;
# 3. CIFAR-10 images/s and the projected epoch time, and TinyStories tokens/s, against fused AdamW.
# Everything it prints goes to OUT_DIR/device_check.txt too (OUT_DIR: $OUT where the device tool
# sets it, else results/). Each part has its own time limit, so one slow part cannot eat the rest.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out_dir=${1:-${OUT:-results}}
mkdir -p "$out_dir"
log="$out_dir/device_check.txt"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
status=0

part() {  # part SECONDS TITLE COMMAND...
    local limit=$1 title=$2
    shift 2
    echo "=== $title ($(date -u +%H:%M:%S), limit ${limit}s): $*"
    timeout "$limit" "$@" || { echo "=== $title: exit $?"; status=1; }
}

{
    echo "device_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    part 150 "CUDA tests" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_around.py tests/test_data.py -k "cuda"
    part 45 "impl=auto fallback on CUDA" python3 -m pytest -q -p no:cacheprovider tests/test_impl_fallback.py -k "cuda"
    part 90 "optimizer step, ResNet-18 and 15M transformer" \
        python3 scripts/bench_optimizer.py --device cuda --quick --rounds 15 --skip-loop --skip-first-step
    part 90 "first step's compile time (torch.compile), ResNet-18 and 15M transformer" \
        python3 scripts/bench_optimizer.py --device cuda --quick --only-first-step
    part 45 "wrapped optimizer: MetaOptimize.around(torch AdamW fused) against fused AdamW" \
        python3 scripts/bench_optimizer.py --device cuda --around --skip-steps --skip-loop --rounds 15
    part 90 "CIFAR-10 training throughput" \
        python3 scripts/bench_train.py --device cuda --steps 100 --repeats 5 --step-repeats 20
    part 90 "TinyStories training throughput" \
        python3 scripts/bench_tinystories.py --device cuda --dtype bfloat16 --steps 20 --reps 5
    echo "device_check done, status $status"
} 2>&1 | tee "$log"
exit "$status"
