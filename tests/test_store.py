"""Tests for ctscale.storage.mask_file: bit packing, single-file and sharded masks, resharding, errors."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed
import torch.multiprocessing
from safetensors import safe_open

from ctscale.errors import MaskError
from ctscale.storage import mask_file
from ctscale.storage.mask_file import (
    FORMAT_VERSION,
    MaskPiece,
    check_names,
    load_mask,
    pack_bits,
    read_info,
    save_mask,
    unpack_bits,
)

# Sizes chosen so ZeRO-style partitions fall on non-byte-aligned flat offsets.
SHAPES = {"enc.w": (13, 7), "enc.b": (13,), "dec.w": (5, 11), "head": (3,)}
META = {"method": "ct-f", "reserve_p": 0.3, "seed": 7, "scope": "all", "counts": {"a": 1}}


def full_mask(seed: int = 0, shapes: dict = SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(math.prod(s), generator=g) < 0.3 for n, s in shapes.items()}


def zero_ranges(world: int, shapes: dict = SHAPES) -> list[list[tuple]]:
    """(name, shape, start, end) per rank, as ZeRO partitions one flat buffer of all params."""
    total = sum(math.prod(s) for s in shapes.values())
    bounds = [total * r // world for r in range(world + 1)]
    out: list[list[tuple]] = [[] for _ in range(world)]
    offset = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        for r in range(world):
            lo, hi = max(bounds[r], offset), min(bounds[r + 1], offset + n)
            if lo < hi:
                out[r].append((name, shape, lo - offset, hi - offset))
        offset += n
    return out


def pieces_of(full: dict, ranges: list[tuple]) -> list[MaskPiece]:
    return [MaskPiece(n, s, a, b, full[n][a:b].clone()) for n, s, a, b in ranges]


def assert_matches(got: dict, full: dict, ranges: list[tuple]) -> None:
    assert set(got) == {(n, a) for n, _, a, _ in ranges}
    for n, _, a, b in ranges:
        assert got[(n, a)].dtype == torch.bool
        assert torch.equal(got[(n, a)], full[n][a:b]), (n, a, b)


def whole(shapes: dict = SHAPES) -> list[tuple]:
    return [(n, s, 0, math.prod(s)) for n, s in shapes.items()]


def rewrite_header(file: Path, **changes) -> None:
    """Rewrite a mask file with its ctscale header JSON edited."""
    tensors = safetensors.torch.load_file(str(file))
    with safe_open(str(file), framework="pt") as f:
        header = json.loads(f.metadata()["ctscale"])
    header.update(changes)
    safetensors.torch.save_file(tensors, str(file), metadata={"ctscale": json.dumps(header)})


# --- bit packing --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000])
def test_pack_roundtrip(n: int) -> None:
    bits = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 7) // 8,)
    assert torch.equal(unpack_bits(packed, n), bits)


def test_pack_bit_order_is_little() -> None:
    bits = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert pack_bits(bits).tolist() == [0b1101, 1]
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 9)


# --- single file --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_file_roundtrip(tmp_path: Path, seed: int) -> None:
    full = full_mask(seed)
    path = tmp_path / "mask.safetensors"
    save_mask(path, pieces_of(full, whole()), META)
    assert_matches(load_mask(path, whole()), full, whole())
    info = read_info(path)
    assert info.format_version == FORMAT_VERSION and info.metadata == META
    assert info.files == [str(path)]
    assert info.shapes == SHAPES
    assert info.selected == {n: int(b.sum()) for n, b in full.items()}
    assert info.total_selected == sum(int(b.sum()) for b in full.values())
    assert info.total_entries == 91 + 13 + 55 + 3
    with safe_open(str(path), framework="pt") as f:  # whole pieces use the canonical name
        assert sorted(f.keys()) == sorted(SHAPES)
        assert f.get_tensor("enc.w").dtype == torch.uint8


def test_subranges_across_pieces(tmp_path: Path) -> None:
    full = full_mask(3)
    cuts = {"enc.w": [0, 5, 17, 50, 91], "enc.b": [0, 13], "dec.w": [0, 9, 55], "head": [0, 1, 3]}
    ranges = [(n, SHAPES[n], a, b) for n, c in cuts.items() for a, b in zip(c, c[1:])]
    path = tmp_path / "m.safetensors"
    save_mask(path, pieces_of(full, ranges), META)
    with safe_open(str(path), framework="pt") as f:
        assert "enc.w@17" in f.keys() and "enc.b" in f.keys()
    wanted = [
        ("enc.w", (13, 7), 3, 60),  # unaligned start, spans three saved pieces
        ("enc.w", (13, 7), 17, 18),
        ("enc.w", (13, 7), 90, 91),
        ("enc.w", (13, 7), 40, 40),  # empty
        ("dec.w", (5, 11), 1, 54),
        ("head", (3,), 0, 3),
    ]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a, b = sorted(torch.randint(0, 92, (2,), generator=g).tolist())
        wanted.append(("enc.w", (13, 7), a, b))
    for w in wanted:  # one at a time: repeated starts would share a key
        assert_matches(load_mask(path, [w]), full, [w])


# --- sharded ------------------------------------------------------------------------------


def test_sharded_resharding(tmp_path: Path) -> None:
    full = full_mask(4)
    two = zero_ranges(2)
    descs = [mask_file._save_shard(tmp_path, pieces_of(full, two[r]), r, 2, META) for r in range(2)]
    mask_file._write_index(tmp_path, descs, META)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mask-00000-of-00002.safetensors",
        "mask-00001-of-00002.safetensors",
        "mask.index.json",
    ]
    assert_matches(load_mask(tmp_path, whole()), full, whole())  # world size 1
    for ranges in zero_ranges(3):  # world size 3
        assert_matches(load_mask(tmp_path, ranges), full, ranges)
    info = read_info(tmp_path)
    assert info.metadata == META and len(info.files) == 2 and info.shapes == SHAPES
    assert info.selected == {n: int(b.sum()) for n, b in full.items()}


def test_sharded_with_empty_rank(tmp_path: Path) -> None:
    full = full_mask(5)
    two = zero_ranges(2)
    ranks = {0: two[0], 1: [], 2: two[1]}  # rank 1 holds nothing: it still writes a shard
    descs = [mask_file._save_shard(tmp_path, pieces_of(full, rs), r, 3, META) for r, rs in ranks.items()]
    mask_file._write_index(tmp_path, descs, META)
    assert (tmp_path / "mask-00001-of-00003.safetensors").is_file()
    assert descs[1]["pieces"] == []
    assert_matches(load_mask(tmp_path, whole()), full, whole())


def test_save_mask_directory_overwrites_and_drops_stale_shards(tmp_path: Path) -> None:
    old, new = full_mask(6), full_mask(7)
    two = zero_ranges(2)
    descs = [mask_file._save_shard(tmp_path, pieces_of(old, two[r]), r, 2, META) for r in range(2)]
    mask_file._write_index(tmp_path, descs, META)
    save_mask(tmp_path, pieces_of(new, whole()), {"method": "new"})  # world size 1, a directory
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mask-00000-of-00001.safetensors",
        "mask.index.json",
    ]
    assert_matches(load_mask(tmp_path, two[1]), new, two[1])
    assert read_info(tmp_path).metadata == {"method": "new"}


def test_save_rejects_bad_pieces(tmp_path: Path) -> None:
    full = full_mask(0)
    with pytest.raises(ValueError, match="gap"):
        save_mask(tmp_path / "a.safetensors", pieces_of(full, zero_ranges(2)[1]), META)
    with pytest.raises(ValueError, match="overlap"):
        save_mask(tmp_path / "b.safetensors", pieces_of(full, whole() + [("head", (3,), 1, 2)]), META)
    with pytest.raises(ValueError, match="1-D bool"):
        save_mask(tmp_path / "c.safetensors", [MaskPiece("head", (3,), 0, 3, torch.ones(3))], META)
    assert not list(tmp_path.iterdir())


# --- errors -------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "mask.safetensors"
    save_mask(path, pieces_of(full_mask(0), whole()), META)
    return path


def test_missing_names(saved: Path) -> None:
    with pytest.raises(MaskError, match=r"the mask lacks 1 parameter\(s\) nope;.*another model"):
        load_mask(saved, [("nope", (3,), 0, 3), ("head", (3,), 0, 3)])
    many = [(f"x{i:02d}", (2,), 0, 2) for i in range(12)]
    with pytest.raises(MaskError, match=r"lacks 12 parameter\(s\) x00, .*x09 \(and 2 more\)") as err:
        load_mask(saved, many)
    assert "x10" not in str(err.value) and str(saved) in str(err.value)


def test_wrong_shape(saved: Path) -> None:
    with pytest.raises(MaskError, match=r"'enc.w' has shape \[7, 13\] in the model but \[13, 7\]"):
        load_mask(saved, [("enc.w", (7, 13), 0, 91)])


def test_future_format_version(saved: Path, tmp_path: Path) -> None:
    rewrite_header(saved, format_version=FORMAT_VERSION + 1)
    with pytest.raises(MaskError, match=r"version 2 is newer.*reads \(version 1\); upgrade ctscale"):
        load_mask(saved, whole())
    with pytest.raises(MaskError, match="upgrade ctscale"):
        read_info(saved)
    d = tmp_path / "dir"
    save_mask(d, pieces_of(full_mask(0), whole()), META)
    index = json.loads((d / "mask.index.json").read_text())
    (d / "mask.index.json").write_text(json.dumps({**index, "format_version": 9}))
    with pytest.raises(MaskError, match="version 9 is newer"):
        read_info(d)


def test_corrupted_payload_byte(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[-1] ^= 0x10
    saved.write_bytes(bytes(data))
    with pytest.raises(MaskError, match=r"checksum mismatch.*corrupt or was truncated.*ctscale fisher"):
        load_mask(saved, [("head", (3,), 0, 3)])


@pytest.mark.parametrize("keep", [3, 20, -2])
def test_truncated_file(saved: Path, keep: int) -> None:
    saved.write_bytes(saved.read_bytes()[:keep])
    with pytest.raises(MaskError, match="corrupt or was truncated"):
        load_mask(saved, whole())


def test_index_points_to_missing_shard(tmp_path: Path) -> None:
    full = full_mask(0)
    two = zero_ranges(2)
    descs = [mask_file._save_shard(tmp_path, pieces_of(full, two[r]), r, 2, META) for r in range(2)]
    mask_file._write_index(tmp_path, descs, META)
    (tmp_path / "mask-00001-of-00002.safetensors").unlink()
    with pytest.raises(
        MaskError, match=r"shard mask-00001-of-00002\.safetensors listed in mask\.index\.json is missing"
    ):
        load_mask(tmp_path, two[0])
    (tmp_path / "mask.index.json").unlink()
    with pytest.raises(MaskError, match=r"no mask\.index\.json; .*did not complete"):
        load_mask(tmp_path, two[0])
    with pytest.raises(MaskError, match="not found"):
        read_info(tmp_path / "absent.safetensors")


def test_check_names(saved: Path) -> None:
    info = read_info(saved)
    check_names(info, {**SHAPES, "extra.param": (4,)})  # the model may have more
    with pytest.raises(
        MaskError,
        match=r"names 2 parameter\(s\) dec.w, head, which this model lacks; mask for another model\?",
    ):
        check_names(info, {"enc.w": (13, 7), "enc.b": (13,)})
    with pytest.raises(MaskError, match=r"'enc.b' has shape \[14\] in the model but \[13\]"):
        check_names(info, {**SHAPES, "enc.b": torch.Size([14])})


# --- atomic writes ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mask.safetensors", "maskdir"])
def test_failed_write_keeps_previous_mask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    path = tmp_path / name
    old = full_mask(8)
    save_mask(path, pieces_of(old, whole()), META)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    real_save = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:10])  # half-written
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_mask(path, pieces_of(full_mask(9), whole()), {"method": "new"})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no temp file left
    assert_matches(load_mask(path, whole()), old, whole())
    assert read_info(path).metadata == META


# --- real 2-process save/load -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        full, ranges = full_mask(11), zero_ranges(world)
        sharded = Path(root) / "sharded"
        save_mask(sharded, pieces_of(full, ranges[rank]), META)
        other = ranges[(rank + 1) % world]
        assert_matches(load_mask(sharded, other), full, other)
        assert len(read_info(sharded).files) == world
        # Single file from a world of 2: rank 0 holds every piece, rank 1 none.
        single = Path(root) / "one.safetensors"
        save_mask(single, pieces_of(full, whole()) if rank == 0 else [], META)
        assert_matches(load_mask(single, ranges[rank]), full, ranges[rank])
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_save_and_reshard(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    full = full_mask(11)
    assert_matches(load_mask(tmp_path / "sharded", whole()), full, whole())
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        "mask-00000-of-00002.safetensors",
        "mask-00001-of-00002.safetensors",
        "mask.index.json",
    ]
