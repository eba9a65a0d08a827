"""CT-D (task-driven Child-Tuning): one child network for the whole run, the global top-p of
the Fisher information; registered as method ``ct-d``.

``fisher``: the Fisher estimator on sharded gradients; ``topk``: exact global top-k without
gathering; ``pipeline``: estimate, select, save, load; ``lora_scope``: the candidates of a
LoRA model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ctscale import batching
from ctscale.errors import ConfigError
from ctscale.methods.ct_d.pipeline import (
    check_mask_on_record,
    default_mask_path,
    estimate_and_save_mask,
    load_fixed_mask,
    timed,
)
from ctscale.methods.fixed_mask import FixedChildMask
from ctscale.methods.registry import ChildSummary, MethodContext, MethodSpec, register_method
from ctscale.storage import mask_file

if TYPE_CHECKING:
    from ctscale.config import Config


def mask_path(cfg: Config, resumed: str | None = None) -> str:
    """A resumed run's own mask, ``method.mask_file``, or the run directory's default."""
    return resumed or cfg.method.mask_file or str(default_mask_path(cfg.train.output_dir))


def build(ctx: MethodContext) -> FixedChildMask:
    """Load the resumed run's mask or ``method.mask_file``; otherwise run the Fisher pass and
    save the mask (at ``ctx.mask_out`` or the run directory's default) first. Collective."""
    cfg = ctx.cfg
    given = ctx.resumed_mask or cfg.method.mask_file
    path = given or ctx.mask_out or mask_path(cfg)
    if not given:
        if ctx.fisher_pass is None:
            raise ConfigError("ct-d needs a Fisher pass or method.mask_file; set method.mask_file")
        estimate_and_save_mask(cfg, ctx.shards, ctx.fisher_pass, Path(path), ctx.seconds)
    with timed(ctx.seconds, "load_mask"):
        return load_fixed_mask(path, ctx.shards)


def describe(cfg: Config, path: str | None, seconds: dict[str, float]) -> ChildSummary:
    """``ct-d, 5,126 of 17,088 candidate entries (30.0%, p=0.3) in 32 tensors; fisher pass: 2
    batches in 1.5 s`` (or ``; from <mask file>`` when none ran). Reads the mask's headers."""
    assert path is not None  # CT-D always has a mask path (MethodSpec.mask_path)
    info = mask_file.read_info(path)
    selected, total, p = info.total_selected, info.total_entries, info.metadata.get("reserve_p")
    line = f"ct-d, {selected:,} of {total:,} candidate entries ({selected / max(total, 1):.1%}, p={p})"
    line += f" in {len(info.shapes)} tensors"
    batches = None
    if "fisher" in seconds:
        batches = info.metadata.get("fisher_batches")
        line += f"; fisher pass: {batches} batches in {seconds['fisher']:.1f} s"
    else:
        line += f"; from {path}"
    return ChildSummary(line, selected, total, batches)


def plan(cfg: Config, train_size: int) -> str:
    m = cfg.method
    if m.mask_file:
        return f"CT-D: mask file {m.mask_file} (p={m.reserve_p})"
    batch = cfg.fisher.batch_size or cfg.train.batch_size
    batches = cfg.fisher.num_batches or batching.steps_per_epoch(train_size, batch)
    return f"CT-D: Fisher pass of {batches} global batches of {batch}, then top p={m.reserve_p}"


SPEC = register_method(
    MethodSpec(
        name="ct-d",
        summary="Child-Tuning-D: a fixed child network, the global top-p of the Fisher information",
        build=build,
        plan=plan,
        describe=describe,
        fixed_child=True,
        mask_path=mask_path,
        reads_mask_file=True,
        fisher_pass=True,
        preflight=check_mask_on_record,
    )
)
