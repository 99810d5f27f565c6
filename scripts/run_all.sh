#!/usr/bin/env bash
# The whole system on this machine: trunk server (:50051), split client UI (:7860), full-model UI (:7861).
# Ctrl-C stops all three. Logs: logs/gpt2_server.log, logs/gpt2_client.log, logs/gpt2_full.log.
# GPT2_REPLICAS=2 starts two trunk replicas (:50051, :50052; logs/gpt2_server-1.log, ...) and the client spreads
# its sessions over them (GPT2_TRUNK_SERVER=localhost:50051,localhost:50052).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure_env.sh"
export GPT2_FALLBACK_RANDOM="${GPT2_FALLBACK_RANDOM:-1}"
port="${GPT2_SERVER_PORT:-50051}"
replicas="${GPT2_REPLICAS:-1}"
[[ "$replicas" =~ ^[1-9][0-9]*$ ]] || { echo "[run_all] error: GPT2_REPLICAS must be a whole number >= 1" >&2; exit 2; }
ports=(); for i in $(seq 0 $((replicas - 1))); do ports+=($((port + i))); done
addresses=$(printf 'localhost:%s,' "${ports[@]}"); addresses="${addresses%,}"
export GPT2_TRUNK_SERVER="${GPT2_TRUNK_SERVER:-$addresses}"
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
python -m splitcore.prepare --prefix "[run_all]"
servers=()
for i in "${!ports[@]}"; do
  if (( replicas == 1 )); then python -m server --port "${ports[$i]}" & else
    python -m server --port "${ports[$i]}" --log-file "logs/gpt2_server-$((i + 1)).log" & fi
  pids+=($!); servers+=($!)
done
for _ in $(seq 1 120); do
  python deploy/healthcheck.py grpc "${ports[@]}" 2>/dev/null && break
  for pid in "${servers[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "[run_all] a trunk server failed to start: see logs/gpt2_server*.log" >&2; exit 1; }
  done
  sleep 1
done
(( replicas == 1 )) || echo "[run_all] $replicas trunk replicas: $GPT2_TRUNK_SERVER" >&2
python -m client serve & pids+=($!)
python -m baseline serve & pids+=($!)
echo "[run_all] split client: http://localhost:${GPT2_CLIENT_PORT:-7860}   full model: http://localhost:${GPT2_FULL_PORT:-7861}   (Ctrl-C stops)" >&2
wait -n "${pids[@]}" || true
echo "[run_all] a process exited; stopping the others" >&2
