"""Side-by-side timing for the benchmark scripts in scripts/.

Every benchmark times its variants in one process, in interleaved rounds, so that slow drifts of
a shared machine (clock changes, other jobs) hit every variant alike; device work is synchronised
around each timed call, so the times include it.

`stream_pass` is the floor those timings are read against on CPU: a C pass that only moves a
given number of float32 streams through memory (read all, write some), over tensors of a
parameter set's shapes, chunked and threaded as the fused step's own C loop (kernels.py). A step
that must move those streams cannot be faster than it on the same machine.

`write_results` records what a benchmark measured (date, command line, machine, software, the
table and every raw measurement) as `<stem>.md` + `<stem>.json`, e.g. under results/, so that
every number a README quotes can be traced to the run that produced it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    wall: list[float] = field(default_factory=list)  # seconds per timed call
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per timed call


def interleaved(
    variants: dict[str, Callable[[], object]],
    rounds: int,
    device: torch.device,
    *,
    warmup_rounds: int = 0,
    before: Callable[[str], object] | None = None,
    on_round: Callable[[int, dict[str, Timings]], object] | None = None,
) -> dict[str, Timings]:
    """Time one call of every variant per round, round-robin, in reverse order every other round
    (A B, B A, ...). The first `warmup_rounds` rounds are not recorded; `before(name)` runs untimed
    before each call; `on_round(r, timings)` runs after each recorded round (progress lines)."""
    timings = {name: Timings() for name in variants}
    names = list(variants)
    for r in range(warmup_rounds + rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            if before is not None:
                before(name)
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            variants[name]()
            sync(device)
            if r >= warmup_rounds:
                timings[name].wall.append(time.perf_counter() - wall)
                timings[name].cpu.append(time.process_time() - cpu)
        if r >= warmup_rounds and on_round is not None:
            on_round(r - warmup_rounds, timings)
    return timings


def stream_pass(shapes: Sequence[torch.Size], reads: int, writes: int) -> Callable[[], None]:
    """A call that reads `reads` float32 tensors of each shape in `shapes` and writes the first
    `writes` of them back (each stream once, elementwise, a multiply-add per value): the memory
    traffic of an optimizer step with that many state streams and none of its arithmetic. CPU
    only (the fused step's C compiler)."""
    import ctypes

    from common.optimizers import kernels

    if not 0 < writes <= reads:
        raise ValueError(f"stream_pass: need 0 < writes <= reads, got {reads} reads, {writes} writes")
    loads = "\n".join(f"const float x{k} = s{k}[i];" for k in range(reads))
    total = " + ".join(f"x{k}" for k in range(reads))
    stores = "\n".join(f"s{k}[i] = 0.5f * x{k} + 1e-3f * sum;" for k in range(writes))
    ptrs = "\n".join(f"float* restrict s{k} = ptrs[{reads} * t + {k}];" for k in range(reads))
    source = f"""
#include <stdint.h>
void stream_pass(int64_t nchunks, const int64_t* restrict chunks, float* const* restrict ptrs, int nthreads)
{{
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < nchunks; ++c) {{
        const int64_t t = chunks[3 * c], lo = chunks[3 * c + 1], hi = chunks[3 * c + 2];
        {ptrs}
        #pragma omp simd
        for (int64_t i = lo; i < hi; ++i) {{
            {loads}
            const float sum = {total};
            {stores}
        }}
    }}
}}
"""
    fn = kernels.load_kernel(source, "stream_pass", pointers=2)
    gen = torch.Generator().manual_seed(0)
    tensors = [[torch.randn(s, generator=gen) for _ in range(reads)] for s in shapes]
    chunks = [x for t, s in enumerate(shapes) for lo, hi in kernels.pieces(s.numel()) for x in (t, lo, hi)]
    chunk_array = (ctypes.c_int64 * max(1, len(chunks)))(*chunks)
    ptr_array = (ctypes.c_void_p * (reads * len(shapes)))(*[x.data_ptr() for ts in tensors for x in ts])

    def run():
        fn(len(chunks) // 3, ctypes.addressof(chunk_array), ctypes.addressof(ptr_array), torch.get_num_threads())

    run.tensors = tensors  # kept alive with the call
    return run


# --------------------------------------------------------------------------------------
# Results files: every number a README quotes comes from one of these
# --------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """HEAD of the checkout the script runs from, with "+changes" when the work tree differs."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + (" +changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device | str = "cpu", argv: Sequence[str] | None = None) -> dict:
    """Where and how a measurement was taken: date (UTC), command line, machine, software."""
    device = torch.device(device)
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):  # a path inside the repository is shown relative to it
        script = script.resolve().relative_to(REPO)
    argv = list(sys.argv[1:] if argv is None else argv)
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python3", str(script), *argv]),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "git": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table; numbers are written as given (format them before)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(stem: str | Path, *, title: str, table: str, raw, device: torch.device | str = "cpu",
                  argv: Sequence[str] | None = None, notes: Sequence[str] = (), env: dict | None = None
                  ) -> tuple[Path, Path]:
    """Record a benchmark's output: `<stem>.md` (title, date, command, machine, the table, notes) and
    `<stem>.json` (the same header and `raw`, every measurement behind the table). Returns both paths.

    `argv` is the script's arguments (default sys.argv[1:]); `raw` must be JSON-serialisable
    (numbers, text, lists, dicts; other objects are written with str()). `env`: `environment()` taken
    when the measurement started (its date and git commit); default: taken now."""
    stem = Path(stem)
    if stem.suffix in (".md", ".json"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    env = env or environment(device, argv)
    machine = f"{env['host']}: {env['cpu']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads"
    if "gpu" in env:
        machine += f"; {env['gpu']} ({env['gpu_memory_gb']} GB), CUDA {env['cuda']}"
    header = [
        f"- date: {env['date']}",
        f"- command: `{env['command']}`",
        f"- machine: {machine}",
        f"- software: Python {env['python']}, torch {env['torch']}, {env['os']}"
        + (f", git {env['git']}" if env["git"] else ""),
        f"- device: {env['device']}",
    ]
    text = "\n".join([f"# {title}", "", *header, "", table.rstrip(), ""]
                     + ([*(n.rstrip() for n in notes), ""] if notes else [])
                     + [f"Raw measurements: `{stem.name}.json`.", ""])
    md, js = stem.with_suffix(".md"), stem.with_suffix(".json")
    _atomic_write(md, text)
    _atomic_write(js, json.dumps({"title": title, **env, "table": table, "notes": list(notes), "raw": raw},
                                 indent=1, default=str) + "\n")
    return md, js


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
