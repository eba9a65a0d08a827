"""Counter-based random numbers: a pure function of (seed, step, name, flat index).

CT-F needs a Bernoulli draw per gradient entry per step that does not depend on how a tensor
is split across ranks, nor on what ran before (so a resumed run draws the same masks). A
stateful generator gives neither; hashing the coordinates gives both.

Per element: ``u = fmix32((index * GOLDEN) ^ key)`` (MurmurHash3's finaliser, a bijection on
32 bits), computed in int32 with wrap-around multiplication and masked (logical) shifts;
``key`` hashes (seed, step, name) with BLAKE2b. The key enters by XOR, not addition, so two
(step, name) streams are never shifted copies of each other. int32 keeps the hot loop at
half the memory traffic of int64: about 18 ns per element on one 2-core CPU.
"""

from __future__ import annotations

import hashlib

import torch

_GOLDEN = 0x9E3779B1
_MIX1 = 0x85EBCA6B
_MIX2 = 0xC2B2AE35
_UNIFORM_BITS = 24  # resolution of the draw: p is honoured to within 2**-24
_CHUNK = 1 << 22  # elements hashed at once; bounds the scratch memory to 16 MiB
_BLOCK = 1 << 31  # int32 indices: each 2**31-element block of a tensor gets its own key


def _signed32(x: int) -> int:
    """A uint32 constant as the int32 with the same bits."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def _xorshift_(x: torch.Tensor, bits: int) -> None:
    """``x ^= x >>> bits`` on int32 bit patterns (torch's ``>>`` is arithmetic, so mask)."""
    x ^= (x >> bits) & ((1 << (32 - bits)) - 1)


def stream_key(seed: int, step: int, name: str, block: int = 0) -> int:
    """A 32-bit key (as int32) for one parameter's draws at one step."""
    text = f"{seed}\x00{step}\x00{name}\x00{block}"
    digest = hashlib.blake2b(text.encode(), digest_size=4).digest()
    return _signed32(int.from_bytes(digest, "little"))


def keep_threshold(p: float) -> int:
    """Integer t such that a uniform 24-bit draw is below t with probability ~p."""
    return round(p * (1 << _UNIFORM_BITS))


def uniform_bits(key: int, lo: int, hi: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """24-bit uniform draws (int32) for indices ``[lo, hi)`` of one stream; ``hi <= 2**31``."""
    x = torch.arange(lo, hi, dtype=torch.int32, device=device)
    x *= _signed32(_GOLDEN)
    x ^= key
    _xorshift_(x, 16)
    x *= _signed32(_MIX1)
    _xorshift_(x, 13)
    x *= _signed32(_MIX2)
    _xorshift_(x, 16)
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
    lo = start
    while lo < end:
        block = lo // _BLOCK
        hi = min(lo + _CHUNK, end, (block + 1) * _BLOCK)
        key = stream_key(seed, step, name, block)
        base = block * _BLOCK
        draws = uniform_bits(key, lo - base, hi - base, device)
        torch.lt(draws, threshold, out=out[lo - start : hi - start])
        lo = hi
    return out
