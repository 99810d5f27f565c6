"""The protobuf messages that carry the core's objects, each built in one place: the service's name, a model's
fingerprint, an adapter's shape and its optimizer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from splitcomm.proto import trunk_pb2 as pb

if TYPE_CHECKING:
    from splitcore.fingerprint import Fingerprint
    from splitcore.lora import LoraSettings

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
