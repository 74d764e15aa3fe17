#!/usr/bin/env bash
# Work pools, the GPU concurrency limit and process workers for lynx on a Prefect server.
#
#   export PREFECT_API_URL=http://prefect-host:4200/api
#   deployments/start-workers.sh setup          # pools lynx-cpu + lynx-gpu, limit lynx-gpu, automations
#                                               # (deployments/automations.py); idempotent
#   deployments/start-workers.sh cpu            # one CPU worker on this machine
#   deployments/start-workers.sh gpu            # one GPU worker per GPU of this machine
#   deployments/start-workers.sh all            # setup, then CPU and GPU workers
#   deployments/start-workers.sh stop           # graceful stop of the workers this script started
#
# Workers pass their environment on to the flow runs they start: export the LYNX_* settings
# (LYNX_DATABASE_URL, LYNX_STORE_BACKEND=s3, LYNX_S3_*, LYNX_MODELS_DIR, LYNX_BASE_MODEL_PATH, ...)
# before starting them (`lynx models demo --dir DIR` prints those of the tiny demo model).
#
# Stopping: Ctrl-C, SIGTERM to this script, or `start-workers.sh stop` from another shell (SIGTERM
# to every worker pid recorded in LYNX_WORKER_PIDS). A worker stops polling and exits within a few
# seconds; flow runs it already started keep running to their end. Prefect's worker turns its first
# SIGTERM into a SIGINT to itself, and a second SIGINT/SIGTERM into SIGKILL. Bash starts background
# commands with SIGINT and SIGQUIT ignored, which made that SIGINT a no-op (and the next signal a
# SIGKILL); `set -m` was not enough (still stuck after 20 s here), so `launch` resets both signals
# to their defaults in a tiny exec shim: the worker then stops within a second.
#
# Environment:
#   LYNX_GPU_POOL        GPU pool and concurrency-limit name (default lynx-gpu; keep LYNX_GPU_POOL
#                        and the flows' setting of the same name equal)
#   LYNX_CPU_POOL        CPU pool name (default lynx-cpu)
#   LYNX_GPU_WORKERS     GPU workers to start here (default: GPUs nvidia-smi lists, else 1)
#   LYNX_GPU_SLOTS       slots of the global limit = GPU batches at once across ALL machines
#                        (default: LYNX_GPU_WORKERS; raise it when you add GPU machines)
#   LYNX_CPU_WORKER_LIMIT  flow runs one CPU worker runs at once (default 4)
#   LYNX_WORKER_PIDS     file of the pids of the workers started here (default ~/.lynx/workers.pids)
#   LYNX_WORKER_STOP_SECONDS  how long `stop` waits before SIGKILL (default 20)
#   LYNX_HEARTBEAT_WINDOW_SECONDS  a run silent this long is marked Crashed (default 90)
#   LYNX_NOTIFY_BLOCK    notification block (type/name) for Failed and Crashed runs (default: none)
#   PYTHON               the Python of the lynx environment (default: the one next to prefect)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
gpu_pool=${LYNX_GPU_POOL:-lynx-gpu}
cpu_pool=${LYNX_CPU_POOL:-lynx-cpu}
prefect=${PREFECT:-prefect}
python=${PYTHON:-python3}
pid_file=${LYNX_WORKER_PIDS:-$HOME/.lynx/workers.pids}

gpu_count() {
  if [[ -n "${LYNX_GPU_WORKERS:-}" ]]; then
    echo "$LYNX_GPU_WORKERS"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --list-gpus | wc -l
  else
    echo 1
  fi
}

setup() {
  local slots=${LYNX_GPU_SLOTS:-$(gpu_count)}
  "$prefect" --no-prompt work-pool create "$cpu_pool" --type process \
    --base-job-template "$here/process-cpu.json" --overwrite
  "$prefect" --no-prompt work-pool create "$gpu_pool" --type process \
    --base-job-template "$here/process-gpu.json" --overwrite
  # Bounds the GPU batches running at once (campaigns hold one slot per batch).
  if "$prefect" gcl inspect "$gpu_pool" >/dev/null 2>&1; then
    "$prefect" gcl update "$gpu_pool" --limit "$slots"
  else
    "$prefect" gcl create "$gpu_pool" --limit "$slots"
  fi
  # Runs without heartbeats marked Crashed; failures notified if LYNX_NOTIFY_BLOCK names a block.
  (cd "$here/.." && "$(python_bin)" -m deployments.automations)
}

python_bin() {
  # $PYTHON, else the python next to the prefect command (the lynx environment), else python
  local found
  found=$(command -v "$prefect" || true)
  if [[ -n "${PYTHON:-}" ]]; then
    echo "$PYTHON"
  elif [[ -n "$found" && -x "$(dirname "$found")/python" ]]; then
    echo "$(dirname "$found")/python"
  else
    echo python
  fi
}

launch() {
  # Run "$@" in the background with SIGINT/SIGQUIT back to their defaults (see the header).
  "$python" -c 'import os, signal, sys
for s in (signal.SIGINT, signal.SIGQUIT):
    signal.signal(s, signal.SIG_DFL)
os.execvp(sys.argv[1], sys.argv[1:])' "$@" &
}

record() {
  mkdir -p "$(dirname "$pid_file")"
  echo "$1" >>"$pid_file"
}

cpu_worker() {
  launch "$prefect" worker start --pool "$cpu_pool" --name "cpu-$(hostname)" \
    --limit "${LYNX_CPU_WORKER_LIMIT:-4}" --install-policy never
  record $!
}

gpu_workers() {
  # One worker per GPU, each seeing only its GPU; --limit 1: one model per GPU at a time.
  local n i
  n=$(gpu_count)
  for ((i = 0; i < n; i++)); do
    CUDA_VISIBLE_DEVICES=$i launch "$prefect" worker start --pool "$gpu_pool" --name "gpu-$(hostname)-$i" \
      --limit 1 --install-policy never
    record $!
  done
}

stop_all() {
  # The workers started by this very script: they stop polling and exit in a few seconds.
  kill -TERM $(jobs -p) 2>/dev/null || true
  wait
}

alive() {
  # A recorded pid that is still a Prefect worker (not a process that reused the pid).
  [[ -r /proc/$1/cmdline ]] && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q "worker start"
}

stop_recorded() {
  # SIGTERM every recorded worker, wait, then SIGKILL what is left; a no-op when none is running.
  local pid waited=0 bound=${LYNX_WORKER_STOP_SECONDS:-20} left
  [[ -f "$pid_file" ]] || { echo "no workers recorded in $pid_file"; return 0; }
  while read -r pid; do
    [[ -n "$pid" ]] && alive "$pid" && kill -TERM "$pid" 2>/dev/null && echo "SIGTERM -> worker $pid"
  done <"$pid_file"
  while :; do
    left=()
    while read -r pid; do [[ -n "$pid" ]] && alive "$pid" && left+=("$pid"); done <"$pid_file"
    ((${#left[@]} == 0)) && break
    if ((waited >= bound * 10)); then
      echo "SIGKILL -> workers ${left[*]} (still running after ${bound} s)"
      kill -KILL "${left[@]}" 2>/dev/null || true
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  rm -f "$pid_file"
}

case "${1:-all}" in
  setup) setup ;;
  cpu) trap stop_all INT TERM; cpu_worker; wait ;;
  gpu) trap stop_all INT TERM; gpu_workers; wait ;;
  all) setup; trap stop_all INT TERM; cpu_worker; gpu_workers; wait ;;
  stop) stop_recorded ;;
  *) echo "usage: $0 [setup|cpu|gpu|all|stop]" >&2; exit 2 ;;
esac
