"""Vanilla fine-tuning: no mask, every entry trains."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ctscale.errors import ConfigError
from ctscale.methods.base import GradView
from ctscale.methods.registry import MethodSpec, register_method

if TYPE_CHECKING:
    from ctscale.config import Config


class NoMask:
    """Every entry survives."""

    def apply(self, view: GradView, step: int) -> None:
        return None

    def state_bytes(self) -> int:
        return 0


def check(cfg: Config, where: str) -> None:
    if cfg.train.sparse_grad_comm:
        raise ConfigError(
            f"train.sparse_grad_comm sends only the child network's gradients, and method.name "
            f"'vanilla' has none{where}; set method.name to ct-d or ct-f, or "
            "train.sparse_grad_comm=false"
        )


SPEC = register_method(
    MethodSpec(
        name="vanilla",
        summary="plain fine-tuning, every entry trains",
        build=lambda ctx: NoMask(),
        plan=lambda cfg, train_size: "none (vanilla: every entry trains)",
        check=check,
    )
)
