"""Train the client's learned denoiser (splitcore/defence.py: Denoiser) from the trunk's own answers on public
text: each batch crosses twice, clean and with the client's defence, and the denoiser learns to make the top's
predictions from the noisy answer match those from the clean one. Only public text crosses clean, so this costs
no privacy; `python -m client train-denoiser` runs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from splitcore.defence import Denoiser
from splitcore.errors import InvalidInput
from splitcore.training import fit

logger = logging.getLogger(__name__)


def trunk_answers(engine) -> Callable[[torch.Tensor], torch.Tensor]:
    """Hidden states (B, T, C) -> the trunk's answer: in-process, or one stateless call to the server."""
    if engine.trunk_client is None:
        trunk = engine.parts["trunk"]
        return lambda h: trunk(h)
    return lambda h: engine.trunk_client.forward(engine.fingerprint, h, None, engine.wire_dtype)[0]


def train_denoiser(
    engine,
    public_ids: torch.Tensor,
    steps: int = 300,
    batch_size: int = 8,
    block_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> Denoiser:
    """A Denoiser for `engine`'s defence, trained on random windows of `public_ids` against the top's
    predictions: KL(top(clean answer) || top(repaired noisy answer)) over every position."""
    if engine.protect is None:
        raise InvalidInput("a denoiser repairs a defence's noise: give --defence gaussian or laplace and a strength")
    if len(public_ids) < 2 * block_size:
        raise InvalidInput(f"{len(public_ids)} tokens of public text: too little to train a denoiser on")
    bottom, top = engine.parts["bottom"], engine.parts["top"]
    answer = trunk_answers(engine)
    torch.manual_seed(seed)
    denoiser = Denoiser(bottom.config.n_embd).to(bottom.device).train()
    opt = torch.optim.AdamW(denoiser.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)

    def batch_of(step: int) -> torch.Tensor:
        starts = torch.randint(0, len(public_ids) - block_size, (batch_size,), generator=g).tolist()
        return torch.stack([public_ids[s : s + block_size] for s in starts]).to(bottom.device)

    def loss_of(ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        with torch.no_grad():
            clean = bottom(ids)
            sent = engine.protect(clean, ids)
            want = F.log_softmax(top(answer(clean).to(top.device, top.dtype), all_positions=True).float(), -1)
            noisy = answer(sent).to(top.device, top.dtype)
        got = F.log_softmax(top(denoiser(noisy, clean, sent), all_positions=True).float(), -1)
        loss = F.kl_div(got.flatten(0, 1), want.flatten(0, 1), log_target=True, reduction="batchmean")
        return loss, float(loss.detach())

    told = None if progress is None else (lambda step, loss: progress(step, steps, loss))
    fit(denoiser, opt, steps, lr, 1, batch_of, loss_of, told, clip=None, cosine=False)  # a constant rate
    return denoiser.eval().requires_grad_(False)
