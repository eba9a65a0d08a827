"""Engines. ``build_backend`` is the only place that chooses one by name."""

from __future__ import annotations

from ctscale.backends.base import Backend
from ctscale.config import Config


def build_backend(cfg: Config) -> Backend:
    """The backend ``cfg.distributed.backend`` names; imports DeepSpeed only when asked for."""
    name = cfg.distributed.backend
    common = dict(grad_accum=cfg.train.grad_accum, max_grad_norm=cfg.train.max_grad_norm, bf16=cfg.train.bf16)
    if name in ("local", "ddp"):
        from ctscale.backends.local import LocalBackend

        return LocalBackend(ddp=name == "ddp", **common)
    if name == "fsdp":
        from ctscale.backends.fsdp import FSDPBackend

        return FSDPBackend(**common)
    if name == "deepspeed":
        from ctscale.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg)
    raise ValueError(f"unknown backend {name!r}")  # config validation rejects this first
