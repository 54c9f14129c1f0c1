# Sourced by train.sh and test.sh: each protocol step is a `job COMMAND ...`.
# Without GPUS, a job runs at once and a failure stops the script (set -e), as a plain loop would.
# With GPUS=0,1,2,3, jobs are queued and `run_queued` runs the queue with run_jobs.py: one job per
# GPU at a time (CUDA_VISIBLE_DEVICES=<id>), a log per job in LOG_DIR, every job run even when
# one fails; the failed ones are listed at the end with their logs, and the script then stops
# (before any summary that would read their results).
JOBS_FILE=""
trap 'rm -f "$JOBS_FILE"' EXIT

job() {
  if [[ -z ${GPUS:-} ]]; then
    "$@"
    return
  fi
  if [[ $(basename "$1") == torchrun || " $* " == *" torch.distributed.run "* ]]; then
    echo "error: GPUS=$GPUS gives each job one GPU, so LAUNCH=\"$1 ...\" cannot spread a job over several; unset one of them" >&2
    exit 2
  fi
  [[ -n $JOBS_FILE ]] || JOBS_FILE=$(mktemp)
  printf '%q ' "$@" >> "$JOBS_FILE"
  echo >> "$JOBS_FILE"
}

run_queued() {
  [[ -n ${GPUS:-} && -n $JOBS_FILE && -s $JOBS_FILE ]] || return 0
  local status=0
  python run_jobs.py --gpus "$GPUS" --jobs "$JOBS_FILE" --log_dir "$LOG_DIR" || status=$?
  : > "$JOBS_FILE"
  return "$status"
}
