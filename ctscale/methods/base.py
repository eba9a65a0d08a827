"""What a mask strategy sees of one parameter on one rank, and the strategy protocol.

The seam of ctscale: a backend decides *where* gradients live; a strategy decides *which*
entries survive. Strategies never import a backend, and backends never import a strategy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class GradView:
    """One rank's piece of one parameter's gradient, after reduction, before the optimizer step.

    name:  canonical name (as in the unwrapped Hugging Face model's ``named_parameters``).
    shape: the parameter's global shape.
    start, end: the flat range ``[start, end)`` of the flattened global tensor held here.
    grad:  local 1-D tensor of length ``end - start``; a view into the storage the optimizer
           reads, so in-place edits (``mul_``) are what the optimizer sees. ``None`` where the
           backend only needs the range (mask loading, Fisher buffer allocation).
    owned: ``grad``'s storage is dropped by the backend's ``zero_grad`` and never written again,
           so a consumer that runs just before it may overwrite and keep it (the Fisher pass
           does: its sums need no memory beyond the gradients). False for reused buffers.
    """

    name: str
    shape: tuple[int, ...]
    start: int
    end: int
    grad: torch.Tensor | None = None
    owned: bool = False

    @property
    def numel(self) -> int:
        """Number of elements held here (local)."""
        return self.end - self.start

    @property
    def global_numel(self) -> int:
        return math.prod(self.shape)

    def key(self) -> tuple[str, int]:
        return (self.name, self.start)


@runtime_checkable
class MaskStrategy(Protocol):
    """Decides which gradient entries survive an optimizer step."""

    def apply(self, view: GradView, step: int) -> None:
        """Mask ``view.grad`` in place for optimizer step ``step`` (0-based)."""
        ...

    def state_bytes(self) -> int:
        """Bytes of mask state this rank keeps (0 for a stateless strategy)."""
        ...
