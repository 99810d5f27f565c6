"""Rolling a trunk session back (speculative decoding's rejected drafts): after a truncate to p over gRPC, the
trunk answers as a session that never went past p; in a session, in the stateless mode, and in a replay after
a restart; a bad truncate is refused and the server goes on."""

from __future__ import annotations

import grpc
import pytest
import torch

from splitcomm.errors import TrunkError, TrunkUnavailable
from splitcomm.links import SessionLink, StatelessLink
from splitcomm.proto import trunk_pb2 as pb
from splitcomm.trunk_client import TrunkClient, TrunkClientConfig
from splitcore.errors import InvalidInput
from splitcore.parts import load_parts
from tests.conftest import wait_for

GEN = torch.Generator().manual_seed(11)
PROMPT = torch.randn(1, 10, 64, generator=GEN)
DRAFTS = [torch.randn(1, 1, 64, generator=GEN) for _ in range(5)]
NEXT = torch.randn(1, 1, 64, generator=GEN)


@pytest.fixture(scope="module")
def trunk(tiny):
    return load_parts(tiny, "2,10", ("trunk",))["trunk"]


@pytest.fixture(scope="module")
def client(server):
    c = TrunkClient(TrunkClientConfig(f"127.0.0.1:{server.port}"))
    yield c, pb.Fingerprint(**server.fingerprint.to_dict(), digest=server.fingerprint.digest)
    c.close()


def _reference(trunk, kept: int) -> torch.Tensor:
    """What the trunk gives NEXT after the prompt and the first `kept` drafts only."""
    cache = trunk.new_cache()
    trunk(PROMPT, cache)
    for d in DRAFTS[:kept]:
        trunk(d, cache)
    return trunk(NEXT, cache)


def test_truncate_with_the_next_step_equals_never_going_past(client, trunk, server):
    c, fp = client
    with c.session(fp, 40) as s:
        s.step(PROMPT)
        for d in DRAFTS:
            s.step(d)
        out = s.step(NEXT, truncate_to=12)[0]  # two drafts kept, three rolled back
    assert float((out - _reference(trunk, 2)).abs().max()) <= 1e-5
    assert float((out - _reference(trunk, 5)).abs().max()) > 1e-3  # the rollback mattered


def test_truncate_alone_then_step(client, trunk):
    c, fp = client
    with c.session(fp, 40) as s:
        s.step(PROMPT)
        for d in DRAFTS:
            s.step(d)
        assert s.truncate(11) == 11
        assert s.truncate(11) == 11  # to where it is already: nothing changes
        out = s.step(NEXT)[0]
    assert float((out - _reference(trunk, 1)).abs().max()) <= 1e-5


@pytest.mark.parametrize("length", [16, -1])
def test_bad_truncate_is_invalid_argument_and_others_go_on(client, trunk, server, length):
    c, fp = client
    good = c.session(fp, 40)
    good.step(PROMPT)
    with c.session(fp, 40) as bad:
        bad.step(PROMPT)
        with pytest.raises(TrunkError, match="cannot truncate") as e:
            bad.step(NEXT, truncate_to=length)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    out = good.step(NEXT)[0]  # the other session is untouched
    assert float((out - _reference(trunk, 0)).abs().max()) <= 1e-5
    good.close()
    wait_for(lambda: server.sessions.active() == 0, what="sessions freed")


def test_session_link_replays_only_what_was_kept(client, trunk):
    """A restart after a rollback: the new session gets the kept positions only, and answers as before."""
    c, fp = client
    link = SessionLink(c, fp, 40, torch.float32, reconnect_s=5, notify=lambda msg: None)
    link.forward(PROMPT)
    for d in DRAFTS:
        link.forward(d)
    link.truncate(13)
    assert link.length == 13 and sum(h.shape[1] for h in link.history) == 13
    out = link._recover(NEXT, TrunkUnavailable("the test restarts the trunk", grpc.StatusCode.UNAVAILABLE))[0]
    assert float((out - _reference(trunk, 3)).abs().max()) <= 1e-5
    with pytest.raises(InvalidInput, match="cannot truncate to 20"):
        link.truncate(20)
    link.close()


def test_stateless_link_truncates_the_cache_it_sends(client, trunk):
    c, fp = client
    link = StatelessLink(c, fp, torch.float32, 40)
    link.forward(PROMPT)
    for d in DRAFTS:
        link.forward(d)
    link.truncate(12)
    out = link.forward(NEXT)[0]
    assert float((out - _reference(trunk, 2)).abs().max()) <= 1e-5
    link.close()


@pytest.mark.parametrize("kind", ["split", "full"])
def test_stepper_truncate_gives_the_logits_of_never_going_past(models_dir, tiny, server, kind):
    """Feed a prompt and five tokens, roll back to the prompt and two, feed another: the logits are those of a
    stepper that saw only the prompt and the two."""
    from splitcore.engine import FullEngine
    from tests.conftest import tiny_split_engine

    engine = (
        tiny_split_engine(models_dir, f"127.0.0.1:{server.port}")
        if kind == "split"
        else FullEngine(tiny, torch.device("cpu"), torch.float32)
    )
    ids = engine.encode("The history of natural language processing")
    tokens, nxt = [11, 290, 262, 286, 13], 318
    a, b = engine.new_stepper(64), engine.new_stepper(64)
    a.step(torch.tensor([ids]))
    for t in tokens:
        a.step(torch.tensor([[t]]))
    a.truncate(len(ids) + 2)
    got = a.step(torch.tensor([[nxt]])).logits
    b.step(torch.tensor([ids]))
    for t in tokens[:2]:
        b.step(torch.tensor([[t]]))
    want = b.step(torch.tensor([[nxt]])).logits
    assert float((got - want).abs().max()) <= 1e-5
    a.close()
    b.close()
    if kind == "split":
        engine.close()


def test_session_link_history_keeps_exactly_the_first_p_positions():
    """The arithmetic of the replay history (whole steps dropped, the last one cut), against a concatenation."""
    import random

    rng = random.Random(0)
    for _ in range(300):
        link = SessionLink.__new__(SessionLink)  # the history alone: no server needed for this
        link.history, link.length, link._truncate_to = [], 0, None
        for _ in range(rng.randint(1, 6)):
            link.history.append(torch.randn(1, rng.randint(1, 6), 2))
            link.length += link.history[-1].shape[1]
        full = torch.cat(link.history, dim=1)
        p = rng.randint(0, link.length)
        link.truncate(p)
        kept = torch.cat(link.history, dim=1) if link.history else full[:, :0]
        assert link.length == p and link._truncate_to in (p, None) and torch.equal(kept, full[:, :p])
