"""What the trainer needs from an engine. Backends decide where gradients live and when.

Protocol, not a base class: backends share no implementation (house rule 3, CONTRIBUTING.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ctscale.methods.base import GradView

NamedParams = Iterable[tuple[str, torch.nn.Parameter]]
OptimizerFactory = Callable[[NamedParams], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class ShardViews(Protocol):
    """Where this rank's gradients live: what a mask needs from an engine. Every ``Backend``
    provides it, and so do the Hugging Face Trainer adapters (``ctscale.backends.hf_views``)."""

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical name -> global shape of every trainable parameter, the same on every rank."""
        ...

    def shard_ranges(self) -> list[GradView]:
        """The (name, shape, start, end) of every local shard, ``grad=None``."""
        ...

    def grad_views(self) -> Iterator[GradView]:
        """This rank's reduced gradient shards, flat views of the storage the optimizer reads."""
        ...


@runtime_checkable
class ShardedStateOptimizer(Protocol):
    """An optimizer that writes its own state into a checkpoint directory: state without a layout
    the engine's checkpointing knows (child-only AdamW's packed buffers have no DTensor
    placement for ``torch.distributed.checkpoint``). A sharded backend checks for these two
    methods, never for an optimizer class, and saves only the model itself then.

    Both are collective: every rank calls them, each writes/reads its own files in ``path``.
    """

    def save_sharded_state(self, path: Path) -> None: ...

    def load_sharded_state(self, path: Path) -> None: ...


class Backend(Protocol):
    """Everything the trainer, the checkpoint manager and the mask code call on an engine.
    ``tests/test_backend_contract.py`` and mypy (``build_backend`` returns this type) check that
    every backend class has each member with the same parameters."""

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

    def replace_optimizer(self, make_optimizer: OptimizerFactory) -> None:
        """A new optimizer (and schedule) over the parameters ``setup`` wrapped, before the first
        step: CT-D's child-only AdamW is built from the mask, which exists only after setup.
        An engine that cannot raises ``ctscale.errors.ConfigError`` (DeepSpeed: ZeRO's optimizer
        owns the master partitions); its config rules (``check_section``) refuse such a run first.
        """
        ...

    def communicate_survivors(self, strategy: object, step: int) -> None:
        """``train.sparse_grad_comm``: from the next boundary backward on, reduce only the
        gradient entries ``strategy`` keeps at optimizer step ``step`` (it has ``survivors``).
        Only DDP can (a communication hook); the others raise ``ConfigError``, and
        ``check_config`` refuses such a run before any engine starts."""
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

        Collective; each rank writes its own files (nothing is written twice). A sharded engine
        lets a ``ShardedStateOptimizer`` write its own state (its hooks, not its class, decide).
        """
        ...

    def load_checkpoint(self, path: Path) -> None:
        """Restore what ``save_checkpoint`` wrote; a clear error where the world size cannot change."""
        ...
