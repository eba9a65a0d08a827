"""Child-only AdamW state on disk, loadable at any world size (FSDP2 checkpoints).

Each state tensor of ``ChildAdamW`` is this rank's contiguous piece of one global 1-D sequence:
the child entries of a candidate parameter in flat order, or every entry of another parameter.
Ranks hold consecutive pieces in rank order (FSDP2 shards dim 0), so a piece starts where the
lower ranks' pieces end: one all-gather of lengths gives every offset, on save and on load.
Each rank writes its pieces with their offsets; a rank of any later world size reads only the
slices that overlap its own piece. Totals must match: a checkpoint of another child network
is an error, not a silent reset.

Files in the checkpoint directory:

- ``child-optim-00000.safetensors`` (one per rank): tensors ``{i}.exp_avg``, ``{i}.exp_avg_sq``
  and, for bf16/fp16 parameters, ``{i}.master`` (``i``: the optimizer's parameter index);
  header metadata: parameter names, offsets, lengths, world size;
- ``child-optim-groups.pt`` (rank 0): the parameter groups (lr, betas, decay, names) and each
  parameter's step count, identical on every rank.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ctscale import dist
from ctscale.dist import local_shard
from ctscale.errors import CtscaleError

if TYPE_CHECKING:  # the optimizer whose state this is; storage imports no method at run time
    from ctscale.methods.child_optim import ChildAdamW

FORMAT = "ctscale-child-adamw/1"
GROUPS = "child-optim-groups.pt"


def _shard_file(path: Path, rank: int) -> Path:
    return path / f"child-optim-{rank:05d}.safetensors"


def _offsets(lengths: list[int]) -> tuple[list[int], list[int]]:
    """This rank's start in each global sequence, and each sequence's total (collective)."""
    every = dist.all_gather_objects(lengths)
    starts = [sum(r[i] for r in every[: dist.rank()]) for i in range(len(lengths))]
    totals = [sum(r[i] for r in every) for i in range(len(lengths))]
    return starts, totals


def save_child_state(optimizer: ChildAdamW, path: Path) -> None:
    """Collective: every rank writes its pieces; rank 0 the groups and step counts."""
    named = list(optimizer.named_params())
    states = [optimizer.state.get(p, {}) for _, p in named]
    lengths = [s["exp_avg"].numel() if s else 0 for s in states]
    starts, _ = _offsets(lengths)
    tensors = {
        f"{i}.{kind}": value.detach().contiguous().cpu()
        for i, s in enumerate(states)
        for kind, value in s.items()
        if kind != "step"
    }
    metadata = {
        "format": FORMAT,
        "world_size": str(dist.world_size()),
        "names": json.dumps([name for name, _ in named]),
        "starts": json.dumps(starts),
        "lengths": json.dumps(lengths),
    }
    save_file(tensors, str(_shard_file(path, dist.rank())), metadata=metadata)
    if dist.rank() == 0:
        groups = optimizer.state_dict()["param_groups"]
        steps = {i: s["step"].clone() for i, s in enumerate(states) if s}
        torch.save({"param_groups": groups, "steps": steps}, path / GROUPS)


def load_child_state(optimizer: ChildAdamW, path: Path) -> None:
    """Collective: each rank rebuilds its pieces from the slices of the saved ones it overlaps."""
    if not (path / GROUPS).is_file():
        raise CtscaleError(
            f"{path} holds no child-only optimizer state ({GROUPS} is missing): it was written "
            "with method.child_only_optimizer=false; resume with the setting it was written with"
        )
    saved = torch.load(path / GROUPS, weights_only=True)
    headers = _read_headers(path)
    named = list(optimizer.named_params())
    names = [name for name, _ in named]
    if headers[0]["names"] != names:
        raise CtscaleError(
            f"{path}: the child-only optimizer state names other parameters than this model's; "
            "resume with the model and settings the checkpoint was written with"
        )
    lengths = [optimizer.piece_length(name, p) for name, p in named]
    starts, totals = _offsets(lengths)
    saved_totals = [sum(h["lengths"][i] for h in headers) for i in range(len(names))]
    for i, name in enumerate(names):
        if i in saved["steps"] and totals[i] != saved_totals[i]:
            raise CtscaleError(
                f"{path}: the child-only optimizer state of {name} has {saved_totals[i]} entries, "
                f"this run's child network {totals[i]}: the checkpoint was written with another "
                "mask; resume with the mask it was written with"
            )
    torch.optim.Optimizer.load_state_dict(optimizer, {"state": {}, "param_groups": saved["param_groups"]})
    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(h["file"]), framework="pt")) for h in headers]
        stored = set().union(*(f.keys() for f in files))
        for i, (_, p) in enumerate(named):
            if i not in saved["steps"]:
                continue
            lo, hi = starts[i], starts[i] + lengths[i]
            state = {"step": saved["steps"][i].clone()}
            for kind in ("exp_avg", "exp_avg_sq", "master"):
                if f"{i}.{kind}" in stored:
                    state[kind] = _join(headers, files, f"{i}.{kind}", i, lo, hi).to(local_shard(p).device)
            optimizer.state[p] = state


def _join(headers: list[dict], files: list, key: str, i: int, lo: int, hi: int) -> torch.Tensor:
    """Global entries ``[lo, hi)`` of sequence ``i``, from the saved pieces that overlap them."""
    parts = [torch.zeros(0, dtype=torch.float32)]
    for header, f in zip(headers, files):
        start, n = header["starts"][i], header["lengths"][i]
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            parts.append(f.get_slice(key)[a - start : b - start])
    return torch.cat(parts)


def _read_headers(path: Path) -> list[dict]:
    """Every saved rank's metadata, in rank order; the set must be complete."""
    first = _metadata(_shard_file(path, 0))
    world = int(first["world_size"])
    headers = [first] + [_metadata(_shard_file(path, r)) for r in range(1, world)]
    for h in headers:
        h["names"], h["starts"], h["lengths"] = (json.loads(h[k]) for k in ("names", "starts", "lengths"))
    return headers


def _metadata(file: Path) -> dict:
    if not file.is_file():
        raise CtscaleError(f"{file} is missing: the checkpoint is incomplete; resume from another one")
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise CtscaleError(f"{file} is not a {FORMAT} file (format {meta.get('format')!r})")
    return {**meta, "file": file}
