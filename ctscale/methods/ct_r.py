"""CT-R, the fixed random child network: the ablation between CT-F and CT-D.

Like CT-D, one child network for the whole run over the same candidates (``fisher.candidates``
minus ``fisher.exclude``), ``grad <- grad * M`` with no 1/p rescale, non-candidates fully
trained; like CT-F, the child is random: each candidate entry is kept with probability
``reserve_p``, drawn once from the counter RNG at stream step -1 (never a training step, so it
is no step's CT-F mask) with seed ``method.mask_seed`` (default ``train.seed``). The draw is a
pure function of (seed, name, flat index): every rank builds its own ranges, with no file and
no collective, and the network is the same at any world size or backend. A fixed child, so the
child-only AdamW (``method.child_only_optimizer``) serves it.

This module is the whole method: its registration below is all the trainer, the config checks
and the HF callback know of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ctscale.methods.counter_rng import bernoulli_mask, mask_seed
from ctscale.methods.ct_d.fisher import candidate_filter, no_candidates
from ctscale.methods.fixed_mask import FixedChildMask
from ctscale.methods.registry import ChildSummary, MethodContext, MethodSpec, register_method

if TYPE_CHECKING:
    from ctscale.config import Config

DRAW_STEP = -1  # the counter RNG's step of the one draw


def build(ctx: MethodContext) -> FixedChildMask:
    """This rank's pieces of the random child network (local, no communication)."""
    cfg = ctx.cfg
    is_candidate = candidate_filter(cfg.fisher.candidates, cfg.fisher.exclude)
    if not any(is_candidate(n) for n in ctx.shards.param_shapes()):
        raise no_candidates("ct-r")
    seed, p = mask_seed(cfg), cfg.method.reserve_p
    local = {
        v.key(): bernoulli_mask(seed, DRAW_STEP, v.name, v.start, v.end, p)
        for v in ctx.shards.shard_ranges()
        if is_candidate(v.name)
    }
    return FixedChildMask(local, is_candidate)


def describe(cfg: Config, mask_path: str | None, seconds: dict[str, float]) -> ChildSummary:
    return ChildSummary(
        f"ct-r, a fixed random child network, p={cfg.method.reserve_p}, seed {mask_seed(cfg)}"
    )


SPEC = register_method(
    MethodSpec(
        name="ct-r",
        summary="fixed random child network: one Bernoulli(p) mask of CT-D's candidates for the whole run",
        build=build,
        plan=lambda cfg, train_size: (
            f"CT-R: one Bernoulli(p={cfg.method.reserve_p}) child network of the candidates, "
            f"seed {mask_seed(cfg)}, fixed for the run"
        ),
        describe=describe,
        fixed_child=True,
    )
)
