"""Diagonal Fisher information on sharded gradients, and the global top-p child network.

Estimator (the same at any world size): for each global batch b, take the gradient of the
mean loss over the whole global batch, ``g_b`` (what every backend holds after its reduction:
the average over ranks of each rank's mean-loss gradient, i.e. the global-batch gradient).
Clip each tensor's ``g_b`` to norm ``max_grad_norm`` (the reference's per-tensor clip; the
norm is of the whole tensor, summed over its shards), square it entry-wise, and average over
batches: ``F = mean_b clip(g_b)**2``. Because ``g_b`` depends only on which examples form
batch b, not on how they are split over ranks or micro-batches, neither does F (up to the
floating-point rounding of the reduction).

Dropout: by default (``fisher.dropout: false``) the pass runs with dropout off (``fisher_mode``),
so ``g_b`` is a deterministic function of the weights and the examples of batch b. With dropout
on (the reference's choice) every rank draws its own dropout bits for its part of the batch, so
F, and the mask, would change with the world size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from ctscale import dist
from ctscale.errors import CtscaleError, MaskError
from ctscale.methods.base import GradView
from ctscale.methods.ct_d.topk import Key, select_top_k

log = logging.getLogger(__name__)


def candidate_filter(patterns: Sequence[str], exclude: Sequence[str] = ()) -> Callable[[str], bool]:
    """Predicate on canonical names: matches any of ``patterns`` and none of ``exclude``."""
    include = [re.compile(p) for p in patterns]
    skip = [re.compile(p) for p in exclude]

    def is_candidate(name: str) -> bool:
        return any(p.search(name) for p in include) and not any(p.search(name) for p in skip)

    return is_candidate


def no_candidates(method: str) -> MaskError:
    """The error for ``fisher.candidates`` that match no parameter (the method would be vanilla)."""
    return MaskError(
        f"no parameter matches fisher.candidates: {method} would train nothing differently "
        "from vanilla. Fix the patterns (they are regexes searched in parameter names)"
    )


@contextlib.contextmanager
def fisher_mode(
    model: torch.nn.Module, dropout: bool
) -> Iterator[Callable[[], contextlib.AbstractContextManager[None]]]:
    """Run the Fisher pass inside this; it yields ``model_step``, a context manager to put
    around the model's forward and backward passes of each batch (not the data loading).

    The global RNG is forked: the pass leaves the generators as it found them, so training
    after a Fisher pass draws the same dropout bits as training from a loaded mask.

    ``dropout=False``: every ``nn.Dropout``-family module gets ``p = 0`` and every float
    attribute whose name contains ``dropout`` (Hugging Face's functional attention and
    activation dropout rates) is set to 0, and restored on exit. Not ``model.eval()``: that
    would also switch off gradient checkpointing (Hugging Face checks ``self.training``) and
    any other train-only behaviour. ``model_step`` then raises if the model drew random numbers
    (a random layer this does not know, e.g. LayerDrop): that would make the mask depend on how
    a batch is split over ranks.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        if dropout:
            yield contextlib.nullcontext
            return
        saved = _zero_dropout(model)

        @contextlib.contextmanager
        def model_step() -> Iterator[None]:
            before = _rng_states()
            yield
            if not all(torch.equal(a, b) for a, b in zip(before, _rng_states())):
                raise CtscaleError(
                    "the model drew random numbers in the Fisher pass although fisher.dropout is "
                    "false (a random layer other than dropout, e.g. LayerDrop): the CT-D mask "
                    "would depend on the world size. Switch that layer off in the model config, "
                    "or set fisher.dropout=true to accept a world-size-dependent mask"
                )

        try:
            yield model_step
        finally:
            for module, attr, value in saved:
                setattr(module, attr, value)


def _zero_dropout(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, float]]:
    """Set every dropout rate of ``model`` to 0; returns (module, attribute, old value)."""
    saved = []
    for module in model.modules():
        names = ["p"] if isinstance(module, torch.nn.modules.dropout._DropoutNd) else []
        names += [n for n, v in vars(module).items() if "dropout" in n and isinstance(v, float)]
        for name in names:
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, 0.0)
    return saved


def _rng_states() -> list[torch.Tensor]:
    """The CPU generator's state and the current CUDA device's (if any)."""
    states = [torch.get_rng_state()]
    if torch.cuda.is_available():
        states.append(torch.cuda.get_rng_state())
    return states


class FisherAccumulator:
    """Sums ``clip(g)**2`` per local piece of every candidate parameter, in fp32.

    Buffers are local: one fp32 tensor per piece this rank holds (no full-size buffer under
    ZeRO-3 / FSDP2). ``add`` is collective (one all-reduce of one float per candidate tensor)
    when clipping is on.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], max_grad_norm: float = 0.0) -> None:
        """``shapes``: global shape of every candidate parameter (the same on every rank)."""
        if not shapes:
            raise no_candidates("CT-D")
        self.shapes = dict(shapes)
        self.max_grad_norm = max_grad_norm
        self.sums: dict[Key, torch.Tensor] = {}
        self.batches = 0
        self.examples = 0  # training examples behind the accumulated batches (when add is told)
        self.owned: set[tuple[str, int, int]] | None = None
        self._averaged = False  # scores() has divided the sums in place

    def _own(self, views: list[GradView]) -> list[GradView]:
        """The views this rank accounts for: a range held by several ranks (DDP replicas)
        counts once, on the lowest such rank, so norms and histograms are not multiplied."""
        if self.owned is None:
            mine = [(v.name, v.start, v.end) for v in views]
            seen: set[tuple[str, int, int]] = set()
            for r, ranges in enumerate(dist.all_gather_objects(mine)):
                if r == dist.rank():
                    self.owned = {k for k in ranges if k not in seen}
                seen.update(ranges)
        owned = self.owned
        assert owned is not None  # this rank's entry of the gather above
        return [v for v in views if (v.name, v.start, v.end) in owned]

    def add(self, views: Iterable[GradView], examples: int = 0) -> None:
        """Accumulate one global batch's reduced gradients (local shards); ``examples``: the
        global batch's size, recorded in the mask's metadata."""
        if self._averaged:
            raise CtscaleError("FisherAccumulator.add after scores(): the sums are already averaged")
        views = self._own([v for v in views if v.name in self.shapes])
        scales = self._clip_scales(views)
        for view in views:
            assert view.grad is not None  # grad_views() always carries the gradient
            grad = view.grad.detach()
            if not torch.isfinite(grad).all():
                raise CtscaleError(
                    f"non-finite gradient in {view.name} during the Fisher pass (batch "
                    f"{self.batches}); lower the learning-rate-independent loss scale, check the "
                    "data for NaN labels, or use fp32 (model.dtype=float32)"
                )
            if view.owned and grad.dtype == torch.float32:  # square in place and keep it
                square = grad.mul_(scales[view.name]).square_()
            else:  # a buffer the engine reuses (or low precision): square into a new fp32 tensor
                square = (grad.float() * scales[view.name]).square_()
            if view.key() in self.sums:
                self.sums[view.key()] += square
            else:
                self.sums[view.key()] = square
        self.batches += 1
        self.examples += examples

    def _clip_scales(self, views: list[GradView]) -> dict[str, float]:
        """Per-tensor clip factor ``min(1, max_norm / (norm + 1e-6))`` from the global norm."""
        names = sorted(self.shapes)
        if not self.max_grad_norm:
            return dict.fromkeys(names, 1.0)
        index = {n: i for i, n in enumerate(names)}
        sq = torch.zeros(len(names), dtype=torch.float64)
        for view in views:
            assert view.grad is not None  # grad_views() always carries the gradient
            sq[index[view.name]] += view.grad.detach().double().square().sum().cpu()
        norms = dist.all_reduce_sum_(sq).sqrt()
        return {n: min(1.0, self.max_grad_norm / (float(norms[i]) + 1e-6)) for n, i in index.items()}

    def scores(self) -> dict[Key, torch.Tensor]:
        """Local Fisher estimates ``sum / batches`` per piece (fp32, where they were summed: a
        GPU selects on the GPU). Divides in place (no second copy of a shard-sized buffer): call
        it once, after the last ``add``."""
        if self.batches == 0:
            raise CtscaleError("the Fisher pass saw no batch: fisher.num_batches must be >= 1")
        if not self._averaged:
            for s in self.sums.values():
                s.div_(self.batches)
            self._averaged = True
        return dict(self.sums)

    def clear(self) -> None:
        """Drop the accumulated sums (as large as the local candidate shard)."""
        self.sums = {}

    def total_entries(self) -> int:
        """Global number of candidate entries (from global shapes; no communication)."""
        return sum(math.prod(s) for s in self.shapes.values())


def select_child(
    scores: dict[Key, torch.Tensor], total: int, reserve_p: float, names: Sequence[str] | None = None
) -> dict[Key, torch.Tensor]:
    """Local masks of the global top ``k = round(p * total)`` Fisher entries. Collective.

    ``names``: every candidate tensor (the same list on every rank); those whose Fisher is zero
    in every entry are reported in one warning (``zero_fisher_tensors``), since top-p can only
    pick them to fill ties: in practice they are frozen for the whole run."""
    k = round(reserve_p * total)
    if k < 1:
        raise MaskError(
            f"method.reserve_p={reserve_p} keeps round(p * {total}) = 0 of the candidate "
            "entries; raise reserve_p or widen fisher.candidates"
        )
    if names is not None:
        zero = zero_fisher_tensors(scores, names)
        if zero and dist.rank() == 0:
            shown = ", ".join(zero[:5]) + (f" (and {len(zero) - 5} more)" if len(zero) > 5 else "")
            log.warning(
                "fisher: %d of %d candidate tensors have an all-zero Fisher (zero gradient in every "
                "batch of the pass), so CT-D keeps none of their entries and they stay frozen: %s. "
                "Causes: a LoRA lora_A (lora_B starts at zero), frozen or unused parameters; leave "
                "them out of fisher.candidates (or exclude them) if they should train",
                len(zero),
                len(names),
                shown,
            )
    return select_top_k(scores, k)


def zero_fisher_tensors(scores: dict[Key, torch.Tensor], names: Sequence[str]) -> list[str]:
    """The ``names`` whose Fisher is 0 in every entry on every rank (a tensor no rank holds a
    score for counts as zero). Collective: one all-reduce of one float per name."""
    index = {n: i for i, n in enumerate(names)}
    nonzero = torch.zeros(len(names), dtype=torch.float64)
    for (name, _), value in scores.items():
        if name in index and value.numel() and bool(value.ne(0).any()):
            nonzero[index[name]] = 1.0
    dist.all_reduce_sum_(nonzero)
    return [n for n, i in index.items() if nonzero[i] == 0]
