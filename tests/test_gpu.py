"""CUDA paths: graphs captured and replayed, equal to the eager path, over gRPC too. Skipped without a GPU;
without one, the one-line error for --device cuda is what is tested."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch

from splitcore.cudagraph import DecoderPool
from splitcore.engine import FullEngine
from splitcore.generate import FullStepper
from splitcore.parts import load_full, load_parts
from splitcore.sampling import SamplingParams
from tests.conftest import TINY, start_tiny_server, subprocess_env

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
GREEDY = SamplingParams(temperature=0.0)
PROMPT = "The history of natural language processing"


@pytest.mark.skipif(CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("cli", ["baseline", "client"])
def test_cuda_without_a_gpu_is_one_line(cli):
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
    from client.config import ClientConfig
    from client.split_engine import SplitEngine

    srv = start_tiny_server(models_dir, device="cuda", dtype="float32")
    try:
        cfg = ClientConfig(model=TINY, models_dir=str(models_dir), device="cuda", dtype="float32", reconnect_s=0)
        cfg.server = f"127.0.0.1:{srv.port}"
        engine = SplitEngine(cfg)
        want = FullEngine(tiny, torch.device("cuda"), torch.float32, cuda_graphs=False).run(PROMPT, 40, GREEDY)
        got = engine.run(PROMPT, 40, GREEDY)
        assert got.token_ids == want.token_ids
        assert srv.runtime.decode_batch.graphs and srv.runtime.stats.batches >= 1  # decode steps ran as captured graphs
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


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batched_decode_graphs_match_eager_and_solo(tiny, dtype):
    """The runtime's captured (rows, keys) buckets give what the eager batched step and the one-row eager
    forward give, for sessions at different positions decoding together."""

    from server.runtime import TrunkRuntime

    trunk = load_parts(tiny, "2,10", ("trunk",), "cuda", dtype)["trunk"]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randn(1, 3 + 7 * i, 64, generator=gen) for i in range(5)]
    steps = [[torch.randn(1, 1, 64, generator=gen) for _ in range(20)] for _ in prompts]
    outs = {}
    for graphs in (True, False):
        rt = TrunkRuntime(trunk, slots=8, max_length=200, batch_wait_ms=20, graphs=graphs)
        assert bool(rt.decode_batch.graphs) == graphs, "capture failed (see the log line)"
        got = [[] for _ in prompts]

        async def run(i, rt=rt, got=got):  # as the servicer uses the runtime: on an event loop
            slot = rt.acquire_slot()
            got[i].append((await rt.prefill_async(slot, prompts[i]))[0])
            for x in steps[i]:
                got[i].append(torch.as_tensor((await rt.decode_async(slot, x))[0]))

        async def main(run=run):
            await asyncio.gather(*(run(i) for i in range(len(prompts))))

        asyncio.run(main())
        assert max(rt.stats.batch_sizes) >= 2
        rt.stop()
        outs[graphs] = got
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for i, p in enumerate(prompts):
        cache = trunk.new_cache()
        solo = [trunk(p.to("cuda", dtype), cache).cpu()] + [trunk(x.to("cuda", dtype), cache).cpu() for x in steps[i]]
        for a, b, c in zip(outs[True][i], outs[False][i], solo, strict=True):
            assert float((a.float() - b.float()).abs().max()) < tol
            assert float((b.float() - c.float()).abs().max()) < tol
