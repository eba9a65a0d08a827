"""Engines. ``build_backend`` is the only place that chooses one by name."""

from __future__ import annotations

from ctscale import dist
from ctscale.backends.base import Backend
from ctscale.config import Config
from ctscale.errors import ConfigError


def check_config(cfg: Config) -> None:
    """The engine's own checks of ``cfg`` that need no engine: a bad DeepSpeed JSON fails here,
    in about a second, before any process group, ``import deepspeed`` or model load."""
    if cfg.train.sparse_grad_comm and cfg.distributed.backend != "ddp":
        raise ConfigError(
            f"train.sparse_grad_comm is only supported with distributed.backend 'ddp' (a DDP "
            f"communication hook), got {cfg.distributed.backend!r}; use distributed.backend=ddp "
            "or set train.sparse_grad_comm=false (docs/sparse_comm.md says why FSDP2 and ZeRO "
            "cannot take it)"
        )
    if cfg.distributed.backend == "deepspeed":
        from ctscale.backends.ds_config import build_ds_config

        build_ds_config(cfg, dist.env_world_size())


def build_backend(cfg: Config) -> Backend:
    """The backend ``cfg.distributed.backend`` names; imports DeepSpeed only when asked for."""
    check_config(cfg)
    name = cfg.distributed.backend
    common = dict(grad_accum=cfg.train.grad_accum, max_grad_norm=cfg.train.max_grad_norm, bf16=cfg.train.bf16)
    if name in ("local", "ddp"):
        from ctscale.backends.local import LocalBackend

        return LocalBackend(ddp=name == "ddp", sparse_grad_comm=cfg.train.sparse_grad_comm, **common)
    if name == "fsdp":
        from ctscale.backends.fsdp import FSDPBackend

        return FSDPBackend(**common)
    if name == "deepspeed":
        from ctscale.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg)
    raise ValueError(f"unknown backend {name!r}")  # config validation rejects this first
