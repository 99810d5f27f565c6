"""The trunk server with its decode batches on a simulated device: what the server does on a GPU, on any machine.

On a GPU a decode step is bound by weight reads and launch latency: a batch of 64 rows costs about what one row
does, and the host waits for it without holding the GIL. A CPU is the opposite (rows cost compute; torch's eager
dispatch holds the GIL), so a CPU run cannot tell how the server's scheduling and per-message work would fare
on a GPU. Here the real server runs (gRPC, servicer, runtime, sessions, metrics) and only the forward of a decode
batch is replaced: it sleeps `--device-ms` whatever its rows, and echoes its input. Prefill and everything else
run on the real model. Measured on the 2-core VM it reproduces the shape of the H100's scaling curve
(README, "Many clients, one trunk"), so that changes to the serving path can be compared side by side without a
GPU. Used by `scripts/bench_server.py --simulate-device-ms MS`; the numbers it gives are no GPU's.

    python scripts/simulated_server.py --device-ms 0.6 --model random:tiny --port 50051 [any server flag]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from server import app  # noqa: E402


class SimulatedDevice:
    """Stands in for the trunk in the runtime: a decode batch takes `ms` of wall time whatever its rows, holding
    no GIL, and returns its input; nothing is kept, so no session runs out of positions. Anything else (a
    prefill chunk) runs on the real trunk."""

    def __init__(self, trunk, ms: float):
        self.trunk, self.ms = trunk, ms
        self.config, self.device, self.dtype = trunk.config, trunk.device, trunk.dtype

    def __call__(self, *args, **kw):
        return self.trunk(*args, **kw)

    def decode_rows(self, x: torch.Tensor, cache, positions: torch.Tensor, end: int) -> torch.Tensor:
        if self.ms:
            time.sleep(self.ms / 1e3)
        cache.lengths[:] = [0] * len(cache.lengths)
        return x.clone()  # a model's output is a new tensor, never the runtime's input buffer


def main() -> None:
    argv = sys.argv[1:]
    if "--device-ms" not in argv:
        raise SystemExit("simulated_server: --device-ms MS is required (the simulated time of a decode batch)")
    i = argv.index("--device-ms")
    try:
        ms = float(argv[i + 1])
    except (IndexError, ValueError):
        raise SystemExit("simulated_server: --device-ms takes a number of milliseconds") from None
    del argv[i : i + 2]

    class SimulatedServer(app.TrunkServer):
        def __init__(self, cfg) -> None:
            super().__init__(cfg)
            self.runtime.trunk = self.runtime.decode_batch.trunk = SimulatedDevice(self.runtime.trunk, ms)
            self.runtime.decode_batch.graphs.clear()  # no replays either: every decode batch goes to the device above

    app.main(argv, SimulatedServer)


if __name__ == "__main__":
    main()
