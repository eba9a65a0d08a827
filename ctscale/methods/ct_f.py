"""CT-F (task-free Child-Tuning): a fresh Bernoulli(p) child network every optimizer step."""

from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING

import torch

from ctscale.methods.base import GradView
from ctscale.methods.counter_rng import keep_and_rescale_, mask_seed
from ctscale.methods.registry import ChildSummary, MethodSpec, register_method

if TYPE_CHECKING:
    from ctscale.config import Config


class RandomChildMask:
    """``grad <- grad * M / p`` with ``M ~ Bernoulli(p)`` drawn per entry per step.

    Every parameter the optimizer sees is masked (as in the reference). The draw is a pure
    function of (seed, step, canonical name, flat index), so it needs no state, no
    communication, and is the same at any world size, stage or backend.
    """

    KERNELS = ("auto", "eager", "compiled")

    def __init__(self, reserve_p: float, seed: int, kernel: str = "auto") -> None:
        """``kernel``: "compiled" fuses hash, draw and rescale with ``torch.compile`` (Triton on
        GPU, C++ on CPU: ~4x faster than "eager", at the cost of a compilation per process);
        "auto" compiles on CUDA GPUs with Triton only. Every kernel gives the same bits."""
        if kernel not in self.KERNELS:
            raise ValueError(f"CT-F kernel must be one of {self.KERNELS}, got {kernel!r}")
        self.reserve_p = reserve_p
        self.seed = seed
        self.kernel = kernel

    def apply(self, view: GradView, step: int) -> None:
        if view.numel == 0:
            return
        assert view.grad is not None  # grad_views() always carries the gradient
        compiled = self.kernel == "compiled" or (self.kernel == "auto" and _triton_gpu(view.grad.device))
        keep_and_rescale_(view.grad, self.seed, step, view.name, view.start, self.reserve_p, compiled)

    survivors_fixed = False  # a fresh child network every step

    def survivors(self, view: GradView, step: int) -> torch.Tensor:
        """Bool over ``view``'s local entries: True where ``apply`` keeps the gradient at ``step``.

        Drawn by ``apply``'s own kernel (on ones), so the two can never disagree. Read by the
        sparse DDP communication hook, which runs before ``apply``."""
        ones = torch.ones(view.numel, dtype=torch.float32)
        if view.numel:
            keep_and_rescale_(ones, self.seed, step, view.name, view.start, self.reserve_p)
        return ones != 0

    def state_bytes(self) -> int:
        return 0


def _triton_gpu(device: torch.device) -> bool:
    """Whether "auto" compiles: a CUDA device with Triton installed (the bits are the same
    either way, so elsewhere the eager kernel runs)."""
    return device.type == "cuda" and _has_triton()


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _describe(cfg: Config, mask_path: str | None, seconds: dict[str, float]) -> ChildSummary:
    return ChildSummary(f"ct-f, a fresh random child every step, p={cfg.method.reserve_p}")


SPEC = register_method(
    MethodSpec(
        name="ct-f",
        summary="Child-Tuning-F: a fresh Bernoulli(p) child network every step, gradients * M / p",
        build=lambda ctx: RandomChildMask(
            ctx.cfg.method.reserve_p, mask_seed(ctx.cfg), ctx.cfg.method.ctf_kernel
        ),
        plan=lambda cfg, train_size: (
            f"CT-F: a fresh Bernoulli(p={cfg.method.reserve_p}) mask every step, seed {mask_seed(cfg)}"
        ),
        describe=_describe,
    )
)
