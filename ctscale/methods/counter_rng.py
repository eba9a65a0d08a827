"""Counter-based random numbers: a pure function of (seed, step, name, flat index).

CT-F needs a Bernoulli draw per gradient entry per step that does not depend on how a tensor
is split across ranks, nor on what ran before (so a resumed run draws the same masks). A
stateful generator gives neither; hashing the coordinates gives both.

Per element: ``u = fmix32((index * GOLDEN) ^ key)`` (MurmurHash3's finaliser, a bijection on
32 bits), computed in int32 with wrap-around multiplication and masked (logical) shifts;
``key`` hashes (seed, step, name) with BLAKE2b. The key enters by XOR, not addition, so two
(step, name) streams are never shifted copies of each other. int32 keeps the hot loop at
half the memory traffic of int64.

CT-F applies the draw with ``keep_and_rescale_``: hash, compare and ``grad *= keep / p`` one
cache-sized chunk at a time, with in-place int32 ops on two scratch buffers (about 3 ns per
element on one CPU core, against ~15 ns for ``bernoulli_mask`` followed by two multiplies over
the whole tensor), or as one fused kernel from ``torch.compile`` (the default on CUDA: Triton).
Both give exactly ``bernoulli_mask``'s bits (tests, and bench/gpu_check.py on a GPU).
"""

from __future__ import annotations

import functools
import hashlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ctscale.config import Config

_GOLDEN = 0x9E3779B1
_MIX1 = 0x85EBCA6B
_MIX2 = 0xC2B2AE35
_UNIFORM_BITS = 24  # resolution of the draw: p is honoured to within 2**-24


def mask_seed(cfg: Config) -> int:
    """The seed of a run's counter-RNG masks: ``method.mask_seed``, else ``train.seed``."""
    return cfg.train.seed if cfg.method.mask_seed is None else cfg.method.mask_seed


_CHUNK = 1 << 22  # elements hashed at once; bounds the scratch memory to 16 MiB
_EAGER_CHUNK = {"cpu": 1 << 18, "cuda": 1 << 22}  # CPU: the two scratch buffers stay in L2 cache
_COMPILED_CHUNK = 1 << 24  # the fused kernel has no temporaries to bound
_SIGN = -(1 << 31)  # int32 with only the sign bit: x ^ _SIGN orders int32 bits as unsigned
_BLOCK = 1 << 31  # int32 indices: each 2**31-element block of a tensor gets its own key


def _signed32(x: int) -> int:
    """A uint32 constant as the int32 with the same bits."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def stream_key(seed: int, step: int, name: str, block: int = 0) -> int:
    """A 32-bit key (as int32) for one parameter's draws at one step."""
    text = f"{seed}\x00{step}\x00{name}\x00{block}"
    digest = hashlib.blake2b(text.encode(), digest_size=4).digest()
    return _signed32(int.from_bytes(digest, "little"))


def keep_threshold(p: float) -> int:
    """Integer t such that a uniform 24-bit draw is below t with probability ~p."""
    return round(p * (1 << _UNIFORM_BITS))


def _fmix_(x: torch.Tensor, key: int, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """In place, indices -> 32-bit hashes: ``fmix32((x * GOLDEN) ^ key)``; ``tmp`` is scratch."""
    x.mul_(_signed32(_GOLDEN)).bitwise_xor_(key)
    for shift, factor in ((16, _MIX1), (13, _MIX2), (16, None)):
        high = (
            torch.bitwise_right_shift(x, shift)
            if tmp is None
            else torch.bitwise_right_shift(x, shift, out=tmp)
        )
        x.bitwise_xor_(high.bitwise_and_((1 << (32 - shift)) - 1))  # logical shift: mask the sign copies
        if factor is not None:
            x.mul_(_signed32(factor))
    return x


def uniform_bits(key: int, lo: int, hi: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """24-bit uniform draws (int32) for indices ``[lo, hi)`` of one stream; ``hi <= 2**31``."""
    x = _fmix_(torch.arange(lo, hi, dtype=torch.int32, device=device), key)
    return (x >> (32 - _UNIFORM_BITS)) & ((1 << _UNIFORM_BITS) - 1)


def bernoulli_mask(
    seed: int,
    step: int,
    name: str,
    start: int,
    end: int,
    p: float,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bool mask of flat elements ``[start, end)`` of parameter ``name`` at ``step``; True w.p. p.

    Element i's bit depends only on (seed, step, name, i): the mask of a slice is the slice of
    the mask, whatever the sharding, world size or backend.
    """
    threshold = keep_threshold(p)
    out = torch.empty(end - start, dtype=torch.bool, device=device)
    for lo, hi, first, key in _stream_chunks(seed, step, name, start, end, _CHUNK):
        draws = uniform_bits(key, first, first + hi - lo, device)
        torch.lt(draws, threshold, out=out[lo - start : hi - start])
    return out


def _stream_chunks(seed: int, step: int, name: str, start: int, end: int, chunk: int):
    """(lo, hi, index of lo in its 2**31-block, the block's key) for chunks of ``[start, end)``
    that never straddle a block (the int32 indices restart in each)."""
    lo = start
    while lo < end:
        block = lo // _BLOCK
        hi = min(lo + chunk, end, (block + 1) * _BLOCK)
        yield lo, hi, lo - block * _BLOCK, stream_key(seed, step, name, block)
        lo = hi


def keep_and_rescale_(
    grad: torch.Tensor, seed: int, step: int, name: str, start: int, p: float, compiled: bool = False
) -> torch.Tensor:
    """``grad *= bernoulli_mask(seed, step, name, start, start + n, p) / p`` in place, fused.

    ``grad`` is the contiguous 1-D local piece holding flat elements ``[start, start + n)`` of
    parameter ``name``. The draw u < t on the top 24 bits of the hash is the same test as
    ``hash < t * 256`` on all 32 bits read as unsigned, which saves two passes per chunk.
    """
    threshold = keep_threshold(p)
    if threshold >= 1 << _UNIFORM_BITS:  # p = 1: every entry kept, the rescale is by 1
        return grad
    bound = _signed32((threshold << (32 - _UNIFORM_BITS)) ^ _SIGN)
    kernel = _compiled_call if compiled else _eager_kernel
    chunk, scratch = _COMPILED_CHUNK, None
    if not compiled:
        chunk = _EAGER_CHUNK["cpu" if grad.device.type == "cpu" else "cuda"]
        size = min(chunk, grad.numel())
        scratch = tuple(torch.empty(size, dtype=torch.int32, device=grad.device) for _ in range(2))
    for lo, hi, first, key in _stream_chunks(seed, step, name, start, start + grad.numel(), chunk):
        kernel(grad[lo - start : hi - start], first, key, bound, 1.0 / p, scratch)
    return grad


def _eager_kernel(g: torch.Tensor, first: int, key: int, bound: int, scale: float, scratch) -> None:
    x, tmp = (buf[: g.numel()] for buf in scratch)
    torch.arange(first, first + g.numel(), dtype=torch.int32, device=g.device, out=x)
    keep = torch.lt(_fmix_(x, key, tmp).bitwise_xor_(_SIGN), bound)
    # multiplying by the bool mask gives the same update as masked_fill_(~keep, 0) (-0.0 only
    # differs in sign) and is ~3x faster on CPU
    g.mul_(keep).mul_(scale)


def _compiled_call(g: torch.Tensor, first: int, key: int, bound: int, scale: float, scratch) -> None:
    # first, key and bound go in as int32 tensors: as Python ints, dynamic shapes make them
    # int64 kernel arguments and Triton then computes the hash in int64 (different bits)
    first, key, bound = torch.tensor([first, key, bound], dtype=torch.int32).to(g.device)
    _compiled_kernel()(g, first, key, bound, scale)


def _fused(g: torch.Tensor, first: torch.Tensor, key: torch.Tensor, bound: torch.Tensor, scale: float):
    """``_eager_kernel``'s arithmetic written out for ``torch.compile`` to fuse; every product is
    cast back to int32 so that no code generator can keep it in a wider type."""
    i32 = torch.int32
    x = torch.arange(g.numel(), dtype=i32, device=g.device) + first
    x = (x * _signed32(_GOLDEN)).to(i32) ^ key
    x = ((x ^ ((x >> 16) & 0xFFFF)) * _signed32(_MIX1)).to(i32)
    x = ((x ^ ((x >> 13) & 0x7FFFF)) * _signed32(_MIX2)).to(i32)
    x = x ^ ((x >> 16) & 0xFFFF)
    g.mul_((x ^ _SIGN) < bound).mul_(scale)


@functools.cache
def _compiled_kernel():
    """``_fused`` compiled once per process (dynamic shapes: one graph for every chunk size)."""
    return torch.compile(_fused, dynamic=True)
