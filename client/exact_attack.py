"""The exact attacker: reading a prompt back from its hidden states by running the public bottom over candidates.

A hidden state at position t depends on the tokens 0..t alone (causal attention), and the bottom is public. So
the trunk's operator can read a prompt left to right: with the prefix it has read so far, it runs the bottom
over every candidate token at position t and keeps the candidate whose state makes the observed one likeliest
(vocab matching; SipIt, arXiv 2510.15511; "Hidden No More", ICML 2025). Without a defence the right candidate
reproduces the sent state to float error, and the read is exact.

Under the client's noise the attacker, who knows the mechanism and its strength (`Noise.log_likelihood`), reads
MAP: the log-likelihood of the observed state under each candidate plus the public model's own log-probability
of the candidate after the prefix read so far (the prior: what the text says next). A beam keeps the `beam`
likeliest prefixes. With no observation at all, the prior alone is the floor of every attacker on a text:
`ExactAttacker(..., observe=False)` reads it.

The candidates are the tokens of the attacker's public text (`vocabulary`) or the whole vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from splitcore.defence import Noise
from splitcore.gpt2 import GPT2

Progress = Callable[[int, int], None]  # position, positions


class Prefixes:
    """Rows of token prefixes run through a model's embeddings and blocks, their keys and values kept, so that a
    new token (or a set of candidate tokens) is one position's work."""

    def __init__(self, model: GPT2, rows: int):
        self.model, self.rows, self.t = model, rows, 0
        self.blocks = list(model.h.values())
        c = model.config
        empty = torch.zeros(rows, c.n_head, 0, c.head_dim, device=model.device, dtype=torch.float32)
        self.k, self.v = [empty] * len(self.blocks), [empty] * len(self.blocks)

    def _qkv(self, block, x: torch.Tensor):
        r, n, c = x.shape
        heads = self.model.config.n_head
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(c, dim=2)
        return [y.view(r, n, heads, c // heads) for y in (q, k, v)]  # (R, N, heads, hd)

    def run(self, ids: torch.Tensor, keep: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
        """States (R, N, d) after the last block for N candidate tokens at the next position of each row, each
        attending to its row's prefix and itself. `ids` (N,) the same candidates for every row, or (R, N).
        `keep` (N = 1): append the token to each row's prefix. `rows`: only these rows (not with `keep`)."""
        m = self.model
        emb = m.wte(ids) + m.wpe.weight[self.t]
        n_rows = self.rows if rows is None else len(rows)
        return self.run_states((emb.expand(n_rows, -1, -1) if emb.ndim == 2 else emb).float(), keep, rows)

    def run_states(self, x: torch.Tensor, keep: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`run` for a model without embeddings (a top): `x` (R, N, d) the candidates' input states."""
        t = self.t
        for i, block in enumerate(self.blocks):
            q, k, v = self._qkv(block, x)
            att = block.attn
            keys, values = (self.k[i], self.v[i]) if rows is None else (self.k[i][rows], self.v[i][rows])
            past = torch.einsum("rnhd,rhtd->rnht", q, keys) * att.scale  # (R, N, heads, t)
            own = (q * k).sum(-1, keepdim=True) * att.scale  # (R, N, heads, 1)
            w = torch.softmax(torch.cat([past, own], -1), -1)
            y = torch.einsum("rnht,rhtd->rnhd", w[..., :t], values) + w[..., t:] * v  # (R, N, heads, hd)
            x = x + att.c_proj(y.flatten(2))
            x = x + block.mlp(block.ln_2(x))
            if keep:
                self.k[i] = torch.cat([self.k[i], k.transpose(1, 2)], 2)
                self.v[i] = torch.cat([self.v[i], v.transpose(1, 2)], 2)
        if keep:
            self.t += 1
        return x

    def first(self, t: int) -> Prefixes:
        """The same rows cut to their first `t` positions (a view: running it with `keep` leaves this one as is)."""
        cut = Prefixes.__new__(Prefixes)
        cut.model, cut.rows, cut.t, cut.blocks = self.model, self.rows, t, self.blocks
        cut.k, cut.v = [k[:, :, :t] for k in self.k], [v[:, :, :t] for v in self.v]
        return cut

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the prefixes `rows` (R,), in that order (a beam's survivors)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


class ExactAttacker:
    """Reads token ids from observed states by vocab matching through `bottom` (the public one, or the client's
    own where the attacker has it), MAP under `noise` with `prior` (the public full model) if given."""

    def __init__(
        self,
        bottom: GPT2,
        noise: Noise,
        prior: GPT2 | None = None,
        candidates: torch.Tensor | None = None,
        beam: int = 1,
        observe: bool = True,
        chunk: int = 4096,
    ):
        if prior is None and (noise.scale > 0 or not observe):
            raise ValueError("under noise, and with no observation, the attacker needs the public model as its prior")
        self.bottom, self.noise, self.beam, self.observe = bottom, noise, beam, observe
        # without noise the observation is a point mass: the candidate that reproduces it is the read, and a prior
        # could only pull the read away from it
        self.prior = prior if noise.scale > 0 or not observe else None
        vocab = bottom.config.vocab_size
        self.candidates = torch.arange(vocab) if candidates is None else candidates.long().cpu()
        self.chunk = chunk
        # without noise a candidate either reproduces the sent state or does not: where none of `candidates`
        # does, the rest of the vocabulary is tried (names and numbers the public text lacks)
        rest = torch.ones(vocab, dtype=torch.bool)
        rest[self.candidates] = False
        self.rest = torch.arange(vocab)[rest] if noise.scale == 0 and observe and beam == 1 else None
        self.first = torch.zeros(vocab)  # the prior of the first position (fit: the public text's frequencies)
        kind = "MAP (the public model as prior)" if prior is not None and noise.scale > 0 else "vocab matching"
        kind += ", then the whole vocabulary where nothing matches" if self.rest is not None and len(self.rest) else ""
        kind = kind if observe else "the prior alone, nothing observed (the floor)"
        self.name = f"exact attacker: {kind}" + (f", beam {beam}" if beam > 1 else "")

    def fit(self, public_ids: torch.Tensor, observe=None, progress=None) -> ExactAttacker:
        """Learns nothing but the first position's prior: the public text's token frequencies (add-one)."""
        counts = torch.bincount(public_ids.flatten().cpu(), minlength=self.bottom.config.vocab_size).float()
        self.first = torch.log((counts + 1) / (counts.sum() + len(counts)))
        return self

    def _rest(self, total: torch.Tensor, cand: torch.Tensor, sent: torch.Tensor, bottom: Prefixes):
        """Without noise: the rows whose best candidate does not reproduce the sent state (to a relative 1e-4)
        try the rest of the vocabulary; returns the scores over candidates + rest, and those."""
        best = total.max(-1).values
        missed = (-best > 1e-4 * sent[:, 0].pow(2).sum(-1)).nonzero().flatten()
        rest = self.rest.to(cand.device)
        more = torch.full((total.shape[0], len(rest)), -math.inf, device=total.device)
        for i in range(0, len(rest), self.chunk) if len(missed) else ():
            part = rest[i : i + self.chunk]
            states = bottom.run(part, keep=False, rows=missed)
            more[missed, i : i + len(part)] = self.noise.log_likelihood(sent[missed], states)
        return torch.cat([total, more], -1), torch.cat([cand, rest])

    @torch.no_grad()
    def predict(
        self, states: torch.Tensor, shortlist: torch.Tensor | None = None, progress: Progress | None = None
    ) -> torch.Tensor:
        """(B, T, d) observed states -> (B, T) token ids. `shortlist` (B, T, K): the candidates at each position
        (another attack's K best guesses), in place of `candidates`."""
        b, t, _ = states.shape
        k, dev = self.beam, self.bottom.device
        states = states.float().to(dev)
        rows = torch.arange(b, device=dev).repeat_interleave(k)  # the window of each hypothesis
        bottom = Prefixes(self.bottom, b * k) if self.observe else None
        prior = Prefixes(self.prior, b * k) if self.prior is not None else None
        log_prior = self.first.to(dev).expand(b * k, -1)  # (R, vocab)
        score = torch.full((b, k), -math.inf, device=dev)
        score[:, 0] = 0  # one live hypothesis per window at the start
        read = torch.zeros(b, k, 0, dtype=torch.long, device=dev)
        for pos in range(t):
            cand = self.candidates.to(dev) if shortlist is None else shortlist[:, pos].to(dev)[rows]  # (N,)|(R, N)
            n = cand.shape[-1]
            total = torch.empty(b * k, n, device=dev)
            sent = states[rows, pos][:, None]  # (R, 1, d)
            for i in range(0, n, self.chunk):
                part = cand[..., i : i + self.chunk]
                ll = self.noise.log_likelihood(sent, bottom.run(part, keep=False)) if bottom is not None else 0
                pr = log_prior.gather(1, part.expand(b * k, -1)) if prior is not None else 0
                total[:, i : i + part.shape[-1]] = ll + pr
            if self.rest is not None and len(self.rest) and shortlist is None:
                total, cand = self._rest(total, cand, sent, bottom)
                n = cand.shape[-1]
            total = (score.view(-1, 1) + total).view(b, k * n)
            score, flat = total.topk(k, -1)  # (B, k)
            origin = (flat // n + torch.arange(b, device=dev)[:, None] * k).flatten()  # the hypotheses they extend
            token = cand.expand(b * k, -1)[origin, (flat % n).flatten()].view(b, k)
            read = torch.cat([read.view(b * k, -1)[origin].view(b, k, -1), token[..., None]], -1)
            for p in (bottom, prior):
                if p is not None:
                    p.reorder(origin)
                    h = p.run(token.view(-1, 1), keep=True)  # (R, 1, d)
            if prior is not None:
                log_prior = F.log_softmax(self.prior.logits(h).float(), -1)  # (R, vocab) after each prefix
            if progress:
                progress(pos + 1, t)
        return read[:, 0].cpu()  # the best hypothesis


def floor(public_ids: torch.Tensor, private_ids: torch.Tensor, prior: GPT2, candidates: torch.Tensor | None = None):
    """What an attacker reads of private windows (N, T) with nothing observed: the better of the public text's
    commonest token at every position and the public model's own greedy text (from the first position's public
    frequencies). No defence can push a reader below this. Returns (share, how)."""
    common = torch.bincount(public_ids.flatten()).argmax()
    constant = float((private_ids == common).float().mean())
    guess = (
        ExactAttacker(prior, Noise(), prior, candidates, observe=False)
        .fit(public_ids)
        .predict(torch.zeros(*private_ids.shape, prior.config.n_embd))
    )
    greedy = float((guess == private_ids).float().mean())
    return max((constant, "the public text's commonest token everywhere"), (greedy, "the public model's greedy text"))
