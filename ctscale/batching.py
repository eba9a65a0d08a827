"""Global batches that are the same at any world size.

A global batch (``train.batch_size`` examples) is cut into ``grad_accum`` micro-steps; each
micro-step into ``world_size`` equal parts, one per rank. The global batches themselves come
from a seeded permutation per epoch and never depend on the world size, so a 1-rank and a
3-rank run see the same examples in the same optimizer steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ctscale.errors import ConfigError


def micro_batch_size(global_batch: int, grad_accum: int, world_size: int) -> int:
    """Examples per rank per micro-step; errors when the global batch does not split evenly."""
    parts = grad_accum * world_size
    if global_batch % parts:
        raise ConfigError(
            f"train.batch_size={global_batch} is not divisible by grad_accum x world size = "
            f"{grad_accum} x {world_size}; choose a batch size that is a multiple of {parts}"
        )
    return global_batch // parts


def epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The example order of one epoch: a permutation seeded by (seed, epoch) only."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=gen)


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches per epoch (the last partial batch is dropped)."""
    return num_examples // global_batch


def global_batch_indices(order: torch.Tensor, step: int, global_batch: int) -> torch.Tensor:
    """The example indices of optimizer step ``step`` in an epoch's ``order`` (every rank's)."""
    return order[step * global_batch : (step + 1) * global_batch]


def rank_micro_batches(
    order: torch.Tensor, step: int, global_batch: int, grad_accum: int, rank: int, world_size: int
) -> Iterator[torch.Tensor]:
    """The example indices rank ``rank`` uses in each micro-step of optimizer step ``step``."""
    micro = micro_batch_size(global_batch, grad_accum, world_size)
    batch = global_batch_indices(order, step, global_batch)
    for m in range(grad_accum):
        lo = (m * world_size + rank) * micro
        yield batch[lo : lo + micro]


def eval_shard(num_examples: int, rank: int, world_size: int) -> tuple[torch.Tensor, int]:
    """This rank's evaluation indices, padded so that every rank runs as many batches.

    Returns (indices, number of real ones); padding repeats index 0 and is dropped after.
    """
    per_rank = -(-num_examples // world_size)
    idx = torch.arange(rank * per_rank, min((rank + 1) * per_rank, num_examples))
    real = idx.numel()
    return torch.cat([idx, torch.zeros(per_rank - real, dtype=torch.long)]), real
