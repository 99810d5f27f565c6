"""The client's secret noise (splitcore/defence.py:Protect), under the threat model of docs/privacy.md: the trunk's
operator knows the code and gets every byte sent, repeats and retries included. It cannot reproduce a draw, and
repeats of the same text send the same bits, so averaging them reads nothing more than one send."""

from __future__ import annotations

import math

import torch

from splitcore.defence import Noise, Protect, secret_from_seed
from splitcore.engine import Recorder
from splitcore.sampling import SamplingParams
from tests.conftest import tiny_split_engine

GREEDY = SamplingParams(temperature=0.0)


def _z(protect: Protect, ids: list[int], d: int = 64) -> torch.Tensor:
    """The unit draws `protect` adds for a sequence of ids: (T, d)."""
    return protect.draws(protect.chain(ids), d)


def test_draws_are_unit_noise_of_their_kind():
    ids = list(range(2000))
    for kind, kurtosis in (("gaussian", 3.0), ("laplace", 6.0)):
        z = _z(Protect(Noise(kind, 1.0)), ids).flatten().double()
        assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01, kind
        k = float(((z - z.mean()) ** 4).mean() / z.var() ** 2)
        assert abs(k - kurtosis) < 0.3, (kind, k)


def test_same_prefix_same_noise_different_text_or_secret_independent():
    p, q = Protect(Noise("gaussian", 1.0)), Protect(Noise("gaussian", 1.0))
    a, b = [5, 6, 7, 8, 9], [5, 6, 7, 1, 2]
    za, zb = _z(p, a), _z(p, b)
    assert torch.equal(za, _z(p, a))  # a repeat: the same bits
    assert torch.equal(za[:3], zb[:3])  # a shared prefix: the same on it...
    assert (za[3:] != zb[3:]).all()  # ...and different after it
    assert (za != _z(q, a)).all()  # another client's secret: different everywhere
    corr = torch.corrcoef(torch.stack([za.flatten(), _z(q, a).flatten()]))[0, 1]
    assert abs(float(corr)) < 0.2
    # the same token at the same position after a different prefix draws anew
    assert (_z(p, [1, 9])[1] != _z(p, [2, 9])[1]).all()


def test_seeds_that_differ_only_above_bit_32_give_different_noise():
    seeded = [Protect(Noise("gaussian", 1.0), secret_from_seed(s)) for s in (5, 5 + 2**32, 5 + 2**40)]
    draws = [_z(p, [1, 2, 3]) for p in seeded]
    assert torch.equal(draws[0], _z(Protect(Noise("gaussian", 1.0), secret_from_seed(5)), [1, 2, 3]))
    assert (draws[0] != draws[1]).all() and (draws[0] != draws[2]).all() and (draws[1] != draws[2]).all()


def test_a_stream_draws_what_the_whole_sequence_draws_and_follows_truncation():
    p = Protect(Noise("laplace", 2.0))
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    h = torch.randn(1, 8, 64)
    whole = p(h, ids)
    s = p.stream()
    parts = [s(h[:, :3], ids[:, :3]), s(h[:, 3:4], ids[:, 3:4]), s(h[:, 4:], ids[:, 4:])]
    assert torch.equal(torch.cat(parts, 1), whole)
    s.truncate(5)  # a rejected draft or a retry: the positions from 5 on are forgotten, then sent again
    assert torch.equal(s(h[:, 5:], ids[:, 5:]), whole[:, 5:])
    assert not torch.equal(p.stream("an adapter")(h, ids), whole)  # another bottom: other draws


def test_an_attacker_with_every_sent_byte_cannot_reproduce_the_noise(models_dir):
    """Given what a defended generation sent and, more than it ever has, the clean states, the attacker knows the
    noise that was added. It tries every way to draw it that the code offers without the secret: torch's
    generator (the old mechanism) and the seeded secrets of tests and benchmarks, 4096 seeds each, and fresh
    secrets. Nothing correlates with the true draws beyond chance."""
    e = tiny_split_engine(models_dir, local_trunk=True, defence="gaussian", noise_scale=3.0)
    try:
        tap = Recorder()
        result = e.run("In the beginning God created the heaven and the earth", 4, GREEDY, tap=tap)
        ids = torch.tensor([result.prompt_token_ids])
        clean = e.parts["bottom"].hidden(ids)
        rms = clean.pow(2).mean(-1, keepdim=True).sqrt()
        true_z = ((tap.prefill - clean) / (rms * 3.0))[0]  # (T, d): what was drawn
    finally:
        e.close()
    n, d = true_z.shape
    target = true_z.flatten()
    assert abs(float(target.std()) - 1) < 0.15  # the noise is really there, at its calibrated strength

    def best(candidates) -> float:
        zs = torch.stack([c.flatten() for c in candidates])
        zs = (zs - zs.mean(1, keepdim=True)) / zs.std(1, keepdim=True)
        t = (target - target.mean()) / target.std()
        return float((zs @ t / len(t)).abs().max())

    torch_draws = [torch.Generator().manual_seed(s) for s in range(4096)]
    tried = best(torch.randn(n, d, generator=g) for g in torch_draws)
    tried = max(tried, best(_z(Protect(Noise(), secret_from_seed(s)), ids[0].tolist(), d) for s in range(4096)))
    tried = max(tried, best(_z(Protect(Noise()), ids[0].tolist(), d) for _ in range(256)))
    chance = 5.5 / (n * d) ** 0.5  # the largest |correlation| of ~8k unrelated draws lies below this
    assert tried < chance, (tried, chance)


def test_repeats_are_identical_on_the_wire_so_averaging_reads_nothing_more(models_dir):
    """Every state sent (prefill and each decode step) for the same prompt, sent 16 times, is the same bits: the
    average of 16 sends is exactly one send. A prompt sharing a prefix sends the same states on the prefix, then
    others; another client (another secret) sends others everywhere."""

    class Every:
        def __init__(self):
            self.sent = []

        def __call__(self, h):
            self.sent.append(h.detach().clone())

    def sends(engine, prompt: str) -> torch.Tensor:
        tap = Every()
        engine.run(prompt, 6, GREEDY, tap=tap)
        return torch.cat(tap.sent, 1)

    a = tiny_split_engine(models_dir, local_trunk=True, defence="gaussian", noise_scale=10.0)
    b = tiny_split_engine(models_dir, local_trunk=True, defence="gaussian", noise_scale=10.0)
    try:
        prompt = "And the earth was without form, and void"
        first = sends(a, prompt)
        repeats = torch.stack([sends(a, prompt) for _ in range(15)] + [first])
        assert all(torch.equal(r, first) for r in repeats)
        assert torch.allclose(repeats.mean(0), first, rtol=1e-6, atol=1e-7)  # the average of 16 is one send
        n = len(a.encode("And the earth was"))
        other = sends(a, "And the earth was full of light")
        assert torch.equal(other[:, :n], first[:, :n]) and (other[:, n] != first[:, n]).all()
        assert (sends(b, prompt) != first).all()
    finally:
        a.close(), b.close()


def test_log_likelihood_is_the_mechanisms_density():
    """The density the exact attacker scores candidates with is the noise `apply` adds: the log-density of the
    sent state given the clean one, up to a constant that does not depend on the clean state."""
    torch.manual_seed(0)
    h, other = torch.randn(3, 16) * 2, torch.randn(3, 16)
    for kind, dist in (("gaussian", torch.distributions.Normal), ("laplace", torch.distributions.Laplace)):
        noise = Noise(kind, 0.7)
        sent = noise.apply(h, noise.sample(h.shape))
        for clean in (h, other):
            sigma = 0.7 * clean.pow(2).mean(-1, keepdim=True).sqrt()
            scale = sigma if kind == "gaussian" else sigma / 2**0.5
            want = dist(clean, scale).log_prob(sent).sum(-1)
            const = 16 * (0.5 * math.log(2 * math.pi) if kind == "gaussian" else math.log(2.0))
            assert torch.allclose(noise.log_likelihood(sent, clean) - const, want, atol=1e-4), kind
    clipped = Noise("gaussian", 0.0, clip=0.5)  # clipping alone: a point mass at the clipped state
    assert torch.allclose(clipped.log_likelihood(clipped.apply(h), h), torch.zeros(3), atol=1e-5)
    assert (clipped.log_likelihood(clipped.apply(h), other) < -1e-3).all()
    assert torch.equal(Noise().log_likelihood(other, h), -(other - h).pow(2).sum(-1))


def test_each_user_of_a_client_gets_noise_of_its_own(models_dir):
    """Where one client serves several users (the API), the noise is keyed by the user too: the same user's
    repeats are the same bits, two users' sends of the same text differ everywhere (the trunk cannot link them),
    and a generation with no user sends what it always did."""

    def sends(engine, user: str) -> torch.Tensor:
        tap = Recorder()
        list(engine.stream("And the earth was without form", 3, GREEDY, tap=tap, user=user))
        return tap.prefill

    e = tiny_split_engine(models_dir, local_trunk=True, defence="gaussian", noise_scale=3.0)
    try:
        alice = sends(e, "alice")
        assert torch.equal(sends(e, "alice"), alice)
        assert (sends(e, "bob") != alice).all() and (sends(e, "") != alice).all()
        none = Recorder()
        e.run("And the earth was without form", 3, GREEDY, tap=none)
        assert torch.equal(sends(e, ""), none.prefill)
    finally:
        e.close()
