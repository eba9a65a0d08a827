"""A DDP communication hook that all-reduces only the gradient entries the mask keeps.

Child-Tuning zeroes a fraction ``1 - p`` of every candidate gradient right after DDP has
all-reduced it. Every rank knows the mask without communication (CT-D's is fixed, CT-F's is a
pure function of (seed, step, name, index)), so the hook sends only the survivors:

    per bucket: packed = buffer[survivors] * (1 / world)   # gather
                all_reduce(packed, SUM)                     # p x the candidate bytes
                buffer = 0; buffer[survivors] = packed      # scatter; others stay 0

The strategy's ``apply`` still runs after the backward as before: it zeroes what is zero already
and applies CT-F's ``1/p`` once (the hook never rescales). The kept values are the same
all-reduce of the same numbers as DDP's own path, which also scales by ``1 / world`` before
summing, so the update equals DDP's bit for bit where the sum order is the same (2 ranks: a + b
is commutative; at 3 ranks gloo's ring may add in another order: rounding only).

The strategy tells which local entries survive (duck-typed, no method named here):
``strategy.survivors(view, step)`` -> bool tensor over the view's entries, or None when every
entry survives (a non-candidate tensor), and ``strategy.survivors_fixed`` (True: the same at
every step, so the bucket's index map is built once per bucket layout).

Used through ``DistributedDataParallel.register_comm_hook`` (the PowerSGD API). DDP's
``no_sync`` micro-batches never call it: it runs on the boundary backward of each optimizer
step, with the step the trainer passes (``use``), the same number ``apply`` gets.
"""

# no ``from __future__ import annotations``: DDP checks the hook's annotations at run time
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist

from ctscale.errors import ConfigError
from ctscale.methods.base import GradView


@dataclass
class CommCounts:
    """Elements this rank put into all-reduces since the last ``reset`` (local counts)."""

    sent: int = 0  # elements all-reduced (packed)
    dense: int = 0  # elements DDP's own hook would have all-reduced
    candidate_sent: int = 0  # of ``sent``, entries of tensors the mask thins
    candidate_dense: int = 0  # of ``dense``, entries of tensors the mask thins
    calls: int = 0  # bucket all-reduces

    def reset(self) -> None:
        self.sent = self.dense = self.candidate_sent = self.candidate_dense = self.calls = 0


@dataclass
class _BucketMap:
    index: torch.Tensor  # positions in the bucket buffer that are all-reduced (int32: 4 bytes each)
    candidate_kept: int
    candidate_total: int


@dataclass
class SparseCommState:
    """Per process: the names of the model's parameters, the strategy and step of the current
    optimizer step, the cached index maps of fixed masks, and the element counters."""

    names: dict[torch.Tensor, str]  # parameter -> canonical name (a lookup for the bucket, not a mask key)
    world_size: int
    # duck-typed (``survivors``, ``survivors_fixed``): an engine names no method class
    strategy: Any = None  # None: dense all-reduce (Fisher pass, before training)
    step: int = 0
    counts: CommCounts = field(default_factory=CommCounts)
    # fixed masks' index maps, per strategy (a strategy that is dropped takes its maps along)
    _fixed: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)

    def use(self, strategy: object, step: int) -> None:
        """Send only ``strategy``'s survivors of step ``step`` from the next boundary backward on."""
        if not callable(getattr(strategy, "survivors", None)):
            raise ConfigError(
                f"train.sparse_grad_comm needs a mask strategy that knows its surviving entries "
                f"(ct-d, ct-f); {type(strategy).__name__} does not; set train.sparse_grad_comm=false"
            )
        self.strategy, self.step = strategy, step

    def bucket_map(self, bucket: tdist.GradBucket) -> _BucketMap | None:
        """Where the survivors of ``bucket`` lie in its flat buffer; None: send it whole."""
        if self.strategy is None:
            return None
        buffer = bucket.buffer()
        layout = [
            (self.names[p], g.storage_offset() - buffer.storage_offset(), tuple(p.shape))
            for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True)
        ]
        fixed = bool(getattr(self.strategy, "survivors_fixed", False))
        key = (bucket.index(), tuple(layout))  # DDP rebuilds its buckets after the first step
        if not fixed:
            return self._build(layout, buffer.numel(), buffer.device)
        maps = self._fixed.setdefault(self.strategy, {})
        if key not in maps:
            maps[key] = self._build(layout, buffer.numel(), buffer.device)
        return maps[key]

    def _build(self, layout, numel: int, device: torch.device) -> _BucketMap:
        keep = torch.ones(numel, dtype=torch.bool, device=device)
        kept = total = 0
        for name, offset, shape in layout:
            size = math.prod(shape)
            survivors = self.strategy.survivors(GradView(name, shape, 0, size), self.step)
            if survivors is None:
                continue
            keep[offset : offset + size] = survivors.to(device)
            kept += int(survivors.sum())
            total += size
        dtype = torch.int32 if numel < 2**31 else torch.int64
        return _BucketMap(keep.nonzero().view(-1).to(dtype), kept, total)


def sparse_allreduce_hook(
    state: SparseCommState, bucket: tdist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """All-reduce (mean) the surviving entries of ``bucket``; the others come back 0.

    ``bucket.buffer()`` holds this rank's local (accumulated) gradients, before reduction;
    the returned future's tensor is the reduced bucket DDP copies into ``param.grad``.
    """
    buffer = bucket.buffer()
    layout = state.bucket_map(bucket)
    counts = state.counts
    counts.calls += 1
    counts.dense += buffer.numel()
    scale = 1.0 / state.world_size  # multiplied, as DDP's reducer does without a hook (same bits)
    if layout is None:
        counts.sent += buffer.numel()
        fut = tdist.all_reduce(buffer.mul_(scale), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    packed = buffer.index_select(0, layout.index).mul_(scale)
    counts.sent += packed.numel()
    counts.candidate_sent += layout.candidate_kept
    counts.candidate_dense += layout.candidate_total

    def unpack(fut: torch.futures.Future) -> torch.Tensor:
        buffer.zero_()
        buffer.index_put_((layout.index,), fut.value()[0])
        return buffer

    return tdist.all_reduce(packed, async_op=True).get_future().then(unpack)


def install(ddp: torch.nn.parallel.DistributedDataParallel, model: torch.nn.Module) -> SparseCommState:
    """Register the hook on ``ddp`` (before its first backward, as DDP requires); until ``use``
    is called it all-reduces whole buckets, as DDP's own path does."""
    state = SparseCommState(
        names={p: n for n, p in model.named_parameters()}, world_size=tdist.get_world_size()
    )
    ddp.register_comm_hook(state, sparse_allreduce_hook)
    return state
