"""Federated split learning (SplitFed) on Flower: many data owners train one model; no owner's text leaves it.

Each owner runs a Flower ClientApp (`python -m client federate join`). In a round it starts from the averaged
weights, trains for `local_steps` across the split against the trunk server with the existing split training
(client/split_training.py: its defences included), and returns every weight it trained, with its number of
training windows. The fed server (`python -m client federate serve`) runs the ServerApp: Flower's FedAvg, weighted
by windows, checkpointed after every round, and the result saved as the same PEFT adapter (plus client weights)
that `python -m client train` writes.

The trunk's share (docs/federated.md): each owner's training session on the trunk starts from the averaged trunk
adapter, which the owner sends as the session's `resume`, and the trunk's adapter is averaged with the owners'
parts by the fed server. So the trunk server keeps nothing between sessions (an owner that dies mid-round loses
nothing but its own round; any replica serves any round), FedAvg covers the whole model exactly, and the trunk
never receives a weight of an owner's parts: its protocol has no field for them (tests/test_federated.py).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from client.config import ClientConfig, FederationConfig

MARK = "[federate] "  # the fed server's progress lines, picked out of Flower's log by `federate serve`
OWNER_MARK = "[owner] "  # an owner's, picked out of its SuperNode's log by `federate join`
SETTINGS_FILE = "federation.json"
LOG_FILE = "federation_log.json"


# --- weights as Flower records --------------------------------------------------------------------------
def to_arrays(weights: dict):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(_numpy(v)) for k, v in weights.items()})


def _numpy(tensor):
    return tensor.detach().to("cpu").float().contiguous().numpy()


def from_arrays(record) -> dict:
    import torch

    return {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()}


# --- an owner's side of a round ---------------------------------------------------------------------------
@dataclass
class OwnerResult:
    weights: dict
    windows: int  # training windows this owner holds: its weight in the average
    loss: float  # mean training loss of its local steps
    held_out_loss: float  # its own model's, after the local steps, on its held-out text
    seconds: float = 0.0  # how long the round took this owner


class Owner:
    """One data owner: its client settings (the trunk server, its defences) and its text, from `federate join`."""

    def __init__(self, client: ClientConfig, data: str, name: str):
        self.client, self.data, self.name = client, data, name

    @classmethod
    def load(cls, path: str | Path) -> Owner:
        spec = json.loads(Path(path).read_text())
        return cls(ClientConfig(**spec["client"]), spec["data"], spec["name"])

    def save(self, path: Path) -> None:
        """Only this user may read it: the client settings may hold the trunk's token."""
        text = json.dumps({"client": asdict(self.client), "data": self.data, "name": self.name}, indent=1)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    @contextmanager
    def _session(self, fed: FederationConfig, weights: dict | None):
        """(trainer, data): a training session on the trunk from `weights` (None: the seeded initialisation of
        round 1), with a fresh optimizer (FedAvg's local run). The federation names the model; the trunk, its
        credentials and the defences are this owner's."""
        from client.split_engine import SplitEngine
        from client.split_training import SplitTrainer
        from splitcore.training import TextData

        engine = SplitEngine(replace(self.client, model=fed.model))
        try:
            engine.check_server()
            data = TextData.from_path(self.data, engine.encode, fed.block_size)
            trainer = SplitTrainer(engine, fed.lora(), fed.client_train, (weights, {}, 0) if weights else None)
            try:
                yield trainer, data
            finally:
                trainer.close()
        finally:
            engine.close()

    def train(self, fed: FederationConfig, round_: int, weights: dict | None) -> OwnerResult:
        t0 = time.monotonic()
        with self._session(fed, weights) as (trainer, data):
            first = (round_ - 1) * fed.local_steps + 1
            losses = [
                trainer.step(s, data.batch(s, fed.batch_size, fed.seed)).loss
                for s in range(first, first + fed.local_steps)
            ]
            held_out = held_out_loss(trainer, data, fed)[0]
            windows = len(data.train) // fed.block_size
            loss = sum(losses) / len(losses)
            return OwnerResult(trainer.adapter(), windows, loss, held_out, time.monotonic() - t0)

    def evaluate(self, fed: FederationConfig, weights: dict | None) -> tuple[float, int]:
        """The averaged model's held-out loss on this owner's text, and the windows it was measured on."""
        with self._session(fed, weights) as (trainer, data):
            return held_out_loss(trainer, data, fed)


def held_out_loss(trainer, data, fed: FederationConfig) -> tuple[float, int]:
    """Mean loss per window over the held-out batches, and the number of windows."""
    batches = data.eval_batches(fed.batch_size, fed.eval_batches)
    n = sum(b.shape[0] for b in batches)
    return sum(trainer.eval_loss(b) * b.shape[0] for b in batches) / n, n


# --- the fed server: FedAvg, checkpointed every round -------------------------------------------------------
def last_round(out: Path) -> tuple[int, Path | None]:
    found = [p for p in out.glob("round-*") if p.name.removeprefix("round-").isdigit()]
    if not found:
        return 0, None
    best = max(found, key=lambda p: int(p.name.removeprefix("round-")))
    return int(best.name.removeprefix("round-")), best


def load_weights(path: Path) -> dict:
    from splitcore.lora import load_client_weights, load_peft

    return load_peft(path)[0] | load_client_weights(path)


def save_round(out: Path, round_: int, weights: dict, fed: FederationConfig) -> Path:
    """The averaged weights after `round_`, written whole before they count: a restarted server resumes here."""
    import shutil

    from splitcore.lora import save_trained

    final, tmp = out / f"round-{round_}", out / f".round-{round_}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_trained(tmp, weights, fed.lora(), fed.model)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def read_log(out: Path) -> list[dict]:
    f = out / LOG_FILE
    return json.loads(f.read_text())["rounds"] if f.is_file() else []


def write_log(out: Path, fed: FederationConfig, rounds: list[dict]) -> None:
    (out / LOG_FILE).write_text(json.dumps({"settings": asdict(fed), "rounds": rounds}, indent=1))


def write_chart(out: Path, rounds: list[dict]) -> Path:
    """OUT/federation.html: the rounds so far as a chart (each owner's training loss and held-out perplexity, and
    the averaged model's), rewritten every round; plotly.js beside it, so it opens offline."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss", "held-out perplexity"))
    x = [r["round"] for r in rounds]
    names = sorted({o["name"] for r in rounds for o in r["owners"]})
    for name in names:
        mine = [(r["round"], o) for r in rounds for o in r["owners"] if o["name"] == name]
        fig.add_scatter(x=[r for r, _ in mine], y=[o["loss"] for _, o in mine], name=name, row=1, col=1)
        fig.add_scatter(
            x=[r for r, _ in mine],
            y=[math.exp(o["held_out_loss"]) for _, o in mine],
            name=f"{name} (its own model)",
            row=1,
            col=2,
        )
    avg = [(r["round"], math.exp(r["averaged_held_out_loss"])) for r in rounds if "averaged_held_out_loss" in r]
    fig.add_scatter(x=[a for a, _ in avg], y=[b for _, b in avg], name="averaged model", row=1, col=2)
    fig.update_xaxes(title_text="round", tickvals=x)
    fig.update_layout(title=f"Federated rounds: {out}")
    path = out / "federation.html"
    fig.write_html(str(path), include_plotlyjs="directory")
    return path


def round_line(entry: dict, rounds: int) -> str:
    owners = ", ".join(
        f"{o['name']} loss {o['loss']:.3f} / ppl {math.exp(o['held_out_loss']):.2f}" for o in entry["owners"]
    )
    avg = entry.get("averaged_held_out_loss")
    avg_text = f"averaged model's held-out perplexity {math.exp(avg):.2f}" if avg is not None else "not evaluated"
    return (
        f"round {entry['round']}/{rounds}: {len(entry['owners'])} owners ({owners}); {avg_text} "
        f"[{entry['seconds']:.0f} s]"
    )


def _round_done(fed: FederationConfig, out: Path, round_: int, weights: dict, owners: list, started: float,
                history: list[dict]) -> None:  # fmt: skip
    """A round's average is in: checkpoint it, then log the round (a restart resumes after it)."""
    save_round(out, round_, weights, fed)
    history.append({"round": round_, "owners": owners, "seconds": time.monotonic() - started})
    write_log(out, fed, history)


def _round_evaluated(fed: FederationConfig, out: Path, loss, started: float, history: list[dict]) -> None:
    """The averaged model's held-out loss on the owners' text: logged, charted, and one progress line."""
    entry = history[-1]
    if loss is not None:
        entry["averaged_held_out_loss"] = float(loss)
    entry["seconds"] = time.monotonic() - started
    write_log(out, fed, history)
    write_chart(out, history)
    print(MARK + round_line(entry, fed.rounds), flush=True)


def make_strategy(fed: FederationConfig, out: Path, done: int, history: list[dict]):
    from flwr.serverapp.strategy import FedAvg

    class SplitFedAvg(FedAvg):
        """FedAvg weighted by the owners' training windows, with a checkpoint and a log entry every round."""

        def __init__(self):
            n = fed.min_owners
            super().__init__(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)
            self.started = time.monotonic()

        def configure_train(self, server_round, arrays, config, grid):
            self.started = time.monotonic()
            config["round"] = done + server_round
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            arrays, metrics = super().aggregate_train(server_round, replies)
            round_ = done + server_round
            if arrays is None:
                raise RuntimeError(f"round {round_}: no owner returned its weights (see the owners' logs)")
            owners = [
                {"name": str(r.content["owner"]["name"])} | {k: float(v) for k, v in r.content["metrics"].items()}
                for r in replies
                if not r.has_error()
            ]
            _round_done(fed, out, round_, from_arrays(arrays), owners, self.started, history)
            return arrays, metrics

        def configure_evaluate(self, server_round, arrays, config, grid):
            config["round"] = done + server_round
            return super().configure_evaluate(server_round, arrays, config, grid)

        def aggregate_evaluate(self, server_round, replies):
            metrics = super().aggregate_evaluate(server_round, replies)
            loss = metrics.get("held_out_loss") if metrics is not None else None
            _round_evaluated(fed, out, loss, self.started, history)
            return metrics

    return SplitFedAvg()


# --- SecAgg+: Flower's secure aggregation -------------------------------------------------------------------
# Flower runs SecAgg+ as a workflow of its older API: fit and evaluate records (FitIns / FitRes), weights as an
# unnamed list. Here that list is the weights in the order of their sorted names, which travel in the round's
# config (the fed server's way) and in each owner's metrics (the owners' way), so both sides name them alike.
SECAGG_CLIP = 8.0  # SecAgg+ clips each value times the owner's weight (windows / max weight) to +-this, then
SECAGG_LEVELS = 1 << 22  # quantises that range into this many levels (Flower's defaults): a step of 3.8e-6


def _ndarrays(weights: dict, names: list[str]) -> list:
    return [_numpy(weights[k]) for k in names]


def _names(text) -> list[str]:
    return [n for n in str(text).split(",") if n]


def _named(names: list[str], arrays: list) -> dict:
    import numpy as np
    import torch

    if len(names) != len(arrays):
        raise ValueError(f"{len(arrays)} weights arrived for {len(names)} names")
    return {k: torch.from_numpy(np.asarray(a, dtype=np.float32).copy()) for k, a in zip(names, arrays, strict=True)}


def make_secagg_strategy(fed: FederationConfig, out: Path, done: int, history: list[dict], weights: dict):
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    class SecAggFedAvg(FedAvg):
        """Flower's FedAvg under the SecAgg+ workflow: `aggregate_fit` gets only the weighted average (the
        workflow unmasks the sum and hands it to every result), then checkpoints and logs as SplitFedAvg does."""

        def __init__(self):
            n = fed.min_owners
            self.names, self.weights, self.started = sorted(weights), weights, time.monotonic()
            super().__init__(
                fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=n, min_evaluate_clients=n,
                min_available_clients=n, initial_parameters=ndarrays_to_parameters(_ndarrays(weights, self.names)),
                on_fit_config_fn=self._config, on_evaluate_config_fn=self._config,
            )  # fmt: skip

        def _config(self, server_round: int) -> dict:
            return {"round": done + server_round, "federation": fed.to_json(), "names": ",".join(self.names)}

        def configure_fit(self, server_round, parameters, client_manager):
            self.started = time.monotonic()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            round_ = done + server_round
            if not results:
                raise RuntimeError(f"round {round_}: no owner returned its weights (see the owners' logs)")
            names = {str(res.metrics["names"]) for _, res in results}
            if len(names) != 1:
                raise RuntimeError(f"round {round_}: the owners trained different weights")
            self.names = _names(names.pop())
            self.weights = _named(self.names, parameters_to_ndarrays(results[0][1].parameters))
            owners = [
                {"name": str(res.metrics["owner"]), "num-examples": float(res.num_examples)}
                | {k: float(res.metrics[k]) for k in ("loss", "held_out_loss")}
                for _, res in results
            ]
            _round_done(fed, out, round_, self.weights, owners, self.started, history)
            return ndarrays_to_parameters(_ndarrays(self.weights, self.names)), {}

        def aggregate_evaluate(self, server_round, results, failures):
            loss, _ = super().aggregate_evaluate(server_round, results, failures)
            _round_evaluated(fed, out, loss, self.started, history)
            return loss, {}

    return SecAggFedAvg()


def _run_secagg(grid, context, fed: FederationConfig, out: Path, done: int, history: list[dict], weights: dict):
    """The remaining rounds under Flower's SecAgg+ workflow; the last round's average."""
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    strategy = make_secagg_strategy(fed, out, done, history, weights)
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=fed.rounds - done, round_timeout=fed.round_timeout_s),
        strategy=strategy,
    )
    secagg = SecAggPlusWorkflow(
        num_shares=1.0,  # every owner of the round holds a share of every other's keys
        reconstruction_threshold=0.5,  # half of them (at least 2) can unmask a dropped owner; fewer learn nothing
        max_weight=float(fed.secagg_max_weight),
        clipping_range=SECAGG_CLIP,
        quantization_range=SECAGG_LEVELS,
        timeout=fed.round_timeout_s,
    )
    DefaultWorkflow(fit_workflow=secagg)(grid, legacy)
    reached = last_round(out)[0]
    if reached < fed.rounds:  # the workflow logs and goes on when too few owners answer a stage
        raise RuntimeError(
            f"round {reached + 1}: secure aggregation stopped: fewer owners answered than it needs (see the log)"
        )
    return strategy.weights


def run_fed_server(grid, context) -> None:
    """The ServerApp's body: resume from the last round's checkpoint, run the rest, save the averaged adapter."""
    from flwr.app import ConfigRecord

    from splitcore.lora import save_trained

    path = Path(str(context.run_config["federation"]))
    fed, out = FederationConfig.from_json(path.read_text()), path.parent
    done, ckpt = last_round(out)
    history = [r for r in read_log(out) if r["round"] <= done]
    weights = load_weights(ckpt) if ckpt is not None else {}
    if done:
        print(MARK + f"resuming after round {done} (from {ckpt})", flush=True)
    if done < fed.rounds and fed.secagg:
        weights = _run_secagg(grid, context, fed, out, done, history, weights)
    elif done < fed.rounds:
        config = ConfigRecord({"federation": fed.to_json()})
        result = make_strategy(fed, out, done, history).start(
            grid=grid,
            initial_arrays=to_arrays(weights),
            num_rounds=fed.rounds - done,
            timeout=fed.round_timeout_s,
            train_config=config,
            evaluate_config=ConfigRecord(dict(config)),
        )
        weights = from_arrays(result.arrays)
    save_trained(out, weights, fed.lora(), fed.model)
    print(MARK + f"done: the averaged adapter is in {out} (load it with --adapter {out})", flush=True)


# --- the Flower apps (named by client/flower_app/pyproject.toml) -------------------------------------------
def _owner_reply(msg, context, work):
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    owner = Owner.load(context.node_config["owner"])
    config = msg.content["config"]
    fed = FederationConfig.from_json(str(config["federation"]))
    weights = from_arrays(msg.content["arrays"]) or None
    try:
        arrays, metrics = work(owner, fed, int(config["round"]), weights)
    except Exception as e:
        print(OWNER_MARK + f"{owner.name}: round {config['round']} failed: {e}", flush=True)
        raise
    content = {"metrics": MetricRecord(metrics), "owner": ConfigRecord({"name": owner.name})}
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=RecordDict(content), reply_to=msg)


def _report(owner: Owner, fed: FederationConfig, round_: int, r: OwnerResult) -> None:
    print(
        OWNER_MARK + f"{owner.name}: round {round_}: {fed.local_steps} steps, loss {r.loss:.3f}, held-out "
        f"perplexity {math.exp(r.held_out_loss):.2f} on its own model [{r.seconds:.0f} s]",
        flush=True,
    )


def _report_evaluation(owner: Owner, round_: int, loss: float) -> None:
    print(OWNER_MARK + f"{owner.name}: round {round_}: averaged model's held-out perplexity {math.exp(loss):.2f}")


def _train(owner: Owner, fed: FederationConfig, round_: int, weights):
    r = owner.train(fed, round_, weights)
    _report(owner, fed, round_, r)
    metrics = {"num-examples": r.windows, "loss": r.loss, "held_out_loss": r.held_out_loss}
    return to_arrays(r.weights), metrics


def _evaluate(owner: Owner, fed: FederationConfig, round_: int, weights):
    loss, n = owner.evaluate(fed, weights)
    _report_evaluation(owner, round_, loss)
    return None, {"num-examples": n, "held_out_loss": loss}


def _secagg_request(ins) -> tuple[FederationConfig, int, dict | None]:
    """The federation, the round and the averaged weights (named; None before round 1) of a SecAgg+ run's fit or
    evaluate record."""
    from flwr.common import parameters_to_ndarrays

    fed = FederationConfig.from_json(str(ins.config["federation"]))
    weights = _named(_names(ins.config["names"]), parameters_to_ndarrays(ins.parameters))
    return fed, int(ins.config["round"]), weights or None


def _secagg_fit(msg, context):
    """A SecAgg+ round's training (its workflow's fit record): the reply's weights go to Flower's secaggplus_mod,
    which sends the fed server only their masked, quantised product with this owner's weight."""
    from flwr.app import Message
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    owner = Owner.load(context.node_config["owner"])
    fed, round_, weights = _secagg_request(compat.recorddict_to_fitins(msg.content, keep_input=True))
    try:
        r = owner.train(fed, round_, weights)
        _check_secagg_range(owner.name, fed, r)
    except Exception as e:
        print(OWNER_MARK + f"{owner.name}: round {round_} failed: {e}", flush=True)
        raise
    _report(owner, fed, round_, r)
    out = sorted(r.weights)
    metrics = {"owner": owner.name, "names": ",".join(out), "loss": r.loss, "held_out_loss": r.held_out_loss}
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(_ndarrays(r.weights, out)), r.windows, metrics)
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def _check_secagg_range(name: str, fed: FederationConfig, r: OwnerResult) -> None:
    """Refuse what SecAgg+ would silently get wrong: a weight above its maximum overflows, and a value beyond its
    clipping range (after scaling by windows / max weight) is clipped."""
    if r.windows > fed.secagg_max_weight:
        raise ValueError(
            f"{name} holds {r.windows} training windows, more than the federation's --secagg-max-weight "
            f"{fed.secagg_max_weight}: the fed server must raise it"
        )
    scale = r.windows / fed.secagg_max_weight
    peak = max((float(v.abs().max()) for v in r.weights.values()), default=0.0) * scale
    if peak > SECAGG_CLIP:
        raise ValueError(f"a weight times {scale:.3g} reaches {peak:.3g}, beyond SecAgg+'s clipping range "
                         f"+-{SECAGG_CLIP:g}")  # fmt: skip


def _secagg_evaluate(msg, context):
    """A SecAgg+ run's evaluation (the workflow's evaluate record): the averaged model on this owner's held-out
    text."""
    from flwr.app import Message
    from flwr.common import Code, EvaluateRes, Status
    from flwr.compat.common import recorddict_compat as compat

    owner = Owner.load(context.node_config["owner"])
    fed, round_, weights = _secagg_request(compat.recorddict_to_evaluateins(msg.content, keep_input=True))
    loss, n = owner.evaluate(fed, weights)
    _report_evaluation(owner, round_, loss)
    return Message(compat.evaluateres_to_recorddict(EvaluateRes(Status(Code.OK, ""), loss, n, {})), reply_to=msg)


def _secagg_if_asked(msg, context, call_next):
    """Flower's secaggplus_mod for the messages of a SecAgg+ run (they carry its stage record); the others pass."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _client_app():
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train(mods=[_secagg_if_asked])
    def train(msg, context):
        if "fitins.config" in msg.content.config_records:
            return _secagg_fit(msg, context)
        return _owner_reply(msg, context, _train)

    @app.evaluate()
    def evaluate(msg, context):
        if "evaluateins.config" in msg.content.config_records:
            return _secagg_evaluate(msg, context)
        return _owner_reply(msg, context, _evaluate)

    return app


def _server_app():
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context):
        run_fed_server(grid, context)

    return app


client_app = _client_app()  # one assignment each: Flower finds the apps by reading this file
server_app = _server_app()
