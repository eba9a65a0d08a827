"""Time and peak extra memory of the distributed exact global top-p selection, vs the reference.

    python bench/selection_scale.py --sizes 1e7,1e8,1.5e9
    python bench/selection_scale.py --sizes 1e7 --repeats 3            # quick

Synthetic Fisher: N fp32 scores in tensors of realistic sizes (cycling 4096x4096, 4096x1024,
1024x4096, 1024x1024, 1024; the last one cut so that the total is N), each tensor's flat range
split in 2 contiguous halves, one per rank (as ZeRO-3/FSDP2 shard). Each rank generates its own
halves (no transfer): exponential(1) values rounded to bfloat16 precision (many ties), those
below 0.05 set to 0 (~5 % zeros: entries that never got a gradient). Seeds depend only on the
tensor and the range, so the parent process can regenerate the same scores.

On 2 gloo ranks (tests/dist_harness.run_world, 1 thread each), per repeat:
``ctscale.methods.ct_d.topk.select_top_k(pieces, k)`` with ``k = round(p * N)`` (the whole selection,
including the returned bool masks), and separately its threshold search
``kth_largest_bits`` alone. Time: after a barrier, the slowest rank, median over repeats. Memory:
a thread samples this rank's RSS (psutil) every 5 ms; peak extra = peak RSS during the call minus
RSS just before it (scores allocated, previous results freed, ``malloc_trim``), the largest over
repeats and ranks. tracemalloc cannot see torch's allocations, hence RSS.

Checked where N <= --verify-max: the selected count is exactly k on every run, and the set equals
a single-process reference (all scores concatenated, stable descending sort, first k: ties go to
the smallest (name, flat index), the rule select.py documents).

Reference approach (the original Child-Tuning code): all scores on one host as one NumPy array,
``thr = np.percentile(all, 100 * (1 - p))``, masks ``scores >= thr``; timed with its peak extra
memory over the scores, where ~13 bytes per entry fit in the available memory (the scores, the
concatenation, percentile's partition copy and the masks), skipped with the reason otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import shlex
import sys
import time

import numpy as np
import psutil
import torch
from _common import RssPeak, load, machine_line, median, run_world, table

SHAPES = [(4096, 4096), (4096, 1024), (1024, 4096), (1024, 1024), (1024,)]
GiB = 2**30


def layout(n: int) -> list[tuple[str, int]]:
    """(name, numel) of the global tensors, N entries in all; names sort in creation order."""
    out, total, i = [], 0, 0
    while total < n:
        numel = min(int(np.prod(SHAPES[i % len(SHAPES)])), n - total)
        out.append((f"layer.{i:06d}.weight", numel))
        total += numel
        i += 1
    return out


def my_ranges(n: int, rank: int, world: int) -> list[tuple[str, int, int]]:
    """(name, start, end): the contiguous flat range of every tensor that ``rank`` holds."""
    out = []
    for name, numel in layout(n):
        part = -(-numel // world)
        start, end = min(rank * part, numel), min((rank + 1) * part, numel)
        if start < end:
            out.append((name, start, end))
    return out


def scores(name: str, start: int, end: int, seed: int) -> torch.Tensor:
    """Deterministic synthetic Fisher values of one range: heavy ties, ~5 % zeros."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + int(name.split(".")[1]) * 2 + (start > 0))
    x = torch.empty(end - start).exponential_(generator=gen)
    x = x.bfloat16().float()
    return x.masked_fill_(x < 0.05, 0.0)


def trim() -> None:
    """Give freed heap memory back to the OS, so that RSS measures what is live."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(fn):
    """(result, seconds, peak extra RSS bytes) of ``fn()``."""
    trim()
    with RssPeak() as mem:
        t = time.perf_counter()
        out = fn()
        secs = time.perf_counter() - t
    return out, secs, mem.peak - mem.start


def worker(rank: int, world: int, n: int, a: dict) -> dict:
    """Generate this rank's shard, then time/measure select_top_k and kth_largest_bits."""
    from ctscale import dist
    from ctscale.methods.ct_d.topk import kth_largest_bits, select_top_k

    dist.init_from_env()  # gloo; run_world set the launcher environment
    assert dist.world_size() == world, "the ranks did not form one process group"
    pieces = {(name, s): scores(name, s, e, a["seed"]) for name, s, e in my_ranges(n, rank, world)}
    k = round(a["p"] * n)
    res = {"select_s": [], "select_mem": [], "kth_s": [], "kth_mem": [], "counts": []}
    for r in range(a["repeats"]):
        dist.barrier()
        masks, secs, mem = measure(lambda: select_top_k(pieces, k))
        res["select_s"].append(secs)
        res["select_mem"].append(mem)
        res["counts"].append(
            int(dist.all_reduce_sum_(torch.tensor(sum(int(m.sum()) for m in masks.values()))))
        )
        res["out_bytes"] = sum(m.numel() * m.element_size() for m in masks.values())
        if r == 0 and n <= a["verify_max"]:
            res["packed"] = {key: np.packbits(m.numpy()) for key, m in masks.items()}
        del masks
        dist.barrier()
        _, secs, mem = measure(lambda: kth_largest_bits(pieces, k))
        res["kth_s"].append(secs)
        res["kth_mem"].append(mem)
    res["shard_bytes"] = sum(t.numel() * 4 for t in pieces.values())
    res["largest_piece"] = max(t.numel() for t in pieces.values())
    return res


def reference(n: int, a: dict, ranks: list[dict]) -> dict:
    """One host: NumPy percentile + ``>=`` (timed), then the exact check against a stable sort."""
    k, out = round(a["p"] * n), {}
    avail = psutil.virtual_memory().available
    if 13 * n > avail - 4 * GiB:
        out["skip"] = (
            f"needs ~{13 * n / GiB:.1f} GiB (13 B/entry) + 4 GiB left for the other users of the "
            f"machine, {avail / GiB:.1f} GiB available"
        )
        return out
    ranges = [my_ranges(n, r, 2) for r in range(2)]
    ordered = sorted(x for rr in ranges for x in rr)  # (name, flat index) order
    pieces = [scores(name, s, e, a["seed"]) for name, s, e in ordered]

    def percentile() -> int:
        flat = np.concatenate([t.numpy() for t in pieces])
        thr = np.percentile(flat, 100 * (1 - a["p"]))
        del flat
        masks = [t.numpy() >= thr for t in pieces]
        return int(sum(m.sum() for m in masks))

    times, mems = [], []
    for _ in range(a["repeats"]):
        count, secs, mem = measure(percentile)
        times.append(secs)
        mems.append(mem)
    out.update(s=median(times), mem=max(mems), over=count - k)
    if n <= a["verify_max"] and 17 * n < avail - 4 * GiB:
        flat = torch.cat(pieces)
        del pieces
        exact = torch.zeros(n, dtype=torch.bool)
        exact[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
        out["ties"] = int((flat == flat[exact].min()).sum())  # entries equal to the k-th value
        offset, off = {}, 0
        for name, numel in layout(n):
            offset[name], off = off, off + numel
        out["same_set"] = all(
            np.array_equal(
                np.packbits(exact[offset[name] + s : offset[name] + e].numpy()), r["packed"][(name, s)]
            )
            for r, rr in zip(ranks, ranges)
            for name, s, e in rr
        )
    return out


HEADER = [
    "N (2 ranks)",
    "shard/rank",
    "largest piece/rank",
    "select_top_k s",
    "threshold search s",
    "peak extra: select_top_k (incl. bool masks)",
    "bool masks returned",
    "select - masks",
    "threshold search",
    "exact k? same set?",
    "ties at k-th value",
    "reference: percentile s",
    "peak extra",
    "selected - k",
]


def row(n: int, a: dict, ranks: list[dict], ref: dict) -> list[str]:
    def mib(x: float) -> str:
        return f"{x / 2**20:,.0f} MiB"

    def pct(x: float) -> str:
        return f"{mib(x)} ({x / shard:.2%})"

    k = round(a["p"] * n)
    shard = max(r["shard_bytes"] for r in ranks)
    per_repeat = lambda key: [max(v) for v in zip(*[r[key] for r in ranks])]  # noqa: E731
    sel_mem, kth_mem = max(max(r["select_mem"]) for r in ranks), max(max(r["kth_mem"]) for r in ranks)
    out_bytes = max(r["out_bytes"] for r in ranks)
    exact = "yes" if all(c == k for c in ranks[0]["counts"]) else f"**no** {ranks[0]['counts']} vs {k}"
    same = {True: "yes", False: "**no**", None: "not checked"}[ref.get("same_set")]
    cells = [
        f"{n:.2g}",
        f"{shard / GiB:.2f} GiB",
        f"{max(r['largest_piece'] for r in ranks) / 1e6:.1f}M",
        f"{median(per_repeat('select_s')):.2f}",
        f"{median(per_repeat('kth_s')):.2f}",
        pct(sel_mem),
        mib(out_bytes),
        pct(sel_mem - out_bytes),
        pct(kth_mem),
        f"{exact}, {same}",
        f"{ref['ties']:,}" if "ties" in ref else "-",
    ]
    if "skip" in ref:
        return cells + [f"not run: {ref['skip']}", "-", "-"]
    return cells + [f"{ref['s']:.2f}", mib(ref["mem"]), f"{ref['over']:+,}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e7,1e8,1.5e9", help="total Fisher entries, comma list")
    ap.add_argument("--p", type=float, default=0.3, help="reserve_p: k = round(p * N)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verify-max", type=float, default=1e8, help="check the exact set up to this N")
    ap.add_argument("--timeout", type=float, default=3600.0)
    args = ap.parse_args()
    a = vars(args)
    print(f"command: python {' '.join(shlex.quote(x) for x in sys.argv)}")
    print(f"machine: {machine_line()}", flush=True)
    rows = []
    for n in (int(float(s)) for s in args.sizes.split(",")):
        avail = psutil.virtual_memory().available
        need = max(6 * n + 2 * GiB, 12 * GiB if n >= 1e9 else 0)  # 4 B scores + 1 B masks + slack
        if need > avail:
            print(f"N={n:.2g}: NOT RUN: needs {need / GiB:.1f} GiB free, {avail / GiB:.1f} GiB available")
            continue
        ranks = run_world(worker, 2, n, a, timeout=args.timeout)
        ref = reference(n, a, ranks)
        print(f"N={n:.2g} ({load()}): select s {[r['select_s'] for r in ranks]}, ref {ref}", flush=True)
        rows.append(row(n, a, ranks, ref))
    print(f"\n## selection at scale (load at end {load()})\n")
    print(table(HEADER, rows))


if __name__ == "__main__":
    main()
