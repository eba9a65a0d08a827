"""Step time of CT-F and CT-D vs vanilla fine-tuning on the same backend, as ratios.

    python bench/mask_overhead.py                                   # BERT-base, all backends
    python bench/mask_overhead.py --backends local,ddp --layers 2 --steps 2 --repeats 2  # quick

Per backend (``local`` = 1 process; ``ddp``, ``fsdp``, ``zero1``/``zero2``/``zero3`` = 2 gloo
ranks via tests/dist_harness.run_world, one intra-op thread per rank) the script builds a
randomly initialised BERT-base-shaped ``BertForSequenceClassification`` (12 layers, hidden 768,
12 heads, intermediate 3072, vocab 30522; ``--layers``/``--hidden`` shrink it), sets it up with
``ctscale.backends.build_backend`` and ctscale's AdamW (clip 1.0, weight decay 0.01), and drives
real optimizer steps on synthetic token batches (``--batch`` sequences of ``--seq-len`` tokens
per rank):

    forward_backward(batch, boundary=True)                      # reduction included
    for v in backend.grad_views(): strategy.apply(v, step)      # "mask apply"
    backend.step()                                              # "optimizer step": clip+AdamW

Strategies: vanilla (``NoMask``: what remains is the cost of iterating ``grad_views``), CT-F
(``RandomChildMask(p)``) and CT-D (``FixedChildMask`` over the candidates ``layer``, from a
random fixed mask of density p over ``backend.shard_ranges()``; selection is not in the step).
Methods run round-robin (rotated each repeat) so that load drift hits all of them; each step
starts after a barrier and its time is the slowest rank's. Reported: median step seconds over
all timed steps; the ratio vs vanilla, measured: median (min-max) over repeats of the per-repeat
ratio of median step times (paired, side by side), and derived: 1 + (mask apply of the method -
mask apply of vanilla) / vanilla step, far less noisy on a shared machine since the rest of the
step is the same code; median mask-apply and optimizer-step seconds, the same per element (ns),
and the CT-D mask state bytes of each rank (``strategy.state_bytes()``; CT-F keeps none). Last,
CT-F's hash vs apply vs one AdamW step per element, in this process, to explain the CT-F ratio.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import zlib

from _common import REPO, load, machine_line, median, run_world, table

BACKENDS = ("local", "ddp", "fsdp", "zero1", "zero2", "zero3")
METHODS = ("vanilla", "ct-f", "ct-d")
TARGETS = {"ct-f": 1.05, "ct-d": 1.02}


def build(backend_name: str, world: int, a: dict):
    """Backend, model and the three strategies on this rank."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, get_linear_schedule_with_warmup

    from ctscale.backends import build_backend
    from ctscale.config import load_config
    from ctscale.methods.ct_d.fisher import candidate_filter
    from ctscale.methods.ct_f import RandomChildMask
    from ctscale.methods.fixed_mask import FixedChildMask
    from ctscale.methods.vanilla import NoMask
    from ctscale.trainer import adamw_factory

    kind = "deepspeed" if backend_name.startswith("zero") else backend_name
    sets = [
        f"distributed.backend={kind}",
        f"train.batch_size={a['batch'] * world}",
        "train.grad_accum=1",
        "train.max_grad_norm=1.0",
        "train.weight_decay=0.01",
        f"method.reserve_p={a['p']}",
    ]
    if kind == "deepspeed":
        sets.append(f"distributed.deepspeed_config={REPO}/ds_configs/{backend_name}.json")
    cfg = load_config(None, sets)
    backend = build_backend(cfg)
    torch.manual_seed(0)
    hidden = a["hidden"]
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=30522,
            hidden_size=hidden,
            num_hidden_layers=a["layers"],
            num_attention_heads=max(1, hidden // 64),
            intermediate_size=4 * hidden,
            num_labels=2,
        )
    )
    backend.setup(model, adamw_factory(cfg), lambda opt: get_linear_schedule_with_warmup(opt, 0, 10**6))
    is_candidate = candidate_filter(cfg.fisher.candidates, cfg.fisher.exclude)
    masks = {}
    for v in backend.shard_ranges():  # the same random mask on every rank, sliced to its range
        if is_candidate(v.name):
            gen = torch.Generator().manual_seed(zlib.crc32(v.name.encode()))
            masks[v.key()] = (torch.rand(v.global_numel, generator=gen) < a["p"])[v.start : v.end].clone()
    strategies = {
        "vanilla": NoMask(),
        "ct-f": RandomChildMask(a["p"], seed=0, kernel=a["ctf_kernel"]),
        "ct-d": FixedChildMask(masks, is_candidate),
    }
    return backend, strategies, is_candidate


def worker(rank: int, world: int, backend_name: str, a: dict) -> dict:
    """Warm-up, then round-robin timed steps; per-step (step, mask, opt) seconds of this rank."""
    import torch

    from ctscale import dist

    backend, strategies, is_candidate = build(backend_name, world, a)
    backend.train_mode(True)
    gen = torch.Generator().manual_seed(1000 + rank)
    batches = [
        {
            "input_ids": torch.randint(0, 30522, (a["batch"], a["seq_len"]), generator=gen),
            "attention_mask": torch.ones(a["batch"], a["seq_len"], dtype=torch.long),
            "labels": torch.randint(0, 2, (a["batch"],), generator=gen),
        }
        for _ in range(4)
    ]
    times = {m: [] for m in METHODS}  # per method: [(repeat, step_s, mask_s, opt_s)]
    counter = 0

    def one_step(method: str, repeat: int | None) -> None:
        nonlocal counter
        dist.barrier()
        t0 = time.perf_counter()
        backend.forward_backward(batches[counter % len(batches)], boundary=True)
        t1 = time.perf_counter()
        for view in backend.grad_views():
            strategies[method].apply(view, counter)
        t2 = time.perf_counter()
        backend.step()
        t3 = time.perf_counter()
        counter += 1
        if repeat is not None:
            times[method].append((repeat, t3 - t0, t2 - t1, t3 - t2))

    for method in METHODS:
        for _ in range(a["warmup"]):
            one_step(method, None)
    for r in range(a["repeats"]):
        order = METHODS[r % 3 :] + METHODS[: r % 3]
        for method in order:
            for _ in range(a["steps"]):
                one_step(method, r)
    ranges = backend.shard_ranges()
    return {
        "times": times,
        "local_numel": sum(v.numel for v in ranges),
        "candidate_numel": sum(v.numel for v in ranges if is_candidate(v.name)),
        "state_bytes": {m: s.state_bytes() for m, s in strategies.items()},
    }


def summarize(name: str, ranks: list[dict], repeats: int) -> dict:
    """Slowest rank per step, then medians; paired per-repeat ratios vs vanilla."""

    def per_step(method: str, col: int) -> list[float]:
        return [max(vals) for vals in zip(*[[t[col] for t in r["times"][method]] for r in ranks])]

    s = {"backend": name, "ranks": len(ranks), "raw": ranks}
    for m in METHODS:
        s[m] = {c: per_step(m, i) for i, c in ((1, "step"), (2, "mask"), (3, "opt"))}
    reps = [t[0] for t in ranks[0]["times"]["vanilla"]]
    for m in TARGETS:
        ratios = []
        for r in range(repeats):
            med = {k: median([x for x, rr in zip(s[k]["step"], reps) if rr == r]) for k in ("vanilla", m)}
            ratios.append(med[m] / med["vanilla"])
        s[m]["ratio"], s[m]["spread"] = median(ratios), (min(ratios), max(ratios))
    return s


def ns_per(ranks: list[dict], method: str, col: int, numel: str) -> float:
    """Sum over ranks of the median seconds, over the sum of the elements: ns per element."""
    secs = sum(median([t[col] for t in r["times"][method]]) for r in ranks)
    return secs / max(sum(r[numel] for r in ranks), 1) * 1e9


def report(results: list[dict], skipped: list[str]) -> str:
    rows, per_elem = [], []
    for s in results:
        med = {m: {k: median(v) for k, v in s[m].items() if k != "ratio"} for m in METHODS}
        ok = {m: "yes" if s[m]["ratio"] <= t else "**no**" for m, t in TARGETS.items()}
        state = " / ".join(f"{r['state_bytes']['ct-d'] / 2**20:.1f}" for r in s["raw"])
        rows.append(
            [s["backend"], s["ranks"], f"{med['vanilla']['step']:.3f}"]
            + [f"{med[m]['step']:.3f}" for m in TARGETS]
            + [
                f"{s[m]['ratio']:.2f}x ({s[m]['spread'][0]:.2f}-{s[m]['spread'][1]:.2f}) {ok[m]}"
                for m in TARGETS
            ]
            + [
                f"{1 + (med[m]['mask'] - med['vanilla']['mask']) / med['vanilla']['step']:.3f}x"
                for m in TARGETS
            ]
            + [f"{med[m]['mask']:.4f}" for m in METHODS]
            + [f"{med['vanilla']['opt']:.3f}", state]
        )
        ranks, vstep = s["raw"], med["vanilla"]["step"]
        per_elem.append(
            [s["backend"], " / ".join(f"{r['local_numel'] / 1e6:.1f}M" for r in ranks)]
            + [" / ".join(f"{r['candidate_numel'] / 1e6:.1f}M" for r in ranks)]
            + [f"{ns_per(ranks, 'ct-f', 2, 'local_numel'):.1f}"]
            + [f"{ns_per(ranks, 'ct-d', 2, 'candidate_numel'):.1f}"]
            + [f"{ns_per(ranks, 'vanilla', 3, 'local_numel'):.1f}"]
            + [f"{med[m]['mask'] / vstep:.1%}" for m in TARGETS]
        )
    head = ["backend", "ranks", "vanilla s/step", "CT-F s/step", "CT-D s/step"]
    head += ["CT-F / vanilla (target <=1.05)", "CT-D / vanilla (target <=1.02)"]
    head += ["CT-F, from mask time", "CT-D, from mask time"]
    head += ["mask apply s: vanilla", "CT-F", "CT-D", "optimizer step s", "CT-D mask state MiB/rank"]
    text = table(head, rows) + "\n\nPer element, and mask apply as a share of the vanilla step:\n\n"
    head = ["backend", "elements/rank", "CT-D candidates/rank", "CT-F mask ns/elem"]
    head += ["CT-D mask ns/candidate", "optimizer step ns/elem", "CT-F mask / vanilla step"]
    text += table(head + ["CT-D mask / vanilla step"], per_elem)
    return text + "".join(f"\n\nskipped {s}" for s in skipped)


def ctf_breakdown(p: float, n: int = 768 * 3072, repeats: int = 11) -> str:
    """In this process, 1 thread: ns/element of CT-F's parts vs one AdamW step on one tensor of
    BERT-base's largest block shape; parts interleaved within each repeat, medians."""
    import torch

    from ctscale.methods.counter_rng import bernoulli_mask, keep_and_rescale_

    torch.set_num_threads(1)
    grad, param = torch.randn(n), torch.nn.Parameter(torch.randn(n))
    opt = torch.optim.AdamW([param], lr=1e-5, weight_decay=0.01)
    param.grad = grad.clone()
    opt.step()  # allocate the state
    keep = bernoulli_mask(0, 1, "w", 0, n, p)
    keep_and_rescale_(grad, 0, 1, "w", 0, p, compiled=True)  # compile outside the timing
    parts = {
        "CT-F fused, eager (keep_and_rescale_: hash + draw + rescale)": lambda: keep_and_rescale_(
            grad, 0, 1, "w", 0, p
        ),
        "CT-F fused, compiled (torch.compile)": lambda: keep_and_rescale_(
            grad, 0, 1, "w", 0, p, compiled=True
        ),
        "before: hash -> keep bits (bernoulli_mask)": lambda: bernoulli_mask(0, 1, "w", 0, n, p),
        "before: CT-F apply mul_(keep).mul_(1/p)": lambda: grad.mul_(keep).mul_(1 / p),
        "CT-D apply: mul_(keep) (ctscale)": lambda: grad.mul_(keep),
        "before: masked_fill_(~keep, 0).mul_(1/p)": lambda: grad.masked_fill_(~keep, 0).mul_(1 / p),
        "before: masked_fill_(~keep, 0)": lambda: grad.masked_fill_(~keep, 0),
        "AdamW step (torch default, 1 tensor)": opt.step,
    }
    secs = {k: [] for k in parts}
    for _ in range(repeats):
        for k, fn in parts.items():
            t = time.perf_counter()
            fn()
            secs[k].append(time.perf_counter() - t)
    rows = [[k, f"{median(v) / n * 1e9:.2f}"] for k, v in secs.items()]
    return table([f"{n:,} fp32 entries, 1 thread, load {load()}", "ns/element"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {', '.join(BACKENDS)}")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per method per repeat")
    ap.add_argument("--repeats", type=int, default=6, help="round-robin rounds")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per method first")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    ap.add_argument("--p", type=float, default=0.3, help="reserve_p of CT-F and CT-D")
    ap.add_argument("--ctf-kernel", default="auto", choices=("auto", "eager", "compiled"), help="CT-F kernel")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds per backend")
    args = ap.parse_args()
    a = vars(args)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # inherited by the ranks
    print(f"command: python {' '.join(shlex.quote(x) for x in sys.argv)}")
    print(f"machine: {machine_line()}", flush=True)
    results, skipped = [], []
    for name in filter(None, args.backends.split(",")):  # --backends "": the breakdown only
        if name not in BACKENDS:
            sys.exit(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        world = 1 if name == "local" else 2
        started = time.perf_counter()
        try:
            ranks = run_world(worker, world, name, a, timeout=args.timeout)
        except Exception as err:  # a backend in progress elsewhere must not stop the others
            reason = str(err).strip().splitlines()[-1][:300]
            skipped.append(f"{name}: {reason}")
            print(f"[{name}] FAILED, skipped: {reason}", flush=True)
            continue
        results.append(summarize(name, ranks, args.repeats))
        print(f"[{name}] done in {time.perf_counter() - started:.0f} s, load {load()}", flush=True)
        print(report(results[-1:], []), flush=True)
    if results or skipped:
        print(f"\n## mask overhead (load at end {load()})\n")
        print(report(results, skipped))
    print("\nCT-F cost breakdown vs the optimizer:\n")
    print(ctf_breakdown(args.p))


if __name__ == "__main__":
    main()
