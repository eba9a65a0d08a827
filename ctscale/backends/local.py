"""One process (world size 1) and PyTorch DDP: every rank holds whole gradients.

Under DDP the gradient is all-reduced during backward; each rank then masks its own full
copy identically (masks are pure functions), so masking adds no communication. With
``sparse_grad_comm`` a communication hook (``ctscale.backends.sparse_comm``) all-reduces only
the entries the mask keeps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import load_model, save_model
from torch.nn.parallel import DistributedDataParallel

from ctscale import dist
from ctscale.backends import sparse_comm
from ctscale.backends.base import OptimizerFactory, SchedulerFactory
from ctscale.backends.sparse_comm import SparseCommState
from ctscale.methods.base import GradView
from ctscale.models import parameter_shapes


class LocalBackend:
    """World size 1 (``ddp=False``) or DistributedDataParallel over torch.distributed."""

    def __init__(
        self,
        grad_accum: int,
        max_grad_norm: float,
        bf16: bool = False,
        ddp: bool = False,
        sparse_grad_comm: bool = False,
    ):
        if ddp:
            dist.init_from_env()
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.device = dist.default_device()
        self.grad_accum = grad_accum
        self.max_grad_norm = max_grad_norm
        self.bf16 = bf16
        self.ddp = ddp and self.world_size > 1
        self._grad_norm: torch.Tensor | None = None
        self.sparse_grad_comm = sparse_grad_comm
        self.comm: SparseCommState | None = None  # the hook's state, under DDP with sparse_grad_comm

    def model_init_context(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the model is built whole, then wrapped/sharded

    def setup(
        self, model: torch.nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory
    ):
        self.model = model.to(self.device)
        self.engine: torch.nn.Module = self.model
        if self.ddp:
            self.engine = ddp = DistributedDataParallel(self.model)
            if self.sparse_grad_comm:  # DDP takes a hook before its first backward only
                self.comm = sparse_comm.install(ddp, self.model)
        self._make_scheduler = make_scheduler
        self.replace_optimizer(make_optimizer)

    def replace_optimizer(self, make_optimizer: OptimizerFactory) -> None:
        """A new optimizer (and schedule) over the same parameters; before the first step
        (CT-D's child-only AdamW is built from the mask, which exists only after setup)."""
        self.optimizer = make_optimizer(self.model.named_parameters())
        self.scheduler = self._make_scheduler(self.optimizer)

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def forward_backward(self, batch: dict[str, torch.Tensor], boundary: bool) -> float:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        sync = (
            contextlib.nullcontext()
            if (boundary or not self.ddp)
            else cast(DistributedDataParallel, self.engine).no_sync()
        )
        with sync:
            with self._autocast():
                loss = self.engine(**batch).loss
            (loss / self.grad_accum).backward()
        return float(loss.detach())

    def communicate_survivors(self, strategy: object, step: int) -> None:
        """From the next boundary backward on, all-reduce only what ``strategy`` keeps at
        optimizer step ``step`` (``train.sparse_grad_comm``; no communication at world size 1)."""
        if self.comm is not None:
            self.comm.use(strategy, step)

    def grad_views(self) -> Iterator[GradView]:
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                # zero_grad sets grads to None: each backward allocates new ones
                yield GradView(name, tuple(p.shape), 0, p.numel(), p.grad.view(-1), owned=True)

    def shard_ranges(self) -> list[GradView]:
        return [
            GradView(n, tuple(p.shape), 0, p.numel())
            for n, p in self.model.named_parameters()
            if p.requires_grad
        ]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return parameter_shapes(self.model)

    def step(self) -> None:
        if self.max_grad_norm:  # whole (all-reduced) gradients: the norm is local, no collective
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self) -> float | None:
        """The last step's global gradient norm before clipping (after the mask); None when
        clipping is off (it is not computed then)."""
        return None if self._grad_norm is None else float(self._grad_norm)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
        with self._autocast():
            return self.model(**batch).logits.float()

    def train_mode(self, training: bool) -> None:
        self.model.train(training)

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.rank != 0:
            return None
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def unwrapped_model(self) -> torch.nn.Module:
        return self.model

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save_checkpoint(self, path: Path) -> None:
        # DDP replicas are identical: rank 0 writes the state, every rank its RNG state
        if self.rank == 0:
            save_model(self.model, str(path / "model.safetensors"))
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            torch.save(state, path / "optimizer.pt")
        torch.save({"cpu": torch.get_rng_state()}, path / f"rng-{self.rank:05d}.pt")

    def load_checkpoint(self, path: Path) -> None:
        load_model(self.model, str(path / "model.safetensors"), device=str(self.device))
        # weights_only: tensors and plain containers only, nothing is unpickled beyond that
        state = torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = path / f"rng-{self.rank:05d}.pt"
        if rng.is_file():  # absent when resuming at a larger world size
            torch.set_rng_state(torch.load(rng, weights_only=True)["cpu"])
