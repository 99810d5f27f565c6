#!/usr/bin/env bash
# A federation on this machine, against a trunk server that runs already (bash scripts/run_server.sh): the fed
# server (Flower's SuperLink, :9092) and three data owners (SuperNodes), each with its own text. It runs the rounds,
# saves the averaged adapter in adapters/federated (or --out), and stops everything. Flags go to
# `python -m client federate serve` (--rounds, --local-steps, --model ...; see --help).
# The owners' text: GPT2_OWNERS="dirA dirB dirC" (any number), or by default three parts of the New Testament
# from Debian's bible-kjv (the Gospels; Acts with the Epistles; Revelation) in data/federated/.
# Logs: logs/gpt2_federate.log (the fed server's progress), .federate/NAME/supernode.log (each owner's).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure_env.sh"
export GPT2_FALLBACK_RANDOM="${GPT2_FALLBACK_RANDOM:-1}"
fed_port="${GPT2_FED_PORT:-9092}"
trunk="${GPT2_TRUNK_SERVER:-localhost:50051}"
if [[ -n "${GPT2_OWNERS:-}" ]]; then
  read -r -a owners <<<"$GPT2_OWNERS"
else
  command -v bible >/dev/null || { echo "[run_federated] error: give GPT2_OWNERS=\"dirA dirB ...\" or apt-get install bible-kjv" >&2; exit 2; }
  owners=()
  for part in "gospels Matt1:1-John21:25" "epistles Acts1:1-Jude1:25" "revelation Rev1:1-Rev22:21"; do
    read -r name passages <<<"$part"
    mkdir -p "data/federated/$name"
    [[ -s "data/federated/$name/$name.txt" ]] || python -c "import sys; from splitcore.presets import kjv_text; sys.stdout.write(kjv_text(sys.argv[1]))" "$passages" >"data/federated/$name/$name.txt"
    owners+=("data/federated/$name")
  done
fi
mkdir -p logs
pids=()
stop() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "[run_federated] stopped" >&2
}
trap stop INT TERM EXIT

python -m splitcore.prepare --prefix "[run_federated]"
python -m client federate serve --port "$fed_port" --min-owners "${#owners[@]}" "$@" & serve=$!
pids+=("$serve")
for dir in "${owners[@]}"; do
  python -m client federate join --data "$dir" --federation "127.0.0.1:$fed_port" --server "$trunk" \
    >/dev/null & pids+=($!)
done
echo "[run_federated] fed server on :$fed_port, ${#owners[@]} owners (${owners[*]}), trunk at $trunk (Ctrl-C stops)" >&2
status=0
wait "$serve" || status=$?
(( status == 0 )) && echo "[run_federated] done" >&2
exit "$status"
