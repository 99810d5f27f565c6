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

    return ArrayRecord({k: Array(v.detach().to("cpu").float().contiguous().numpy()) for k, v in weights.items()})


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
        with self._session(fed, weights) as (trainer, data):
            first = (round_ - 1) * fed.local_steps + 1
            losses = [
                trainer.step(s, data.batch(s, fed.batch_size, fed.seed)).loss
                for s in range(first, first + fed.local_steps)
            ]
            held_out = held_out_loss(trainer, data, fed)[0]
            windows = len(data.train) // fed.block_size
            return OwnerResult(trainer.adapter(), windows, sum(losses) / len(losses), held_out)

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
            save_round(out, round_, from_arrays(arrays), fed)
            history.append({"round": round_, "owners": owners, "seconds": time.monotonic() - self.started})
            write_log(out, fed, history)
            return arrays, metrics

        def configure_evaluate(self, server_round, arrays, config, grid):
            config["round"] = done + server_round
            return super().configure_evaluate(server_round, arrays, config, grid)

        def aggregate_evaluate(self, server_round, replies):
            metrics = super().aggregate_evaluate(server_round, replies)
            entry = history[-1]
            if metrics is not None and "held_out_loss" in metrics:
                entry["averaged_held_out_loss"] = float(metrics["held_out_loss"])
            entry["seconds"] = time.monotonic() - self.started
            write_log(out, fed, history)
            write_chart(out, history)
            print(MARK + round_line(entry, fed.rounds), flush=True)
            return metrics

    return SplitFedAvg()


def run_fed_server(grid, settings_path: str) -> None:
    """The ServerApp's body: resume from the last round's checkpoint, run the rest, save the averaged adapter."""
    from flwr.app import ConfigRecord

    from splitcore.lora import save_trained

    path = Path(settings_path)
    fed, out = FederationConfig.from_json(path.read_text()), path.parent
    done, ckpt = last_round(out)
    history = [r for r in read_log(out) if r["round"] <= done]
    weights = load_weights(ckpt) if ckpt is not None else {}
    if done:
        print(MARK + f"resuming after round {done} (from {ckpt})", flush=True)
    if done < fed.rounds:
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


def _train(owner: Owner, fed: FederationConfig, round_: int, weights):
    t0 = time.monotonic()
    r = owner.train(fed, round_, weights)
    print(
        OWNER_MARK + f"{owner.name}: round {round_}: {fed.local_steps} steps, loss {r.loss:.3f}, held-out "
        f"perplexity {math.exp(r.held_out_loss):.2f} on its own model [{time.monotonic() - t0:.0f} s]",
        flush=True,
    )
    metrics = {"num-examples": r.windows, "loss": r.loss, "held_out_loss": r.held_out_loss}
    return to_arrays(r.weights), metrics


def _evaluate(owner: Owner, fed: FederationConfig, round_: int, weights):
    loss, n = owner.evaluate(fed, weights)
    print(OWNER_MARK + f"{owner.name}: round {round_}: averaged model's held-out perplexity {math.exp(loss):.2f}")
    return None, {"num-examples": n, "held_out_loss": loss}


def _client_app():
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        return _owner_reply(msg, context, _train)

    @app.evaluate()
    def evaluate(msg, context):
        return _owner_reply(msg, context, _evaluate)

    return app


def _server_app():
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context):
        run_fed_server(grid, str(context.run_config["federation"]))

    return app


client_app = _client_app()  # one assignment each: Flower finds the apps by reading this file
server_app = _server_app()
