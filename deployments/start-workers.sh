#!/usr/bin/env bash
# Work pools, the GPU concurrency limit and process workers for lynx on a Prefect server.
#
#   export PREFECT_API_URL=http://prefect-host:4200/api
#   deployments/start-workers.sh setup          # pools lynx-cpu + lynx-gpu, limit lynx-gpu, automations
#                                               # (deployments/automations.py); idempotent
#   deployments/start-workers.sh cpu            # one CPU worker on this machine
#   deployments/start-workers.sh gpu            # one GPU worker per GPU of this machine
#   deployments/start-workers.sh all            # setup, then CPU and GPU workers
#
# Workers pass their environment on to the flow runs they start: export the LYNX_* settings
# (LYNX_DATABASE_URL, LYNX_STORE_BACKEND=s3, LYNX_S3_*, LYNX_MODELS_DIR, LYNX_BASE_MODEL_PATH, ...)
# before starting them. Stop workers with Ctrl-C (SIGINT); they ignore a single SIGTERM.
#
# Environment:
#   LYNX_GPU_POOL        GPU pool and concurrency-limit name (default lynx-gpu; keep LYNX_GPU_POOL
#                        and the flows' setting of the same name equal)
#   LYNX_CPU_POOL        CPU pool name (default lynx-cpu)
#   LYNX_GPU_WORKERS     GPU workers to start here (default: GPUs nvidia-smi lists, else 1)
#   LYNX_GPU_SLOTS       slots of the global limit = GPU batches at once across ALL machines
#                        (default: LYNX_GPU_WORKERS; raise it when you add GPU machines)
#   LYNX_CPU_WORKER_LIMIT  flow runs one CPU worker runs at once (default 4)
#   LYNX_HEARTBEAT_WINDOW_SECONDS  a run silent this long is marked Crashed (default 90)
#   LYNX_NOTIFY_BLOCK    notification block (type/name) for Failed and Crashed runs (default: none)
#   PYTHON               the Python of the lynx environment (default: the one next to prefect)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
gpu_pool=${LYNX_GPU_POOL:-lynx-gpu}
cpu_pool=${LYNX_CPU_POOL:-lynx-cpu}
prefect=${PREFECT:-prefect}

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

cpu_worker() {
  "$prefect" worker start --pool "$cpu_pool" --name "cpu-$(hostname)" \
    --limit "${LYNX_CPU_WORKER_LIMIT:-4}" --install-policy never &
}

gpu_workers() {
  # One worker per GPU, each seeing only its GPU; --limit 1: one model per GPU at a time.
  local n i
  n=$(gpu_count)
  for ((i = 0; i < n; i++)); do
    CUDA_VISIBLE_DEVICES=$i "$prefect" worker start --pool "$gpu_pool" --name "gpu-$(hostname)-$i" \
      --limit 1 --install-policy never &
  done
}

stop_all() {
  # SIGINT: a worker stops in ~3 s (it ignores a single SIGTERM).
  kill -INT $(jobs -p) 2>/dev/null || true
  wait
}

case "${1:-all}" in
  setup) setup ;;
  cpu) trap stop_all INT TERM; cpu_worker; wait ;;
  gpu) trap stop_all INT TERM; gpu_workers; wait ;;
  all) setup; trap stop_all INT TERM; cpu_worker; gpu_workers; wait ;;
  *) echo "usage: $0 [setup|cpu|gpu|all]" >&2; exit 2 ;;
esac
