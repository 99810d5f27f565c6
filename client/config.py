"""Settings of the split client (CLI, apps, API, training): one dataclass whose fields declare their own flags and
environment variables (splitcore/settings.py)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from splitcomm.config import TrunkClientConfig
from splitcore.errors import InvalidInput
from splitcore.settings import DEFAULT_SPLIT, DENOISERS, NOISE_KINDS, GenerateConfig, is_loopback, setting

if TYPE_CHECKING:  # the settings parse without torch: `python -m client --help` answers at once
    from splitcore.defence import Noise
    from splitcore.lora import LoraSettings

DEFENCES = ("none", *NOISE_KINDS)


@dataclass
class ClientConfig(GenerateConfig):
    """Settings of the split client (CLI, app, API): the model's, and the split's and the trunk server's."""

    split: str = setting(DEFAULT_SPLIT, "GPT2_SPLIT", "s1,s2: the trunk's blocks [s1, s2) (must match the server's)")
    server: str = setting(
        "localhost:50051",
        "GPT2_TRUNK_SERVER",
        "trunk server host:port; or replicas, comma-separated (a:50051,b:50051) or as a gRPC target URI "
        "(dns:///trunk.internal:50051, ipv4:10.0.0.5:50051,10.0.0.6:50051): round robin over the healthy ones",
    )
    local_trunk: bool = setting(False, None, "run the trunk in this process (no server)")
    trunk_compress: str | None = setting(
        None,
        "GPT2_TRUNK_COMPRESS",
        "what the trunk server's --compress is (the fingerprint covers it; an in-process trunk is compressed so): "
        "none, prune:P, prune24 or int8; unset: the same as --compress",
    )
    stateless: bool = setting(
        False, None, "send the trunk KV cache with every call instead of keeping it on the server"
    )
    wire_dtype: str = setting(
        "float32", "GPT2_WIRE_DTYPE", "dtype of hidden states on the wire", choices=["float32", "float16", "bfloat16"]
    )
    connect_timeout_s: float = setting(5.0, None, "to reach the server, s", flag="--connect-timeout")
    step_timeout_s: float = setting(60.0, None, "one trunk call, s", flag="--step-timeout")
    reconnect_s: float = setting(
        30.0,
        "GPT2_RECONNECT_S",
        "if the trunk goes away mid-generation (its replica died or drained), replay the session on a trunk server "
        "for up to this long, s (0 = don't)",
        flag="--reconnect",
    )
    tls_ca: str | None = setting(None, "GPT2_TLS_CA", "CA of the server's certificate (enables TLS)")
    tls_cert: str | None = setting(None, "GPT2_TLS_CLIENT_CERT", "client certificate, for mutual TLS")
    tls_key: str | None = setting(None, "GPT2_TLS_CLIENT_KEY", "client key, for mutual TLS")
    tls_server_name: str | None = setting(None, None, "the name to check in the server's certificate")
    auth_token: str | None = setting(None, "GPT2_AUTH_TOKEN", "the shared secret the server asks for")
    insecure: bool = setting(
        False, "GPT2_INSECURE", "send --auth-token without TLS to a server beyond loopback (anyone on the way reads it)"
    )
    added_delay_ms: float = setting(
        0.0, None, "sleep this long each way on every trunk call: simulates a remote trunk, ms"
    )
    defence: str = setting(
        "none",
        "GPT2_DEFENCE",
        "what the client does to hidden states before they cross: none, or norm clipping plus gaussian or "
        "laplace noise (docs/privacy.md)",
        choices=list(DEFENCES),
    )
    noise_scale: float = setting(0.0, "GPT2_NOISE_SCALE", "noise std, as a multiple of the reference RMS")
    noise_clip: float = setting(
        0.0, "GPT2_NOISE_CLIP", "clip each position's RMS to this before the noise, which then scales with it; 0 = off"
    )
    denoise: str = setting(
        "none",
        "GPT2_DENOISE",
        "repair the trunk's answer on the client: subtract takes the client's own noise back out of it; a "
        "directory from `python -m client train-denoiser` also repairs what the trunk made of the noise",
    )
    grad_noise: float = setting(
        0.0,
        "GPT2_GRAD_NOISE",
        "split training: secret gaussian noise on the gradient sent back to the trunk, its std a multiple of each "
        "position's gradient RMS, or of --grad-clip (the gradient gives the labels back without it: "
        "docs/privacy.md); 0 = off",
    )
    grad_clip: float = setting(
        0.0,
        "GPT2_GRAD_CLIP",
        "split training: clip each position's gradient to this RMS before --grad-noise, whose std is then "
        "--grad-noise x this whatever the gradient (DP-SGD's Gaussian mechanism, per position); 0 = off",
    )
    defence_seed: int | None = setting(
        None, None, "a fixed secret for the noise, for tests and benchmarks only (logs a warning)", hidden=True
    )
    attack_data: str | None = setting(
        None,
        "GPT2_ATTACK_DATA",
        "public text the privacy meter's attacker trains on: a text file, a directory of them, or bible:PASSAGES "
        "(bible:Gen1:1-Mal4:6, the Old Testament, from Debian's bible-kjv)",
    )

    privacy_meter: bool = setting(
        False,
        "GPT2_PRIVACY_METER",
        "read each prompt back as the trunk's best attacker could, from what was sent (needs --attack-data; "
        "trains the attacker once, then caches it)",
    )
    attack_steps: int = setting(600, None, "training steps of the privacy meter's learned inverter")
    attack_vocab: str = setting(
        "public",
        None,
        "the tokens the privacy meter's attackers read among: public (those of --attack-data) or all (the whole "
        "vocabulary: names and numbers the public text lacks too)",
        choices=["public", "all"],
    )
    attack_candidates: int = setting(
        128,
        None,
        "candidates the meter's exact attacker tries at each position: the learned inverter's best guesses "
        "(0: every token of --attack-vocab; exact, slow on big models)",
    )

    def noise(self) -> Noise:
        """The defence these settings name, checked: a readable error for a bad one."""
        from splitcore.defence import Noise

        if self.defence not in DEFENCES:
            raise InvalidInput(f"unknown defence '{self.defence}'; choose one of {', '.join(DEFENCES)}")
        if self.denoise not in DENOISERS and not Path(self.denoise).is_dir():
            raise InvalidInput(
                f"unknown denoiser '{self.denoise}'; choose {', '.join(DENOISERS)} or a trained denoiser's directory"
            )
        if self.defence == "none":
            if self.denoise != "none":
                raise InvalidInput("--denoise repairs a defence's noise: give --defence gaussian or laplace too")
            if self.noise_scale or self.noise_clip:
                raise InvalidInput("--noise-scale and --noise-clip need a defence: --defence gaussian or laplace")
            return Noise()
        return Noise(self.defence, self.noise_scale, self.noise_clip)

    def grad_noise_defence(self) -> Noise:
        """The defence of the gradient sent to the trunk in split training, checked."""
        from splitcore.defence import Noise

        if not math.isfinite(self.grad_noise) or self.grad_noise < 0:
            raise InvalidInput(f"--grad-noise must be a finite number >= 0, got {self.grad_noise}")
        if not math.isfinite(self.grad_clip) or self.grad_clip < 0:
            raise InvalidInput(f"--grad-clip must be a finite number >= 0, got {self.grad_clip}")
        return Noise("gaussian", self.grad_noise, self.grad_clip)

    def trunk_client_config(self) -> TrunkClientConfig:
        if self.auth_token and not self.tls_ca and not self.insecure and not self.local_trunk:
            hosts = [e.strip().split("///")[-1].rpartition(":")[0] for e in self.server.split(",") if e.strip()]
            beyond = [h for h in hosts if not is_loopback(h)]
            if beyond:
                raise InvalidInput(
                    f"--auth-token would cross to {beyond[0].strip()} in the clear, where anyone on the way can read "
                    "it: give --tls-ca (TLS), or --insecure to send it anyway"
                )
        return TrunkClientConfig(
            self.server,
            self.connect_timeout_s,
            self.step_timeout_s,
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            tls_server_name=self.tls_server_name,
            token=self.auth_token,
        )


CLIENT_TRAIN = ("none", "lora", "full")


def check_client_train(value: str) -> None:
    if value not in CLIENT_TRAIN:
        raise InvalidInput(f"--client-train must be one of {', '.join(CLIENT_TRAIN)}; got '{value}'")


@dataclass
class LoraRecipe:
    """What a training step is (the `train` command, the Fine-tune tab, and each owner's rounds under `federate`):
    the windows, the adapter and its optimizer, and which of the client's parts train."""

    batch_size: int = 8  # windows per step (B)
    block_size: int = 128  # tokens per window (T)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"  # module kinds in each adapted block
    lr: float = 2e-4
    weight_decay: float = 0.0
    eval_batches: int = 8  # held-out batches per evaluation
    client_train: str = "none"  # the client's own parts: none (frozen), lora (adapters), full (every weight)
    seed: int = 0  # adapter initialisation and batch order

    def lora(self) -> LoraSettings:
        from splitcore.lora import LoraSettings

        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoraSettings(
            self.lora_rank, self.lora_alpha, self.lora_dropout, targets, self.lr, self.weight_decay, seed=self.seed
        )


@dataclass
class TrainConfig(LoraRecipe):
    """Settings of one fine-tuning run (the `train` command and the Fine-tune tab)."""

    data: str = ""  # a text file or a directory of them
    steps: int = 200  # optimizer steps
    eval_every: int = 50  # steps between held-out evaluations (and checkpoints); 0 = only at the end
    out: str = "adapters/run"  # where checkpoints and the final adapter go
    resume: bool = False  # go on from the latest checkpoint in `out`
    privacy_weight: float = 0.0  # learned obfuscation: the client's parts also learn to defeat an inverter
    # retrained alongside them, at this weight against the LM loss (needs --client-train lora or full); 0 = off


@dataclass
class FederationConfig(LoraRecipe):
    """The consortium's settings of a federated run (`federate serve`); every owner trains with them."""

    model: str = setting("gpt2", "GPT2_MODEL", "the base model every owner runs: gpt2, trained:kjv, random:tiny...")
    rounds: int = 5  # federated rounds
    local_steps: int = 20  # each owner's optimizer steps in a round
    min_owners: int = 2  # a round starts once this many owners are connected; it averages those that reply
    round_timeout_s: float = 3600.0  # how long a round waits for its owners' replies, s
    out: str = "adapters/federated"  # the averaged adapter, the round checkpoints and federation_log.json
    client_train: str = "lora"  # the owners' own parts: none (frozen), lora (adapters), full (every weight)
    secagg: bool = False  # Flower's SecAgg+: the fed server learns only the owners' weighted sum, not their weights
    secagg_max_weight: int = 1000  # SecAgg+: at least the most training windows an owner holds (precision: docs)

    def check(self) -> None:
        check_client_train(self.client_train)
        if self.secagg and self.min_owners < 2:
            raise InvalidInput(f"--secagg needs --min-owners of at least 2 (a sum of one is that owner's); got "
                               f"{self.min_owners}")  # fmt: skip
        if self.secagg_max_weight < 1:
            raise InvalidInput(f"--secagg-max-weight must be at least 1; got {self.secagg_max_weight}")
        if min(self.rounds, self.local_steps, self.min_owners, self.batch_size, self.eval_batches) < 1:
            raise InvalidInput(
                "need --rounds, --local-steps, --min-owners, --batch-size and --eval-batches of at least 1; got "
                f"{self.rounds}, {self.local_steps}, {self.min_owners}, {self.batch_size}, {self.eval_batches}"
            )
        if self.block_size < 2 or not self.round_timeout_s > 0:
            raise InvalidInput(
                f"need --block-size >= 2 and --round-timeout-s > 0; got {self.block_size} and {self.round_timeout_s}"
            )
        self.lora().check(10**6)

    def to_json(self) -> str:
        """The settings that define the run (not where it is kept: a moved --out resumes)."""
        return json.dumps({k: v for k, v in asdict(self).items() if k != "out"}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FederationConfig:
        return cls(**json.loads(text))
