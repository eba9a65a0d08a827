"""Vanilla fine-tuning: no mask, every entry trains."""

from __future__ import annotations

from ctscale.methods.base import GradView
from ctscale.methods.registry import MethodSpec, register_method


class NoMask:
    """Every entry survives."""

    def apply(self, view: GradView, step: int) -> None:
        return None

    def state_bytes(self) -> int:
        return 0


SPEC = register_method(
    MethodSpec(
        name="vanilla",
        summary="plain fine-tuning, every entry trains",
        build=lambda ctx: NoMask(),
        plan=lambda cfg, train_size: "none (vanilla: every entry trains)",
    )
)
