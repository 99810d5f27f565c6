"""CUDA paths: graphs captured and replayed, equal to the eager path, over gRPC too. Skipped without a GPU;
without one, the one-line error for --device cuda is what is tested."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from splitcore.cudagraph import DecoderPool
from splitcore.engine import FullEngine
from splitcore.generate import FullStepper
from splitcore.parts import load_full
from splitcore.sampling import SamplingParams
from tests.conftest import TINY, start_tiny_server, subprocess_env

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
GREEDY = SamplingParams(temperature=0.0)
PROMPT = "The history of natural language processing"


@pytest.mark.skipif(CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("cli", ["baseline", "client"])
def test_cuda_without_a_gpu_is_one_line(cli, models_dir):
    args = [sys.executable, "-m", cli, "generate", "hi", "--model", TINY, "--device", "cuda", "--local-trunk"]
    p = subprocess.run(args[:-1] if cli == "baseline" else args, capture_output=True, text=True, env=subprocess_env())
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "error: device 'cuda' asked for, but no CUDA GPU is visible; use --device cpu or auto"
    ]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graph_steps_match_eager_steps(tiny, dtype):
    full = load_full(tiny, "cuda", dtype)
    pool = DecoderPool(full)
    runs = []
    for p in (None, pool):
        stepper = FullStepper(full, 80, p)
        ids, tokens, logits = torch.tensor([[15496, 995, 11, 314]]), [], []
        for _ in range(40):
            out = stepper.step(ids).logits.float()
            logits.append(out.clone())
            tokens.append(int(out.argmax()))
            ids = torch.tensor([[tokens[-1]]])
        if p is not None:
            assert stepper.model.decoder.graphed, "capture failed (see the log line)"
        stepper.close()
        runs.append((tokens, torch.stack(logits)))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert float((runs[0][1] - runs[1][1]).abs().max()) < tol
    if dtype == torch.float32:
        assert runs[0][0] == runs[1][0]


@needs_cuda
def test_split_over_grpc_with_graphs_matches_full_model_on_cuda(models_dir, tiny):
    from client.engine import ClientConfig, SplitEngine

    srv = start_tiny_server(models_dir, device="cuda", dtype="float32")
    try:
        cfg = ClientConfig(model=TINY, models_dir=str(models_dir), device="cuda", dtype="float32", reconnect_s=0)
        cfg.server = f"127.0.0.1:{srv.port}"
        engine = SplitEngine(cfg)
        want = FullEngine(tiny, torch.device("cuda"), torch.float32, cuda_graphs=False).run(PROMPT, 40, GREEDY)
        got = engine.run(PROMPT, 40, GREEDY)
        assert got.token_ids == want.token_ids
        assert srv.servicer.decoders is not None and srv.servicer.decoders.captured >= 1
        assert all(p.captured >= 1 for p in engine.pools.values())
        engine.close()
    finally:
        srv.stop(1)


@needs_cuda
def test_sampling_stays_on_the_device(tiny):
    engine = FullEngine(tiny, torch.device("cuda"), torch.float16, cuda_graphs=True)
    a = engine.run(PROMPT, 20, SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=7)).token_ids
    b = engine.run(PROMPT, 20, SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=7)).token_ids
    assert a == b
