"""PyTorch FSDP2 (``fully_shard``): each rank holds a dim-0 shard of every parameter and gradient.

Layout. ``fully_shard`` turns each parameter into a DTensor with placement ``Shard(0)`` on a 1-D
mesh of all ranks, split like ``torch.chunk``: with ``n`` rows and ``c = ceil(n / world)``, rank
``r`` holds rows ``[min(r*c, n), min((r+1)*c, n))`` (possibly none: a 2-row classifier at world
3 leaves rank 2 empty). Rows are contiguous in the flattened tensor, so the local piece is the
flat range ``[row_start * row_numel, row_end * row_numel)``. Gradients have the same layout.

One optimizer step:

1. ``forward_backward`` per micro-batch; gradient sync is off except on the boundary micro-batch,
   whose backward reduce-scatters the accumulated gradient, averaged over ranks (= the gradient
   of the global batch's mean loss, as in one process).
2. ``grad_views``: the trainer masks the local shards in place (views into the storage AdamW
   reads). No communication.
3. ``step``: clip, then AdamW, then the schedule. The order is **mask, then clip**, the same in
   every ctscale backend: the norm is that of the masked (and, for CT-F, rescaled) gradient.
   Clipping costs one all-reduce of the norm, which vanilla fine-tuning pays too, so masking
   adds no collective.

Launch: ``torchrun --nproc_per_node N -m ctscale train CONFIG --set distributed.backend=fsdp``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from ctscale import dist
from ctscale.backends.base import OptimizerFactory, SchedulerFactory, ShardedStateOptimizer
from ctscale.errors import ConfigError
from ctscale.methods.base import GradView

log = logging.getLogger(__name__)


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: children of the first ``ModuleList`` with more than one element
    (BERT's ``encoder.layer``, Llama/Qwen2's ``model.layers``); empty when there is none."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            return list(module)
    return []


def shard_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a ``rows``-row tensor that ``rank`` holds under ``Shard(0)``
    (``torch.chunk`` semantics, as FSDP2 and DTensor split uneven dims)."""
    chunk = math.ceil(rows / world)
    return min(rank * chunk, rows), min((rank + 1) * chunk, rows)


def shard0_flat_range(name: str, p: torch.nn.Parameter, rank: int, world: int) -> tuple[int, int]:
    """Flat range of the global tensor that ``rank`` of ``world`` holds of a ``Shard(0)``
    DTensor parameter; checked against the real local shard. Also used by ``ctscale.hf``."""
    if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),):
        raise RuntimeError(f"fsdp: {name} is not sharded on dim 0 (placements of a DTensor expected)")
    rows = p.shape[0] if p.dim() else 1
    row_numel = math.prod(p.shape[1:])
    lo, hi = shard_rows(rows, rank, world)
    if p.to_local().numel() != (hi - lo) * row_numel:
        raise RuntimeError(
            f"fsdp: {name} has {p.to_local().numel()} local elements on rank {rank}, "
            f"expected rows [{lo}, {hi}) of {tuple(p.shape)}; FSDP2 changed how it splits dim 0"
        )
    return lo * row_numel, hi * row_numel


def shard0_grad_view(name: str, p: torch.nn.Parameter, start: int, end: int, owned: bool = False) -> GradView:
    """The local (reduce-scattered) gradient shard of ``p`` as a flat view of the storage the
    optimizer reads, for the flat range ``[start, end)`` from ``shard0_flat_range``."""
    if not isinstance(p.grad, DTensor):
        # FSDP2 hooks backward through the tensors it finds in the forward output
        raise RuntimeError(
            f"fsdp: {name} was not resharded after backward; the model must return its "
            "loss inside a ModelOutput, dict or tuple (a pytree FSDP2 can traverse)"
        )
    local = p.grad.to_local()
    if not local.is_contiguous() or local.numel() != end - start:
        # view(-1) of anything else would copy or misplace entries and masks would be lost
        raise RuntimeError(f"fsdp: the local gradient of {name} is not a contiguous shard")
    return GradView(name, tuple(p.shape), start, end, local.view(-1), owned)


class FSDPBackend:
    """FSDP2 over every rank of the launch; a one-rank group at world size 1."""

    def __init__(self, grad_accum: int, max_grad_norm: float, bf16: bool = False) -> None:
        dist.init_from_env()
        if not dist.is_distributed():
            # world size 1 is the same code path: fully_shard needs a (one-rank) process group
            tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.device = dist.default_device()
        self.grad_accum = grad_accum
        self.max_grad_norm = max_grad_norm
        self._grad_norm: torch.Tensor | None = None  # the last step's, from clipping
        self.bf16 = bf16

    def model_init_context(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the model is built whole, then wrapped/sharded

    def setup(
        self, model: torch.nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory
    ) -> None:
        names = [n for n, _ in model.named_parameters()]
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        # fp32 sharded params, grads and optimizer state; bf16 only for compute and all-gathers
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.bf16
            else MixedPrecisionPolicy()
        )
        model.to(self.device)
        blocks = repeated_blocks(model)
        if not blocks and self.rank == 0:
            log.warning(
                "fsdp: %s has no repeated blocks (no ModuleList with >1 element); sharding it as "
                "one unit, so every forward gathers all parameters at once",
                type(model).__name__,
            )
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        self.model: torch.nn.Module = model  # also an FSDPModule now
        if [n for n, _ in model.named_parameters()] != names:  # masks are keyed by these names
            raise RuntimeError("fully_shard changed the parameter names; ctscale cannot key masks")
        self._ranges = {n: self._local_range(n, p) for n, p in model.named_parameters() if p.requires_grad}
        self._make_scheduler = make_scheduler
        self.replace_optimizer(make_optimizer)

    def communicate_survivors(self, strategy: object, step: int) -> None:
        raise ConfigError(
            "train.sparse_grad_comm is only supported with distributed.backend 'ddp'; FSDP2 "
            "reduces through its own collectives (docs/sparse_comm.md)"
        )

    def replace_optimizer(self, make_optimizer: OptimizerFactory) -> None:
        """A new optimizer (and schedule) over the same sharded parameters; before the first step
        (CT-D's child-only AdamW is built from the mask, which exists only after setup)."""
        self.optimizer = make_optimizer(self.model.named_parameters())
        self.scheduler = self._make_scheduler(self.optimizer)

    def _local_range(self, name: str, p: torch.nn.Parameter) -> tuple[int, int]:
        return shard0_flat_range(name, p, self.rank, self.world_size)

    def forward_backward(self, batch: dict[str, torch.Tensor], boundary: bool) -> float:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        # off: keep accumulating unsharded local grads; on: this backward reduce-scatters them
        cast(FSDPModule, self.model).set_requires_gradient_sync(boundary)
        loss = self.model(**batch).loss
        (loss / self.grad_accum).backward()
        return float(loss.detach())

    def grad_views(self) -> Iterator[GradView]:
        """Local (reduced, rank-averaged) gradient shards; flat views of the DTensor's local
        storage, which is what AdamW reads. No communication."""
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                # owned: zero_grad sets grads to None; each reduce-scatter writes a new shard
                yield shard0_grad_view(name, p, *self._ranges[name], owned=True)

    def shard_ranges(self) -> list[GradView]:
        return [GradView(n, self._shape(n), s, e) for n, (s, e) in self._ranges.items()]

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.model.get_parameter(name).shape)  # DTensor shape is global

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: self._shape(n) for n in self._ranges}

    def step(self) -> None:
        if self.max_grad_norm:
            # DTensor-aware: local partial norms, one all-reduce, every rank scales its shard
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self) -> float | None:
        """The last step's global gradient norm before clipping (after the mask), the value
        clipping already all-reduced; None when clipping is off (it is not computed then)."""
        norm = self._grad_norm
        if norm is None:
            return None
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Collective (all-gathers parameters): every rank calls it equally often."""
        batch = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
        return self.model(**batch).logits.float()

    def train_mode(self, training: bool) -> None:
        self.model.train(training)

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: every rank calls it; rank 0 receives the full CPU state dict."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        return cast(dict[str, torch.Tensor], state) if self.rank == 0 else None

    def unwrapped_model(self) -> torch.nn.Module:
        """The sharded model itself: fully_shard keeps the HF class and the parameter names."""
        return self.model

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save_checkpoint(self, path: Path) -> None:
        """Sharded model + optimizer via torch.distributed.checkpoint (each rank writes its own
        shards; loads at any world size), plus the schedule (rank 0) and each rank's RNG.
        An optimizer whose state has no DTensor layout for DCP (``ShardedStateOptimizer``:
        child-only AdamW's packed buffers) writes its own files, which also load at any world size."""
        if isinstance(self.optimizer, ShardedStateOptimizer):
            dcp.save({"model": get_model_state_dict(self.model)}, checkpoint_id=str(path / "dcp"))
            self.optimizer.save_sharded_state(path)
        else:
            model_state, optim_state = get_state_dict(self.model, self.optimizer)
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path / "dcp"))
        if self.rank == 0:
            torch.save({"scheduler": self.scheduler.state_dict()}, path / "scheduler.pt")
        torch.save({"cpu": torch.get_rng_state()}, path / f"rng-{self.rank:05d}.pt")

    def load_checkpoint(self, path: Path) -> None:
        if isinstance(self.optimizer, ShardedStateOptimizer):
            model_state = get_model_state_dict(self.model)
            dcp.load({"model": model_state}, checkpoint_id=str(path / "dcp"))
            set_model_state_dict(self.model, model_state)
            self.optimizer.load_sharded_state(path)
        else:
            model_state, optim_state = get_state_dict(self.model, self.optimizer)
            state: dict[str, Any] = {"model": model_state, "optimizer": optim_state}
            dcp.load(state, checkpoint_id=str(path / "dcp"))  # reshards to this world size
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optimizer"],
            )
        # weights_only: tensors and plain containers only
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True)["scheduler"])
        rng = path / f"rng-{self.rank:05d}.pt"
        if rng.is_file():  # absent when resuming at a larger world size
            torch.set_rng_state(torch.load(rng, weights_only=True)["cpu"])
