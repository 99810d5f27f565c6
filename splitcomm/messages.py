"""The protobuf messages that carry the core's objects, each built and parsed in one place: the service's name, a
model's fingerprint, an adapter's shape, its optimizer and its state. `client/` builds no message itself and imports
no generated module: the names below are what it sees of the wire."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from splitcomm.codec import decode_named, encode_named
from splitcomm.proto import trunk_pb2 as pb
from splitcore.errors import InvalidInput

if TYPE_CHECKING:
    from splitcore.fingerprint import Fingerprint
    from splitcore.lora import LoraSettings

# The messages a client reads (annotations; it builds none of them itself)
ServerInfo, MonitorSample, AdapterState, LoraSpec = pb.ServerInfo, pb.MonitorSample, pb.AdapterState, pb.LoraSpec
FingerprintMsg = pb.Fingerprint

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Trunk"].full_name  # what a replica's health check names


def fingerprint_msg(fp: Fingerprint) -> pb.Fingerprint:
    return pb.Fingerprint(**fp.to_dict(), digest=fp.digest)


def lora_spec(settings: LoraSettings) -> pb.LoraSpec:
    return pb.LoraSpec(
        rank=settings.rank, alpha=settings.alpha, dropout=settings.dropout, target_modules=settings.targets
    )


def optimizer_spec(settings: LoraSettings) -> pb.OptimizerSpec:
    return pb.OptimizerSpec(
        name="adamw",
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        beta1=settings.betas[0],
        beta2=settings.betas[1],
        eps=settings.eps,
    )


def settings_from_pb(lora: pb.LoraSpec, opt: pb.OptimizerSpec, seed: int) -> LoraSettings:
    """The adapter and optimizer a session asks for (what `lora_spec` and `optimizer_spec` sent); a field left at 0
    takes the default."""
    from splitcore.lora import LoraSettings  # peft, and through it transformers: the network layer stays without

    d = LoraSettings()
    if opt.name and opt.name.lower() != "adamw":
        raise InvalidInput(f"optimizer '{opt.name}' is not supported; use adamw")
    return LoraSettings(
        rank=lora.rank or d.rank,
        alpha=lora.alpha or d.alpha,
        dropout=lora.dropout,
        targets=tuple(lora.target_modules) or d.targets,
        lr=opt.lr or d.lr,
        weight_decay=opt.weight_decay,
        betas=(opt.beta1 or d.betas[0], opt.beta2 or d.betas[1]),
        eps=opt.eps or d.eps,
        seed=seed,
    )


def adapter_state(
    weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor] | None = None, steps: int = 0
) -> pb.AdapterState:
    """An adapter's trunk share (and its optimizer's moments and steps, to resume training)."""
    return pb.AdapterState(weights=encode_named(weights), optimizer=encode_named(moments or {}), optimizer_steps=steps)


def read_adapter_state(
    state: pb.AdapterState, max_elements: int = 1 << 31
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """What `adapter_state` sent, each tensor checked as `codec.decode` checks it: (weights, moments, steps)."""
    weights = decode_named(state.weights, max_elements, "adapter tensor")
    moments = decode_named(state.optimizer, max_elements, "optimizer state")
    return weights, moments, int(state.optimizer_steps)


def train_open(fingerprint: pb.Fingerprint, settings: LoraSettings, resume: pb.AdapterState) -> pb.TrainOpen:
    """The first message of a training session."""
    return pb.TrainOpen(
        fingerprint=fingerprint,
        lora=lora_spec(settings),
        optimizer=optimizer_spec(settings),
        seed=settings.seed,
        resume=resume,
    )


def message_dict(msg) -> dict:
    """Field name -> value, numbers kept as numbers (MessageToDict would turn uint64 into strings)."""
    return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}
