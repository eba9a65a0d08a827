"""The CT-D pipeline: Fisher pass, exact global top-p, mask saved; or a saved mask loaded,
resharded to the ranges this rank holds."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ctscale import dist
from ctscale.errors import ConfigError, MaskError
from ctscale.methods.ct_d.fisher import FisherAccumulator, candidate_filter, select_child
from ctscale.methods.fixed_mask import FixedChildMask
from ctscale.storage import mask_file
from ctscale.storage.fingerprint import model_fingerprint

if TYPE_CHECKING:
    from ctscale.backends.base import ShardViews
    from ctscale.config import Config

FisherPass = Callable[[FisherAccumulator], None]


def default_mask_path(output_dir: str | Path) -> Path:
    """One file at world size 1; a directory of per-rank shards plus an index otherwise."""
    name = "mask.safetensors" if dist.world_size() == 1 else "mask"
    return Path(output_dir) / name


@contextlib.contextmanager
def timed(seconds: dict[str, float] | None, phase: str):
    start = time.perf_counter()
    yield
    if seconds is not None:
        seconds[phase] = round(time.perf_counter() - start, 3)


def estimate_and_save_mask(
    cfg: Config,
    backend: ShardViews,
    fisher_pass: FisherPass,
    path: Path,
    seconds: dict[str, float] | None = None,
) -> mask_file.MaskInfo:
    """Fisher pass, global top-p selection, mask written from shards. Collective."""
    shapes = backend.param_shapes()
    is_candidate = candidate_filter(cfg.fisher.candidates, cfg.fisher.exclude)
    fisher = FisherAccumulator({n: s for n, s in shapes.items() if is_candidate(n)}, cfg.fisher.max_grad_norm)
    with timed(seconds, "fisher"):
        fisher_pass(fisher)
    provenance = {
        "seed": cfg.train.seed,
        "scope": {"candidates": list(cfg.fisher.candidates), "exclude": list(cfg.fisher.exclude)},
        "model": cfg.model.name_or_path,
        "task": cfg.data.task,
        "fisher_dropout": cfg.fisher.dropout,
    }
    save_child_network(path, fisher, cfg.method.reserve_p, shapes, provenance, seconds)
    return mask_file.read_info(path)


def save_child_network(
    path: Path,
    fisher: FisherAccumulator,
    reserve_p: float,
    shapes: dict[str, tuple[int, ...]],
    provenance: dict,
    seconds: dict[str, float] | None = None,
) -> None:
    """The global top-``reserve_p`` of an accumulated Fisher, saved from every rank's shards as
    a CT-D mask; ``provenance`` (seed, scope, model, task) goes into its metadata. Collective."""
    candidates, total = fisher.shapes, fisher.total_entries()
    with timed(seconds, "select"):
        masks = select_child(fisher.scores(), total, reserve_p, sorted(candidates))
    pieces = [
        mask_file.MaskPiece(name, candidates[name], start, start + bits.numel(), bits.cpu())
        for (name, start), bits in masks.items()
    ]
    metadata = {
        "method": "ct-d",
        "reserve_p": reserve_p,
        **provenance,
        "fisher_batches": fisher.batches,
        "fisher_examples": fisher.examples or None,  # None: the caller did not count them
        "fisher_max_grad_norm": fisher.max_grad_norm,
        "counts": {
            "selected": round(reserve_p * total),
            "candidate_entries": total,
            "candidate_tensors": len(candidates),
        },
        "model_fingerprint": model_fingerprint(shapes),
        "world_size": dist.world_size(),
    }
    fisher.clear()  # its scores are as large as the candidate shard: free them before training
    with timed(seconds, "save_mask"):
        mask_file.save_mask(path, pieces, metadata)
        dist.barrier()


def check_mask_on_record(cfg: Config) -> None:
    """``method.mask_file`` must be the child network this config describes: the same p,
    candidate scope and task as the mask's metadata say it was made with (the model is checked
    against the mask's names and shapes when it loads). A mismatch is one error naming both
    values, unless ``train.allow_mask_mismatch``. Reads the mask's header only."""
    if not cfg.method.mask_file or cfg.train.allow_mask_mismatch:
        return
    meta = mask_file.read_info(cfg.method.mask_file).metadata
    ours = {
        "method.reserve_p": (meta.get("reserve_p"), cfg.method.reserve_p),
        "fisher.candidates": ((meta.get("scope") or {}).get("candidates"), list(cfg.fisher.candidates)),
        "fisher.exclude": ((meta.get("scope") or {}).get("exclude"), list(cfg.fisher.exclude)),
        "data.task": (meta.get("task"), cfg.data.task),
    }
    for key, (recorded, configured) in ours.items():
        if recorded is not None and recorded != configured:
            raise ConfigError(
                f"method.mask_file={cfg.method.mask_file!r} was made with {key}={recorded!r}, this "
                f"run has {key}={configured!r}: the run would train another child network than its "
                f"config says; set {key}={recorded!r}, estimate a new mask (ctscale fisher, or no "
                "mask_file), or set train.allow_mask_mismatch=true to use it anyway"
            )


def load_fixed_mask(path: str | Path, backend: ShardViews) -> FixedChildMask:
    """CT-D strategy from a mask file, resharded to the ranges this rank holds now."""
    info = mask_file.read_info(path)
    if info.metadata.get("method") != "ct-d":
        raise MaskError(f"{path} holds a {info.metadata.get('method')!r} mask; CT-D needs a ct-d mask")
    mask_file.check_names(info, backend.param_shapes())
    wanted = [(v.name, v.shape, v.start, v.end) for v in backend.shard_ranges() if v.name in info.shapes]
    if not info.shapes.keys() & backend.param_shapes().keys():
        raise MaskError(f"{path}: the mask matches no parameter of this model; use a mask made for it")
    local = mask_file.load_mask(path, wanted)
    return FixedChildMask(local, is_candidate=lambda name: name in info.shapes)
