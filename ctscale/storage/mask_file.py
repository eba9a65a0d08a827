"""Child-Tuning masks on disk: bit-packed safetensors, saved sharded, loaded at any world size.

A mask is a set of pieces; a piece is the mask of flat elements ``[start, end)`` of one
parameter, as one rank holds it under ZeRO-1/2/3 or FSDP2. Pieces of one parameter never
overlap and together cover it.

Local vs global:
  * ``save_mask`` is COLLECTIVE when ``world_size() > 1``: every rank passes its own pieces.
    Only small piece descriptors travel between ranks (``all_gather_objects``), never bits.
  * ``load_mask``, ``read_info``, ``verify`` and ``check_names`` are LOCAL: no communication. Each rank
    asks for the ranges it holds now, whatever the world size at save time (resharding).

Format (version 1), one or more safetensors files:
  * payload: one uint8 tensor per piece, 8 elements a byte, little bit order; key = the
    parameter name when the piece covers the whole tensor, else ``"{name}@{start}"``.
  * ``__metadata__["ctscale"]`` = JSON ``{format_version, metadata, checksum, pieces}``;
    ``pieces`` = ``[{key, name, shape, start, end, count}]``; ``checksum`` = SHA-256 of the
    payload bytes of every tensor, in sorted-key order (independent of the on-disk layout).
  * single file: ``path`` ends with ``.safetensors`` (all pieces must be on one rank).
  * sharded: ``path`` is a directory holding ``mask-{rank:05d}-of-{world:05d}.safetensors``
    and ``mask.index.json`` = ``{format_version, metadata, files: [{file, checksum, pieces}]}``.
    EVERY rank writes its shard, an empty payload if it holds no pieces, so a complete save is
    always exactly ``world`` files and the index lists them all (a missing one is detectable).

Writes are atomic (``ctscale.storage.atomic``): temp file in the same directory, then ``os.replace``. A sharded save
replaces files only after every rank's new shard is complete, removes the old index first
and writes the new index last, so a directory never loads a mix of two saves.

One module past 400 lines on purpose: it is one file format, whose writer and readers share the
piece checks and header layout, and the atomic-write tests break a save between its steps
(``_save_shard``, ``_write_index``) here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open

from ctscale import dist
from ctscale.errors import MaskError
from ctscale.storage import atomic

FORMAT_VERSION = 1
INDEX_NAME = "mask.index.json"
_META_KEY = "ctscale"
_FIX = "re-create it with `ctscale fisher`"
_CORRUPT = f"the file is corrupt or was truncated; {_FIX}"
_SHIFTS = torch.arange(8, dtype=torch.uint8)
_SHARD_RE = re.compile(r"mask-\d{5}-of-\d{5}\.safetensors")


@dataclass
class MaskPiece:
    """The mask of flat elements [start, end) of parameter ``name`` (global ``shape``)."""

    name: str
    shape: tuple[int, ...]
    start: int
    end: int
    bits: torch.Tensor  # 1-D bool, length end - start


@dataclass
class MaskInfo:
    """Summary of a saved mask (global: all pieces of all files), from headers only."""

    path: str
    format_version: int
    metadata: dict
    shapes: dict[str, tuple[int, ...]]
    selected: dict[str, int]  # per parameter, summed over pieces
    files: list[str]

    @property
    def total_selected(self) -> int:
        return sum(self.selected.values())

    @property
    def total_entries(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (flattened) into uint8, element j -> bit j % 8 of byte j // 8."""
    flat = bits.detach().reshape(-1).to("cpu", torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])  # zero-pad to whole bytes
    return (flat.view(-1, 8) << _SHIFTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bits of ``packed`` (uint8, little bit order) as a 1-D bool tensor."""
    if n > packed.numel() * 8:
        raise ValueError(f"cannot unpack {n} bits from {packed.numel()} bytes")
    bits = (packed.reshape(-1, 1).to(torch.uint8) >> _SHIFTS) & 1
    return bits.reshape(-1)[:n].to(torch.bool)


def _key(name: str, shape: tuple[int, ...], start: int, end: int) -> str:
    return name if (start, end) == (0, math.prod(shape)) else f"{name}@{start}"


def _shard_name(rank: int, world: int) -> str:
    return f"mask-{rank:05d}-of-{world:05d}.safetensors"


def _checked(piece: MaskPiece) -> MaskPiece:
    """A normalised copy of ``piece``; ValueError on a malformed one (a caller bug)."""
    shape = tuple(int(s) for s in piece.shape)
    start, end, bits = int(piece.start), int(piece.end), piece.bits
    if not 0 <= start <= end <= math.prod(shape):
        raise ValueError(f"piece {piece.name!r}: range [{start}, {end}) outside shape {shape}")
    if bits.dtype != torch.bool or bits.dim() != 1 or bits.numel() != end - start:
        raise ValueError(
            f"piece {piece.name!r}: bits must be 1-D bool of length {end - start}, "
            f"got {bits.dtype} {tuple(bits.shape)}"
        )
    return MaskPiece(piece.name, shape, start, end, bits)


def _describe(p: MaskPiece) -> dict[str, Any]:
    """The small, bit-free descriptor of a piece: what travels between ranks and into headers."""
    key, count = _key(p.name, p.shape, p.start, p.end), int(p.bits.sum())
    return dict(key=key, name=p.name, shape=list(p.shape), start=p.start, end=p.end, count=count)


def _listing(names: list[str]) -> str:
    more = f" (and {len(names) - 10} more)" if len(names) > 10 else ""
    return f"{len(names)} parameter(s) {', '.join(names[:10])}{more}"


def _shape_error(where: object, name: str, model: Iterable[int], mask: Iterable[int]) -> MaskError:
    return MaskError(
        f"{where}: parameter {name!r} has shape {list(model)} in the model but {list(mask)} in the "
        f"mask; mask for another model? Use the mask made for this model, or {_FIX}"
    )


def _check_cover(descs: Iterable[dict[str, Any]]) -> None:
    """ValueError unless, per parameter, all pieces agree on shape, never overlap and cover it."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for d in descs:
        by_name.setdefault(d["name"], []).append(d)
    for name, ds in by_name.items():
        if len({tuple(d["shape"]) for d in ds}) > 1:
            raise ValueError(f"pieces of {name!r} disagree on its shape")
        cursor = 0
        for d in sorted(ds, key=lambda d: (d["start"], d["end"])):
            if d["start"] != cursor and d["start"] < d["end"]:
                what = "overlap" if d["start"] < cursor else "leave a gap"
                raise ValueError(f"pieces of {name!r} {what} at flat index {min(cursor, d['start'])}")
            cursor = max(cursor, d["end"])
        if cursor != math.prod(ds[0]["shape"]):
            raise ValueError(f"pieces of {name!r} cover only [0, {cursor}) of {ds[0]['shape']}")


def _write_tmp(target: Path, pieces: list[MaskPiece], metadata: dict) -> dict[str, Any]:
    """Write ``pieces`` to a temp file beside ``target``; return the file descriptor + ``tmp``."""
    tensors: dict[str, torch.Tensor] = {}
    descs = []
    for p in pieces:
        if p.start == p.end and math.prod(p.shape) > 0:
            continue  # an empty range of a non-empty parameter carries nothing
        d = _describe(p)
        if d["key"] in tensors:
            raise ValueError(f"two pieces with key {d['key']!r} in one file")
        tensors[d["key"]] = pack_bits(p.bits)
        descs.append(d)
    digest = hashlib.sha256()
    for k in sorted(tensors):
        digest.update(tensors[k].numpy().data)
    checksum = digest.hexdigest()
    header = dict(format_version=FORMAT_VERSION, metadata=metadata, checksum=checksum, pieces=descs)
    tmp = atomic.temp_file(target)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata={_META_KEY: json.dumps(header)})
    except BaseException:
        tmp.unlink(missing_ok=True)  # leave no temp file behind
        raise
    return {"file": target.name, "checksum": checksum, "pieces": descs, "tmp": tmp}


def _save_shard(
    path: str | Path,
    pieces: Iterable[MaskPiece],
    rank: int,
    world: int,
    metadata: dict | None = None,
    *,
    commit: bool = True,
) -> dict[str, Any]:
    """Write one rank's shard (local); return its descriptor for ``_write_index``.

    With ``commit=False`` the shard stays at the temp path ``descriptor["tmp"]`` (save_mask
    renames it only once every rank's shard is complete).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    desc = _write_tmp(path / _shard_name(rank, world), [_checked(p) for p in pieces], metadata or {})
    if commit:
        atomic.commit(desc.pop("tmp"), path / desc["file"])
    return desc


def _write_index(path: str | Path, descriptors: list[dict[str, Any]], metadata: dict) -> None:
    """Atomically write ``mask.index.json`` from the shards' descriptors (in rank order)."""
    path = Path(path)
    files = [{k: v for k, v in d.items() if k != "tmp"} for d in descriptors]
    _check_cover(p for f in files for p in f["pieces"])
    index = {"format_version": FORMAT_VERSION, "metadata": metadata, "files": files}
    atomic.write_text(path / INDEX_NAME, json.dumps(index, indent=1))
    keep = {f["file"] for f in files}
    for old in path.iterdir():  # shards of an earlier save at another world size
        if _SHARD_RE.fullmatch(old.name) and old.name not in keep:
            old.unlink(missing_ok=True)


def save_mask(path: str | Path, pieces: Iterable[MaskPiece], metadata: dict) -> None:
    """Save a mask. Collective at world size > 1: every rank passes its own pieces.

    ``path`` ending in ``.safetensors`` -> one file (all pieces must be on one rank, which
    writes it); otherwise a sharded directory. Returns once every rank can load the new mask.
    """
    path, r, w = Path(path), dist.rank(), dist.world_size()
    # Empty ranges of non-empty parameters carry nothing: drop them (a rank may hold none).
    pieces = [p for p in map(_checked, pieces) if p.start < p.end or not math.prod(p.shape)]
    json.dumps(metadata)  # fail early (TypeError) on metadata that is not JSON
    per_rank: list[Any] = dist.all_gather_objects([_describe(p) for p in pieces])
    _check_cover(d for ds in per_rank for d in ds)  # same verdict on every rank: no hang
    single = path.suffix == ".safetensors" and not path.is_dir()
    holders = [i for i, ds in enumerate(per_rank) if ds]
    if single and len(holders) > 1:
        raise MaskError(
            f"{path}: a single file needs all pieces on one rank, ranks {holders} hold some; "
            "save to a directory instead"
        )
    writer = (holders or [0])[0] if single else r
    desc, exc = None, None
    if r == writer:
        try:
            if single:
                path.parent.mkdir(parents=True, exist_ok=True)
                desc = _write_tmp(path, pieces, metadata)
            else:
                desc = _save_shard(path, pieces, r, w, metadata, commit=False)
        except Exception as e:  # reported to every rank below, then re-raised here
            exc = e
    # Doubles as a barrier: after it, every new file is complete (or every rank knows why not).
    results: list[Any] = dist.all_gather_objects((None if exc is None else f"rank {r}: {exc}", desc))
    errors = [e for e, _ in results if e]
    if errors:
        if desc is not None:
            Path(desc["tmp"]).unlink(missing_ok=True)
        if exc is not None:
            raise exc
        raise MaskError(f"{path}: saving the mask failed ({errors[0]}); the previous mask there is unchanged")
    if single:
        if desc is not None:
            atomic.commit(desc["tmp"], path)
        dist.barrier()
        return
    if r == 0:
        (path / INDEX_NAME).unlink(missing_ok=True)  # until the new index lands, nothing loads
    dist.barrier()
    assert desc is not None  # every rank writes its shard of a directory
    atomic.commit(desc["tmp"], path / desc["file"])
    dist.barrier()
    if r == 0:
        _write_index(path, [d for _, d in results], metadata)
    dist.barrier()


def _check_version(obj: Mapping[str, Any], where: Path) -> None:
    v = obj.get("format_version") if isinstance(obj, Mapping) else None
    if v != FORMAT_VERSION:
        if isinstance(v, int) and v > FORMAT_VERSION:
            raise MaskError(
                f"{where}: mask format version {v} is newer than this ctscale reads "
                f"(version {FORMAT_VERSION}); upgrade ctscale to load it"
            )
        raise MaskError(
            f"{where}: unknown mask format version {v!r} (this ctscale reads "
            f"version {FORMAT_VERSION}); {_FIX}"
        )


def _read_header(file: Path) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(ctscale header, safetensors tensor table, payload offset), reading no payload."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            table = json.loads(f.read(n))
        header = json.loads(table["__metadata__"][_META_KEY])
    except FileNotFoundError:
        raise MaskError(f"{file}: mask file not found; check the path, or {_FIX}") from None
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise MaskError(
            f"{file}: not a readable ctscale mask ({type(e).__name__}: {e}); {_CORRUPT}"
        ) from None
    _check_version(header, file)
    return header, table, 8 + n


def _verify(file: Path, expected: str) -> None:
    """MaskError unless the payload's SHA-256 (sorted-key order) equals ``expected``."""
    _, table, offset = _read_header(file)
    spans = sorted((k, v["data_offsets"]) for k, v in table.items() if k != "__metadata__")
    want_size = offset + max((e for _, (_, e) in spans), default=0)
    size = file.stat().st_size
    if size != want_size:
        raise MaskError(f"{file}: file is {size} bytes, its header describes {want_size}; {_CORRUPT}")
    digest = hashlib.sha256()
    with open(file, "rb") as f:  # streamed in chunks: constant memory
        for _, (lo, hi) in spans:
            f.seek(offset + lo)
            while lo < hi:
                chunk = f.read(min(hi - lo, 1 << 22))
                digest.update(chunk)
                lo += len(chunk)
    if digest.hexdigest() != expected:
        got = digest.hexdigest()
        raise MaskError(
            f"{file}: checksum mismatch (expected {expected[:12]}.., got {got[:12]}..): {_CORRUPT}"
        )


def _layout(path: Path) -> tuple[dict[str, Any], list[tuple[Path, str, list[dict[str, Any]]]]]:
    """(mask-level header, [(file, checksum, piece descriptors)]) from the index or file header."""
    if not path.is_dir():
        header, _, _ = _read_header(path)
        return header, [(path, header["checksum"], header["pieces"])]
    index_file = path / INDEX_NAME
    if not index_file.is_file():
        raise MaskError(
            f"{path}: no {INDEX_NAME}; not a mask directory, or its save did not complete; {_FIX}"
        )
    try:
        index = json.loads(index_file.read_text())
        _check_version(index, index_file)
        return index, [(path / f["file"], f["checksum"], f["pieces"]) for f in index["files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise MaskError(f"{index_file}: unreadable index ({type(e).__name__}: {e}); {_FIX}") from None


def read_info(path: str | Path) -> MaskInfo:
    """Summarise a mask from its index or header, reading no payload bits (local)."""
    header, files = _layout(Path(path))
    shapes: dict[str, tuple[int, ...]] = {}
    selected: dict[str, int] = {}
    for _, _, descs in files:
        for d in descs:
            shapes[d["name"]] = tuple(d["shape"])
            selected[d["name"]] = selected.get(d["name"], 0) + d["count"]
    files_ = [str(f) for f, _, _ in files]
    return MaskInfo(str(path), header["format_version"], header["metadata"], shapes, selected, files_)


def verify(path: str | Path) -> MaskInfo:
    """``read_info`` plus every file's presence, size and SHA-256 checksum (local; reads the
    whole payload once, streamed). MaskError naming the file on the first problem."""
    path = Path(path)
    info = read_info(path)
    _, files = _layout(path)
    for f, checksum, _ in files:
        if not f.is_file():
            raise MaskError(f"{path}: shard {f.name} listed in {INDEX_NAME} is missing; {_FIX}")
        _verify(f, checksum)
    return info


def _read_range(handle: Any, d: dict[str, Any], lo: int, hi: int) -> torch.Tensor:
    """Bits of flat [lo, hi) from piece ``d``, reading only the bytes that overlap it."""
    a, b = lo - d["start"], hi - d["start"]  # offsets inside the piece
    byte_lo, byte_hi = a // 8, (b + 7) // 8
    packed = handle.get_slice(d["key"])[byte_lo:byte_hi]
    return unpack_bits(packed, (byte_hi - byte_lo) * 8)[a - 8 * byte_lo : b - 8 * byte_lo]


def load_mask(
    path: str | Path, wanted: Iterable[tuple[str, tuple[int, ...], int, int]]
) -> dict[tuple[str, int], torch.Tensor]:
    """Bool 1-D masks keyed by (name, start) for each (name, shape, start, end) this rank holds.

    Local: reads only files holding a wanted range (each checksum-verified once), and within
    them only the bytes overlapping it. Names in the mask nobody asked for are not an error.
    """
    path = Path(path)
    _, files = _layout(path)
    for f, _, _ in files:
        if not f.is_file():
            raise MaskError(
                f"{path}: shard {f.name} listed in {INDEX_NAME} is missing; the save did not "
                f"complete or the directory was copied partially; {_FIX}"
            )
    by_name: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for f, _, descs in files:
        for d in descs:
            by_name.setdefault(d["name"], []).append((f, d))
    wanted = [(n, tuple(int(x) for x in s), int(a), int(b)) for n, s, a, b in wanted]
    missing = sorted({n for n, *_ in wanted if n not in by_name})
    if missing:
        raise MaskError(
            f"{path}: the mask lacks {_listing(missing)}; it was made for another model or "
            f"candidate scope; {_FIX} for this model"
        )
    checksums = {f: c for f, c, _ in files}
    out: dict[tuple[str, int], torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for name, shape, start, end in wanted:
            saved = tuple(by_name[name][0][1]["shape"])
            if saved != shape:
                raise _shape_error(path, name, shape, saved)
            if not 0 <= start <= end <= math.prod(shape):
                raise ValueError(f"wanted range [{start}, {end}) of {name!r} is outside shape {shape}")
            bits = torch.zeros(end - start, dtype=torch.bool)
            cursor = start
            for f, d in sorted(by_name[name], key=lambda fd: fd[1]["start"]):
                lo, hi = max(start, d["start"]), min(end, d["end"])
                if lo >= hi:
                    continue
                if lo > cursor:
                    break  # a gap: reported below
                if f not in handles:  # verify each file once, before its first read
                    _verify(f, checksums[f])
                    handles[f] = stack.enter_context(safe_open(str(f), framework="pt"))
                bits[lo - start : hi - start] = _read_range(handles[f], d, lo, hi)
                cursor = max(cursor, hi)
            if cursor < end:
                raise MaskError(
                    f"{path}: the mask does not cover flat range [{cursor}, {end}) of {name!r}; "
                    f"it is incomplete; {_FIX}"
                )
            out[(name, start)] = bits
    return out


def iter_full_tensors(path: str | Path, info: MaskInfo, names: Sequence[str]) -> Iterator[torch.Tensor]:
    """Global 1-D bool bits of each of ``names`` in turn, one tensor in memory at a time (local;
    the reader the mask tools build on). Unlike per-tensor ``load_mask`` calls, each file's
    checksum is verified once. MaskError when a shard is missing or bits disagree with the index."""
    _, files = _layout(Path(path))
    parts: dict[str, list[tuple[Path, str, dict[str, Any]]]] = {}
    for f, checksum, descs in files:
        for d in descs:
            parts.setdefault(d["name"], []).append((f, checksum, d))
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for name in names:
            n = math.prod(info.shapes[name])
            bits, cursor = torch.zeros(n, dtype=torch.bool), 0
            for f, checksum, d in sorted(parts[name], key=lambda p: p[2]["start"]):
                if d["start"] == d["end"]:
                    continue  # an empty piece of an empty tensor
                if d["start"] != cursor:
                    break  # a gap: reported below
                if f not in handles:
                    if not f.is_file():
                        raise MaskError(f"{path}: shard {f.name} is missing; re-create the mask")
                    _verify(f, checksum)
                    handles[f] = stack.enter_context(safe_open(str(f), framework="pt"))
                bits[cursor : d["end"]] = _read_range(handles[f], d, d["start"], d["end"])
                cursor = d["end"]
            if cursor != n or int(torch.count_nonzero(bits)) != info.selected[name]:
                raise MaskError(f"{path}: the bits of {name!r} disagree with its index; re-create the mask")
            yield bits


def check_names(info: MaskInfo, model_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """MaskError if the mask names a parameter the model lacks, or a shape differs (local).

    The model may have parameters the mask lacks: those are simply not candidates.
    """
    extra = sorted(set(info.shapes) - set(model_shapes))
    if extra:
        raise MaskError(
            f"{info.path}: the mask names {_listing(extra)}, which this model lacks; mask for "
            f"another model? Use the mask made for this model, or {_FIX}"
        )
    for name, shape in sorted(info.shapes.items()):
        if tuple(model_shapes[name]) != shape:
            raise _shape_error(info.path, name, model_shapes[name], shape)
