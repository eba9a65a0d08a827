"""Engines. ``build_backend`` is the only place that chooses one by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ctscale.errors import ConfigError

if TYPE_CHECKING:  # nothing at run time: ctscale.config imports this package
    from ctscale.backends.base import Backend
    from ctscale.config import Config

# distributed.backend's choices, in the order a config error lists them
BACKEND_NAMES = ("local", "ddp", "deepspeed", "fsdp")


def check_section(cfg: Config, where: str = "") -> None:
    """The chosen engine's rules on the config alone (no file read, no engine import). Config
    validation runs them, so ``load_config`` refuses what the engine cannot run; each engine
    keeps its rules in its own module. ``where``: `` in FILE`` for messages, or empty."""
    if cfg.distributed.backend == "deepspeed":
        from ctscale.backends.ds_config import check_section as check_deepspeed_section

        check_deepspeed_section(cfg, where)


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
        from ctscale import dist
        from ctscale.backends.ds_config import build_ds_config

        build_ds_config(cfg, dist.env_world_size())


def build_backend(cfg: Config) -> Backend:
    """The backend ``cfg.distributed.backend`` names; imports DeepSpeed only when asked for."""
    check_config(cfg)
    name = cfg.distributed.backend
    t = cfg.train
    if name in ("local", "ddp"):
        from ctscale.backends.local import LocalBackend

        return LocalBackend(
            t.grad_accum, t.max_grad_norm, t.bf16, ddp=name == "ddp", sparse_grad_comm=t.sparse_grad_comm
        )
    if name == "fsdp":
        from ctscale.backends.fsdp import FSDPBackend

        return FSDPBackend(t.grad_accum, t.max_grad_norm, t.bf16)
    if name == "deepspeed":
        from ctscale.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg)
    raise ValueError(f"unknown backend {name!r}")  # config validation rejects this first
