#!/usr/bin/env bash
# The batching measurements a GPU host answers, in one go (one device call, about 6 minutes on an H100):
#   1. the engine loop's cost a decode step, without and through fronts (bench_loop, no network, no model);
#   2. the whole server with 0, 2, 4 and 8 gRPC fronts at pipeline depths 1 and 2, for 1, 16 and 64 sessions;
#   3. the CUDA tests.
# On a GPU host with the project's requirements (and CUDA torch) installed, from the project's root:
#   bash scripts/gpu_batching.sh          # JSON into $OUT if set, else bench_results/
# Read "x one" and "p50 x one" (targets: 16 sessions >= 10x, 64 >= 25x, p50 at 16 <= 1.5x), "loop us/step" and
# "fronts CPU"; the README's batching section says what each column is.
set -uo pipefail
out="${OUT:-bench_results}"
mkdir -p "$out"
py=$(command -v python3 || command -v python)
nproc
"$py" scripts/bench_loop.py --path servicer,relay --sessions 16,64 --json "$out/loop_gpu_host.json"
"$py" scripts/bench_server.py --device cuda --dtype float16 --sessions 1,16,64 --steps 64 --client-procs 8 \
  --fronts 0,2,4,8 --pipeline-depth 1,2 --json "$out/fronts_gpu.json"  # the JSON is written as it goes
timeout 200 "$py" -m pytest -q -x tests/test_gpu.py 2>&1 | tail -4
