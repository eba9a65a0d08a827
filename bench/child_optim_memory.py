"""Per-rank optimizer memory and step time of CT-D with a child-only optimizer, FSDP2, 2 ranks.

    python bench/child_optim_memory.py                          # BERT-base shape, p = 0.05 0.1 0.3
    python bench/child_optim_memory.py --layers 2 --steps 2     # a quick look
    python bench/child_optim_memory.py --scope all --p 0.1      # embeddings are candidates too

A randomly initialised BERT-base-shaped classifier (``--layers`` x hidden 768, vocab 30522),
sharded by ctscale's FSDP2 backend over 2 CPU processes (gloo, 1 thread each), trained on random
tokens with ctscale's ``adamw_factory`` (AdamW, wd 0.01, clip 1.0):

- vanilla: dense AdamW, no mask;
- dense CT-D: dense AdamW on gradients masked by ``FixedChildMask`` (1 byte per candidate entry);
- child-only CT-D: ``ChildAdamW`` + ``ChildMask`` (``method.child_only_optimizer``).

The child network is ``p`` of every candidate tensor (``layer`` in the name, as the default
``fisher.candidates``; ``--scope all``: every tensor), drawn at random: memory and time depend on
counts, not on which entries. Memory: one fresh 2-rank world per configuration. "opt state" is
the bytes of the optimizer's state tensors, "mask" the strategy's (bool mask or int32 index),
"opt-side" their sum, "x van" its ratio to vanilla, "cand x van" the same ratio over the
candidate tensors only; all per rank (the larger rank). Peak RSS: the larger rank's VmHWM over
the training steps (reset after set-up, so model construction is not counted). Time: one more
world runs dense and child-only CT-D steps alternately on the same model (side by side, same
load), median over ``--steps`` each; "opt part" is mask + clip + optimizer step.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
import zlib

import torch
import torch.multiprocessing as mp

MiB = 2**20


def _peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # "5": reset VmHWM to the current RSS
        fh.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))


def _setup(args):
    """Sharded BERT-base-shaped model in ctscale's FSDP2 backend with dense AdamW."""
    from transformers import BertConfig, BertForSequenceClassification

    from ctscale.backends.fsdp import FSDPBackend
    from ctscale.config import load_config
    from ctscale.trainer import adamw_factory

    cfg = load_config(None, ["train.lr=2e-5", "train.weight_decay=0.01", "method.name=ct-d"])
    bert = BertConfig(
        num_hidden_layers=args.layers, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    torch.manual_seed(0)
    backend = FSDPBackend(grad_accum=1, max_grad_norm=1.0)
    constant = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # noqa: E731
    backend.setup(BertForSequenceClassification(bert), adamw_factory(cfg), constant)
    return cfg, backend, constant


def _candidate(args, name: str) -> bool:
    return args.scope == "all" or "layer" in name


def _fixed_mask(args, backend, p: float):
    """Local bool masks: ``p`` of each candidate tensor, the same draw on every rank."""
    from ctscale.methods.fixed_mask import FixedChildMask

    masks = {}
    for view in backend.shard_ranges():
        if _candidate(args, view.name):
            g = torch.Generator().manual_seed(zlib.crc32(view.name.encode()))
            masks[view.key()] = (torch.rand(view.global_numel, generator=g) < p)[view.start : view.end]
    return FixedChildMask(masks, is_candidate=lambda n: _candidate(args, n))


def _child(cfg, backend, fixed, constant):
    """Child-only AdamW in place of the backend's (stateless so far) dense AdamW."""
    from ctscale.methods.child_optim import ChildMask
    from ctscale.trainer import adamw_factory

    child = ChildMask.from_fixed(fixed)
    backend.replace_optimizer(adamw_factory(cfg, child))
    return child


def _step(args, backend, strategy, step: int, rank: int) -> tuple[float, float]:
    """One optimizer step on random tokens; (whole step, mask + clip + optimizer) seconds."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(1000, 30000, (args.batch, args.seq), generator=g)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 2, (args.batch,)),
    }
    dist.barrier()
    t0 = time.perf_counter()
    backend.forward_backward(batch, boundary=True)
    t1 = time.perf_counter()
    for view in backend.grad_views():
        strategy.apply(view, step)
    backend.step()
    dist.barrier()
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def _state_bytes(args, backend) -> tuple[int, int]:
    """This rank's optimizer state bytes: all, and over candidate tensors only."""
    from ctscale.dist import local_shard as _local

    total = cand = 0
    for name, p in backend.model.named_parameters():
        n = sum(_local(t).numel() * t.element_size() for t in backend.optimizer.state[p].values())
        total, cand = total + n, cand + (n if _candidate(args, name) else 0)
    return total, cand


def memory_world(rank: int, args, config: str) -> dict:
    from ctscale.methods.vanilla import NoMask

    cfg, backend, constant = _setup(args)
    kind, _, p = config.partition(":")
    strategy = NoMask() if kind == "vanilla" else _fixed_mask(args, backend, float(p))
    if kind == "child":
        strategy = _child(cfg, backend, strategy, constant)
    _peak_reset()
    times = [_step(args, backend, strategy, s, rank)[0] for s in range(args.steps + 1)]
    state, cand = _state_bytes(args, backend)
    return {
        "state": state,
        "cand": cand,
        "mask": strategy.state_bytes(),
        "peak": _peak_rss(),
        "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step": statistics.median(times[1:]),  # the first step allocates the state
    }


def timing_world(rank: int, args, ps: list[float]) -> dict:
    """Dense and child-only CT-D steps alternately on one model: a side-by-side step time."""
    cfg, backend, constant = _setup(args)
    dense = (backend.optimizer, backend.scheduler)
    out = {}
    for p in ps:
        fixed = _fixed_mask(args, backend, p)
        child = _child(cfg, backend, fixed, constant)
        runs = {"dense": (dense, fixed), "child": ((backend.optimizer, backend.scheduler), child)}
        times: dict[str, list] = {"dense": [], "child": []}
        for s in range(args.steps + 1):
            for kind, (opt, strategy) in runs.items():
                backend.optimizer, backend.scheduler = opt  # bench only: swap the engine's optimizer
                t = _step(args, backend, strategy, s, rank)
                if s:  # the first step of each allocates its state
                    times[kind].append(t)
        out[p] = {k: tuple(statistics.median(x) for x in zip(*v)) for k, v in times.items()}
    return out


def _entry(rank: int, world: int, port: int, fn, args, arg, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ.update(MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    try:
        queue.put((rank, fn(rank, args, arg)))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(fn, args, arg, world: int = 2) -> list:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, arg, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=3600) for _ in procs)
    for proc in procs:
        proc.join()
    return [results[r] for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    parser.add_argument("--p", type=float, nargs="+", default=[0.05, 0.1, 0.3])
    parser.add_argument("--scope", choices=["layer", "all"], default="layer")
    args = parser.parse_args()

    configs = ["vanilla"] + [f"{kind}:{p}" for p in args.p for kind in ("dense", "child")]
    rows = {}
    for config in configs:
        ranks = run_world(memory_world, args, config)
        rows[config] = {k: max(r[k] for r in ranks) for k in ranks[0]}
    timing = run_world(timing_world, args, args.p)[0]

    van = rows["vanilla"]
    print(
        f"\nBERT-base shape, {args.layers} layers, FSDP2 x2 ranks (gloo, 1 thread each), batch "
        f"{args.batch}x{args.seq} per rank, candidates: {args.scope}; per rank (max over ranks)\n"
    )
    print(
        "| config | opt state MiB | mask MiB | opt-side MiB | x van | cand x van | peak RSS MiB (train) | maxrss MiB | step s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for config, r in rows.items():
        side = r["state"] + r["mask"]
        cand = (r["cand"] + r["mask"]) / van["cand"]
        print(
            f"| {config} | {r['state'] / MiB:.1f} | {r['mask'] / MiB:.1f} | {side / MiB:.1f} | "
            f"{side / van['state']:.3f} | {cand:.3f} | {r['peak'] / MiB:.0f} | {r['maxrss'] / MiB:.0f} | {r['step']:.3f} |"
        )
    print("\nside by side (alternating steps on one model), median seconds\n")
    print("| p | dense CT-D step | child-only step | ratio | dense opt part | child opt part | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for p, t in timing.items():
        (ds, do), (cs, co) = t["dense"], t["child"]
        print(f"| {p} | {ds:.3f} | {cs:.3f} | {cs / ds:.3f} | {do:.3f} | {co:.3f} | {co / do:.3f} |")


if __name__ == "__main__":
    main()
