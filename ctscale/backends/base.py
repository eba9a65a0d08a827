"""What the trainer needs from an engine. Backends decide where gradients live and when.

Protocol, not a base class: backends share no implementation (house rule 3, CONTRIBUTING.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import torch

from ctscale.methods.base import GradView

NamedParams = Iterable[tuple[str, torch.nn.Parameter]]
OptimizerFactory = Callable[[NamedParams], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class Backend(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def model_init_context(self) -> AbstractContextManager[None]:
        """Where the trainer builds the model (DeepSpeed ZeRO-3: partitioned as it is built)."""
        ...

    def setup(
        self,
        model: torch.nn.Module,
        make_optimizer: OptimizerFactory,
        make_scheduler: SchedulerFactory,
    ) -> None:
        """Wrap/shard ``model`` and build its optimizer and scheduler.

        ``make_optimizer`` receives (canonical name, parameter) pairs of the parameters the
        optimizer will own (DTensors under FSDP2).
        """
        ...

    def forward_backward(self, batch: dict[str, torch.Tensor], boundary: bool) -> float:
        """One micro-batch: forward, loss scaled for accumulation, backward.

        When ``boundary`` is True this is the last micro-batch of the optimizer step and, on
        return, gradients are reduced across ranks and ready for ``grad_views``. Returns the
        local, unscaled mean loss of the micro-batch.
        """
        ...

    def grad_views(self) -> Iterator[GradView]:
        """This rank's reduced gradient shards, one view per (parameter, local flat range).

        Valid after a boundary ``forward_backward`` and before ``step``/``zero_grad``; views
        alias the storage the optimizer reads. Parameters without a gradient are skipped.
        """
        ...

    def shard_ranges(self) -> list[GradView]:
        """The (name, shape, start, end) of every local shard, ``grad=None``. Any time after setup."""
        ...

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical name -> global shape of every trainable parameter, the same on every rank."""
        ...

    def step(self) -> None:
        """Clip (``max_grad_norm``), optimizer step, scheduler step, zero the gradients."""
        ...

    def grad_norm(self) -> float | None:
        """The last ``step``'s global gradient norm before clipping (after the mask), the same
        on every rank; from the clipping the backend does anyway (no extra collective). None
        where it was not computed (clipping off under local/DDP/FSDP2). Call on every rank."""
        ...

    def zero_grad(self) -> None:
        """Drop the gradients without stepping (the Fisher pass)."""
        ...

    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of ``batch`` in eval mode without gradients (collective under sharding)."""
        ...

    def train_mode(self, training: bool) -> None: ...

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full model state dict (canonical names, CPU) on rank 0; None on other ranks."""
        ...

    def unwrapped_model(self) -> torch.nn.Module:
        """The Hugging Face model with canonical parameter names (shards under ZeRO-3/FSDP2)."""
        ...

    def lr(self) -> float: ...

    def save_checkpoint(self, path: Path) -> None:
        """Write model, optimizer, scheduler and RNG state into the existing directory ``path``.

        Collective; each rank writes its own files (nothing is written twice).
        """
        ...

    def load_checkpoint(self, path: Path) -> None:
        """Restore what ``save_checkpoint`` wrote; a clear error where the world size cannot change."""
        ...
