"""Exact global top-k over sharded scores, without gathering the scores.

Each rank holds scores for some flat ranges ("pieces") of some parameters. We find the k-th
largest value T by radix select on the float32 bit pattern (non-negative floats order like
their int32 bits) in 2 passes over the local scores: a histogram of the high 16 bits (sign,
exponent, 7 mantissa bits), then one of the low 16 bits among the entries in T's high bin.
Each histogram (65,536 counts) is summed across ranks with one all-reduce. Entries above T are
chosen; among entries equal to T, the first ones in (name, flat index) order are chosen until
exactly k are. Ties are resolved with one all-gather of a per-piece count. Besides the output
masks (1 B per entry), extra memory is chunk-sized temporaries and two histograms (a few MiB,
whatever the number of scores); at world size 1 the collectives are skipped. Counts stay on the
scores' device until a histogram is complete, so a GPU syncs with the host once per histogram
and once per piece (its tie count), not once per chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from ctscale import dist

_CHUNK = 1 << 18  # entries per step on CPU: bounds temporaries to ~1 MiB each
_CHUNK_GPU = 1 << 23  # fewer, larger kernels on an accelerator (32 MiB temporaries)
_BINS = 1 << 16
Key = tuple[str, int]  # (canonical name, start of the flat range held here)


def _bits(scores: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of non-negative float32 scores (a view, no copy)."""
    if scores.dtype != torch.float32:
        raise TypeError(f"scores must be float32, got {scores.dtype}")
    return scores.view(torch.int32)


def _chunks(bits: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, view) of consecutive chunk-sized slices of a 1-D tensor."""
    step = _CHUNK if bits.device.type == "cpu" else _CHUNK_GPU
    for lo in range(0, bits.numel(), step):
        yield lo, bits[lo : lo + step]


def _histogram(pieces: Mapping[Key, torch.Tensor], high: int | None) -> torch.Tensor:
    """Local counts of the high 16 bits of every entry (``high`` None), or of the low 16 bits
    of the entries whose high 16 bits equal ``high``; summed on the scores' device."""
    hist = None
    for scores in pieces.values():
        for _, chunk in _chunks(_bits(scores).reshape(-1)):
            if high is None:
                values = chunk >> 16  # non-negative: the sign bit is 0
            else:
                values = chunk[(chunk >> 16) == high] & (_BINS - 1)
            counts = torch.bincount(values, minlength=_BINS)
            hist = counts if hist is None else hist.add_(counts.to(hist.device))
    return torch.zeros(_BINS, dtype=torch.int64) if hist is None else hist


def _bin_of_kth(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest entry, its rank among that bin's entries, from the top)."""
    from_top = hist.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype)))
    if i == _BINS:  # fewer than k entries in total: the caller checked k <= N, so this is a bug
        raise AssertionError(f"radix select: fewer than {k} scores")
    above = int(from_top[i - 1]) if i else 0
    return _BINS - 1 - i, k - above


def kth_largest_bits(pieces: Mapping[Key, torch.Tensor], k: int) -> tuple[int, int]:
    """Bit pattern T of the global k-th largest score, and how many entries equal to T to take.

    Collective: every rank calls it with its local pieces; 2 all-reduces of 65,536 int64.
    """
    high, remaining = _bin_of_kth(dist.all_reduce_sum_(_histogram(pieces, None)).cpu(), k)
    low, remaining = _bin_of_kth(dist.all_reduce_sum_(_histogram(pieces, high)).cpu(), remaining)
    return high << 16 | low, remaining


def select_top_k(pieces: Mapping[Key, torch.Tensor], k: int) -> dict[Key, torch.Tensor]:
    """Bool masks (local, per piece) choosing exactly ``k`` entries globally.

    ``pieces`` maps (name, start) to this rank's 1-D float32 non-negative scores of the flat
    range starting at ``start``. Ties at the threshold go to the smallest (name, flat index).
    Collective when distributed.
    """
    threshold, ties_to_take = kth_largest_bits(pieces, k)
    masks, local_ties = {}, {}
    for key, scores in pieces.items():
        masks[key], ties = _above_and_ties(_bits(scores), threshold)
        if scores.numel():
            local_ties[key] = ties
    ties_before: dict[Key, int] = {}
    taken = 0
    all_ties = sorted(t for rank_ties in dist.all_gather_objects(local_ties) for t in rank_ties.items())
    for key, count in all_ties:
        ties_before[key] = taken
        taken += count
    for key, scores in pieces.items():
        take = min(max(ties_to_take - ties_before.get(key, 0), 0), local_ties.get(key, 0))
        if take:
            _take_first_ties(_bits(scores), threshold, take, masks[key])
    return masks


def _above_and_ties(bits: torch.Tensor, threshold: int) -> tuple[torch.Tensor, int]:
    """The mask of entries above ``threshold`` and the count of those equal to it, in one pass."""
    mask = torch.empty(bits.shape, dtype=torch.bool, device=bits.device)
    ties = torch.zeros((), dtype=torch.int64, device=bits.device)
    for lo, chunk in _chunks(bits):
        torch.gt(chunk, threshold, out=mask[lo : lo + chunk.numel()])
        ties += (chunk == threshold).sum()
    return mask, int(ties)


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
