#!/usr/bin/env bash
# The whole system on this machine: trunk server (:50051), split client UI (:7860), full-model UI (:7861).
# Ctrl-C stops all three. Logs: logs/gpt2_server.log, logs/gpt2_client.log, logs/gpt2_full.log.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure_env.sh"
export GPT2_FALLBACK_RANDOM="${GPT2_FALLBACK_RANDOM:-1}"
port="${GPT2_SERVER_PORT:-50051}"
export GPT2_TRUNK_SERVER="${GPT2_TRUNK_SERVER:-localhost:$port}"
mkdir -p logs
pids=()
stop() {
  trap - INT TERM EXIT
  echo "[run_all] stopping..." >&2
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "[run_all] stopped" >&2
}
trap stop INT TERM EXIT

# The model is resolved (downloaded or built) once, before three processes race for it.
python -c "
import logging, sys; logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')
from splitcore.cli import env; from splitcore.models import resolve_with_fallback
m = resolve_with_fallback(env('GPT2_MODEL', 'gpt2'), env('GPT2_MODELS_DIR', 'models'), True)
print(f'[run_all] model {m.spec} at {m.path}' + (' (RANDOM WEIGHTS)' if m.is_random else ''), file=sys.stderr)
"
python -m server --port "$port" & pids+=($!)
for _ in $(seq 1 120); do
  python - "$GPT2_TRUNK_SERVER" <<'PY' && break
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
try:
    r = health_pb2_grpc.HealthStub(grpc.insecure_channel(sys.argv[1])).Check(health_pb2.HealthCheckRequest(), timeout=1)
    sys.exit(0 if r.status == health_pb2.HealthCheckResponse.SERVING else 1)
except grpc.RpcError:
    sys.exit(1)
PY
  kill -0 "${pids[0]}" 2>/dev/null || { echo "[run_all] the trunk server failed to start: see logs/gpt2_server.log" >&2; exit 1; }
  sleep 1
done
python -m client serve & pids+=($!)
python -m baseline serve & pids+=($!)
echo "[run_all] split client: http://localhost:${GPT2_CLIENT_PORT:-7860}   full model: http://localhost:${GPT2_FULL_PORT:-7861}   (Ctrl-C stops)" >&2
wait -n "${pids[@]}" || true
echo "[run_all] a process exited; stopping the others" >&2
