#!/bin/bash
# The sbatch script of a sweep: scripts/sweep.py fills in the @NAME@ fields (the lines holding
# @HEADER@, @RUNS@ and @SETUP@ are replaced whole) and writes one per sweep. As it stands the file
# is valid bash, so shellcheck checks it in the tests.
# @HEADER@

set -u
SAVE_DIR=@SAVE_DIR@
TRAIN=@TRAIN@
PYTHON=@PYTHON@
RUN_STATE=@RUN_STATE@  # common/runfolder.py: prints finished, diverged, checkpoint or new
MAX_TIME=@MAX_TIME@  # seconds: --time (@TIME@) minus stop_margin (@STOP_MARGIN@ s)
MAX_RESTARTS=@MAX_RESTARTS@

# shellcheck disable=SC2016  # a run's flags are quoted literally on purpose ('$' included)
case "${SLURM_ARRAY_TASK_ID:?submit this file with sbatch}" in
  @RUNS@) RUN_NAME=name; SEED=0; ARGS=(--flag value) ;;
  *) echo "sweep: no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;
esac

# @SETUP@

TASK="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
RUN_DIR="$SAVE_DIR/$RUN_NAME"
LOG="$SAVE_DIR/logs/$RUN_NAME.log"
RESTARTS="${SLURM_RESTART_COUNT:-0}"
mkdir -p "$SAVE_DIR/logs"
echo "sweep: task $TASK (restart $RESTARTS) runs $RUN_DIR; log: $LOG"
exec >>"$LOG" 2>&1
echo "=== $(date '+%F %T') task $TASK on $(hostname), restart $RESTARTS"
STATE=$("$PYTHON" "$RUN_STATE" state "$RUN_DIR")
case "$STATE" in
  finished|diverged) echo "sweep: $RUN_DIR has $STATE; nothing to do"; exit 0 ;;
  # no checkpoint: an earlier attempt (if any) died before its first one; its lines are redone
  checkpoint) echo "sweep: resuming from $RUN_DIR/checkpoint.pt"; START=--resume ;;
  *) START=--start-over ;;
esac
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}" PYTHONUNBUFFERED=1

# USR1 (SLURM's warning before the time limit, or `scancel --batch --signal=USR1`) reaches only this
# shell: pass it on to train.py, which checkpoints and exits. TERM (`scancel --full --signal=TERM`,
# scancel, preemption, the time limit) reaches train.py directly; only note it.
STOP=""
CHILD=""
# shellcheck disable=SC2317  # trap handlers: called by `trap`
on_usr1() { STOP=USR1; if [ -n "$CHILD" ]; then kill -USR1 "$CHILD" 2>/dev/null; fi; }
# shellcheck disable=SC2317
on_term() { STOP=TERM; }
trap on_usr1 USR1
trap on_term TERM

CMD=("$PYTHON" "$TRAIN" "${ARGS[@]}" --seed "$SEED" --run-name "$RUN_NAME" --save-directory "$SAVE_DIR"
     --max-time "$MAX_TIME" "$START")
echo "sweep: ${CMD[*]}"
"${CMD[@]}" &
CHILD=$!
[ "$STOP" = USR1 ] && kill -USR1 "$CHILD" 2>/dev/null
while kill -0 "$CHILD" 2>/dev/null; do wait "$CHILD"; done
wait "$CHILD"
RC=$?
echo "sweep: train.py exited with $RC${STOP:+ after SIG$STOP}"

STATE=$("$PYTHON" "$RUN_STATE" state "$RUN_DIR")
if [ "$STATE" = finished ] || [ "$STATE" = diverged ]; then
    echo "sweep: $RUN_NAME $STATE"
    exit 0
fi
if [ "$STOP" = TERM ]; then
    # `scancel --signal=TERM` leaves the job RUNNING; scancel, the time limit and preemption end it
    # (COMPLETING): do not undo those (SLURM requeues preempted jobs itself when told to)
    JOB_STATE=$(scontrol show job "$TASK" -o 2>/dev/null | grep -o 'JobState=[A-Z_]*')
    if [ "$JOB_STATE" != JobState=RUNNING ]; then
        echo "sweep: SIGTERM as the job ends ($JOB_STATE): not requeued; the next submit resumes from the checkpoint"
        exit "$RC"
    fi
fi
if [ -n "$STOP" ] || [ "$RC" -eq 0 ]; then
    if [ "$RESTARTS" -ge "$MAX_RESTARTS" ]; then
        echo "sweep: restarted $RESTARTS times already (slurm.max_restarts); giving up"
        exit 1
    fi
    echo "sweep: stopped before the end; requeueing $TASK to resume from the checkpoint"
    scontrol requeue "$TASK" || echo "sweep: scontrol requeue failed"
    exit 0
fi
echo "sweep: train.py failed (exit $RC); not requeued"
exit "$RC"
