"""Exact global top-k over sharded scores, without gathering the scores.

Each rank holds scores for some flat ranges ("pieces") of some parameters. We find the k-th
largest value T by radix select on the float32 bit pattern (non-negative floats order like
their int32 bits): 4 passes over the local scores, each building a 256-bin histogram of one
byte among the entries that match the prefix found so far, summed across ranks with one
all-reduce of 256 counts. Entries above T are chosen; among entries equal to T, the first ones
in (name, flat index) order are chosen until exactly k are. Ties are resolved with one
all-gather of a per-piece count. Besides the output masks (1 B per entry), extra memory is
chunk-sized temporaries only (a few MiB, whatever the number of scores); at world size 1 the
collectives are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from ctscale import dist

_CHUNK = 1 << 18  # entries per pass step: bounds temporaries to ~1 MiB each
_SHIFTS = (24, 16, 8, 0)
Key = tuple[str, int]  # (canonical name, start of the flat range held here)


def _bits(scores: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of non-negative float32 scores (a view, no copy)."""
    if scores.dtype != torch.float32:
        raise TypeError(f"scores must be float32, got {scores.dtype}")
    return scores.view(torch.int32)


def _chunks(bits: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, view) of consecutive ``_CHUNK``-entry slices of a 1-D tensor."""
    for lo in range(0, bits.numel(), _CHUNK):
        yield lo, bits[lo : lo + _CHUNK]


def _prefix_histogram(pieces: Mapping[Key, torch.Tensor], prefix: int, shift: int) -> torch.Tensor:
    """Local counts of byte ``shift`` among entries whose higher bytes equal ``prefix``'s."""
    hist = torch.zeros(257, dtype=torch.int64)
    high = shift + 8
    for scores in pieces.values():
        for _, chunk in _chunks(_bits(scores).reshape(-1)):
            byte = (chunk >> shift) & 0xFF
            if high < 32:  # entries outside the prefix go to the spill bin 256
                byte = byte.masked_fill((chunk >> high) != (prefix >> high), 256)
            hist += torch.bincount(byte, minlength=257).cpu()
    return hist[:256]


def kth_largest_bits(pieces: Mapping[Key, torch.Tensor], k: int) -> tuple[int, int]:
    """Bit pattern T of the global k-th largest score, and how many entries equal to T to take.

    Collective: every rank calls it with its local pieces; 4 all-reduces of 256 int64.
    """
    prefix, remaining = 0, k
    for shift in _SHIFTS:
        hist = dist.all_reduce_sum_(_prefix_histogram(pieces, prefix, shift))
        above = 0
        for byte in range(255, -1, -1):
            count = int(hist[byte])
            if above + count >= remaining:
                prefix |= byte << shift
                remaining -= above
                break
            above += count
        else:  # fewer than k entries in total: the caller checked k <= N, so this is a bug
            raise AssertionError(f"radix select: fewer than {k} scores")
    return prefix, remaining


def select_top_k(pieces: Mapping[Key, torch.Tensor], k: int) -> dict[Key, torch.Tensor]:
    """Bool masks (local, per piece) choosing exactly ``k`` entries globally.

    ``pieces`` maps (name, start) to this rank's 1-D float32 non-negative scores of the flat
    range starting at ``start``. Ties at the threshold go to the smallest (name, flat index).
    Collective when distributed.
    """
    threshold, ties_to_take = kth_largest_bits(pieces, k)
    local_ties = {
        key: sum(int((chunk == threshold).sum()) for _, chunk in _chunks(_bits(s)))
        for key, s in pieces.items()
        if s.numel()
    }
    ties_before: dict[Key, int] = {}
    taken = 0
    all_ties = sorted(t for rank_ties in dist.all_gather_objects(local_ties) for t in rank_ties.items())
    for key, count in all_ties:
        ties_before[key] = taken
        taken += count
    masks = {}
    for key, scores in pieces.items():
        mask = _bits(scores) > threshold
        take = min(max(ties_to_take - ties_before.get(key, 0), 0), local_ties.get(key, 0))
        if take:
            _take_first_ties(_bits(scores), threshold, take, mask)
        masks[key] = mask
    return masks


def _take_first_ties(bits: torch.Tensor, threshold: int, take: int, mask: torch.Tensor) -> None:
    """Set ``mask`` on the first ``take`` entries equal to ``threshold``, a chunk at a time."""
    for lo, chunk in _chunks(bits):
        tie = chunk == threshold
        count = int(tie.sum())
        if count > take:
            tie &= torch.cumsum(tie, 0) <= take
        mask[lo : lo + chunk.numel()] |= tie
        take -= min(count, take)
        if take == 0:
            return
