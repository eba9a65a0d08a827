"""What the trainer needs from a task: batches by example index, a model, and scores."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ctscale.config import ModelConfig

Predict = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # batch -> logits (local, no grad)


class TaskData(Protocol):
    """A task's training and evaluation data, tokenised on demand.

    ``train_batch`` returns the model inputs for this rank's part of one micro-step;
    ``window`` is the whole global batch (every rank and micro-step), from which a task can take
    a normaliser that is the same at any world size (e.g. the global number of target tokens).
    """

    @property
    def eval_splits(self) -> tuple[str, ...]: ...

    @property
    def train_size(self) -> int: ...

    def load_model(self, cfg: ModelConfig) -> torch.nn.Module: ...

    def train_batch(
        self, indices: torch.Tensor, window: torch.Tensor, parts: int
    ) -> dict[str, torch.Tensor]: ...

    def evaluate(
        self, split: str, predict: Predict, rank: int, world_size: int, batch_size: int
    ) -> dict[str, float]:
        """Scores of ``split``; each rank predicts a shard. Collective."""
        ...


def subsample(examples, limit: int | None, seed: int):
    """The first ``limit`` examples of a seeded permutation, in their original order."""
    if limit is None or limit >= len(examples):
        return examples
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    return examples.subset(sorted(order[:limit].tolist()))
