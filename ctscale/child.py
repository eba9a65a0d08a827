"""Build the mask strategy a config asks for: vanilla, CT-F, or CT-D (Fisher or a mask file)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from ctscale import dist, store
from ctscale.backends.base import Backend, ShardViews
from ctscale.config import Config
from ctscale.errors import ConfigError, MaskError
from ctscale.fisher import FisherAccumulator, candidate_filter, select_child
from ctscale.masks import FixedChildMask, MaskStrategy, NoMask, RandomChildMask

FisherPass = Callable[[FisherAccumulator], None]


def model_fingerprint(shapes: dict[str, tuple[int, ...]]) -> str:
    """SHA-256 of the sorted (name, shape) list: identifies a model architecture, not weights."""
    text = json.dumps(sorted((n, list(s)) for n, s in shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_mask_path(output_dir: str | Path) -> Path:
    """One file at world size 1; a directory of per-rank shards plus an index otherwise."""
    name = "mask.safetensors" if dist.world_size() == 1 else "mask"
    return Path(output_dir) / name


def ctd_mask_path(cfg: Config, resumed: str | None = None) -> str | None:
    """Where the CT-D mask of this run lives: a resumed run's own mask, ``method.mask_file``,
    or the run directory's default; None for the other methods."""
    if cfg.method.name != "ct-d":
        return None
    return resumed or cfg.method.mask_file or str(default_mask_path(cfg.train.output_dir))


def build_strategy(
    cfg: Config,
    backend: Backend,
    fisher_pass: FisherPass | None,
    mask_path: str | None = None,
    seconds: dict[str, float] | None = None,
) -> MaskStrategy:
    """The strategy for ``cfg.method``.

    CT-D loads ``mask_path`` (a resumed run's own mask) or ``method.mask_file`` when given;
    otherwise it runs the Fisher pass and saves the mask in the run directory first (the time
    of each phase goes to ``seconds``).
    """
    method = cfg.method
    if method.name == "vanilla":
        return NoMask()
    if method.name == "ct-f":
        seed = cfg.train.seed if method.mask_seed is None else method.mask_seed
        return RandomChildMask(method.reserve_p, seed, method.ctf_kernel)
    path = ctd_mask_path(cfg, mask_path)
    assert path is not None  # method ct-d has a mask path
    if not (mask_path or method.mask_file):
        assert fisher_pass is not None  # only a resumed run, which passes its mask, has none
        estimate_and_save_mask(cfg, backend, fisher_pass, Path(path), seconds)
    with _timed(seconds, "load_mask"):
        return load_fixed_mask(path, backend)


@contextlib.contextmanager
def _timed(seconds: dict[str, float] | None, phase: str):
    start = time.perf_counter()
    yield
    if seconds is not None:
        seconds[phase] = round(time.perf_counter() - start, 3)


def estimate_and_save_mask(
    cfg: Config,
    backend: Backend,
    fisher_pass: FisherPass,
    path: Path,
    seconds: dict[str, float] | None = None,
) -> store.MaskInfo:
    """Fisher pass, global top-p selection, mask written from shards. Collective."""
    shapes = backend.param_shapes()
    is_candidate = candidate_filter(cfg.fisher.candidates, cfg.fisher.exclude)
    fisher = FisherAccumulator({n: s for n, s in shapes.items() if is_candidate(n)}, cfg.fisher.max_grad_norm)
    with _timed(seconds, "fisher"):
        fisher_pass(fisher)
    provenance = {
        "seed": cfg.train.seed,
        "scope": {"candidates": list(cfg.fisher.candidates), "exclude": list(cfg.fisher.exclude)},
        "model": cfg.model.name_or_path,
        "task": cfg.data.task,
        "fisher_dropout": cfg.fisher.dropout,
    }
    save_child_network(path, fisher, cfg.method.reserve_p, shapes, provenance, seconds)
    return store.read_info(path)


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
    with _timed(seconds, "select"):
        masks = select_child(fisher.scores(), total, reserve_p, sorted(candidates))
    pieces = [
        store.MaskPiece(name, candidates[name], start, start + bits.numel(), bits.cpu())
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
    with _timed(seconds, "save_mask"):
        store.save_mask(path, pieces, metadata)
        dist.barrier()


def describe_child(
    method: str,
    reserve_p: float | None,
    selected: int = 0,
    total: int = 0,
    tensors: int | None = None,
    fisher: tuple[int | None, float] | None = None,
) -> str:
    """The child network in one console line, as ``ctscale train`` and the HF callback print it:
    ``ct-d, 5,126 of 17,088 candidate entries (30.0%, p=0.3) in 32 tensors; fisher pass: 2
    batches in 1.5 s`` (``fisher``: batches and seconds of the pass, when one ran)."""
    if method == "ct-f":
        return f"ct-f, a fresh random child every step, p={reserve_p}"
    line = (
        f"ct-d, {selected:,} of {total:,} candidate entries ({selected / max(total, 1):.1%}, p={reserve_p})"
    )
    if tensors is not None:
        line += f" in {tensors} tensors"
    if fisher is not None:
        line += f"; fisher pass: {fisher[0]} batches in {fisher[1]:.1f} s"
    return line


def check_mask_on_record(cfg: Config) -> None:
    """``method.mask_file`` must be the child network this config describes: the same p,
    candidate scope and task as the mask's metadata say it was made with (the model is checked
    against the mask's names and shapes when it loads). A mismatch is one error naming both
    values, unless ``train.allow_mask_mismatch``. Reads the mask's header only."""
    if cfg.method.name != "ct-d" or not cfg.method.mask_file or cfg.train.allow_mask_mismatch:
        return
    meta = store.read_info(cfg.method.mask_file).metadata
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
    info = store.read_info(path)
    if info.metadata.get("method") != "ct-d":
        raise MaskError(f"{path} holds a {info.metadata.get('method')!r} mask; CT-D needs a ct-d mask")
    store.check_names(info, backend.param_shapes())
    wanted = [(v.name, v.shape, v.start, v.end) for v in backend.shard_ranges() if v.name in info.shapes]
    local = store.load_mask(path, wanted)
    return FixedChildMask(local, is_candidate=lambda name: name in info.shapes)
