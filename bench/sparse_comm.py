"""Bytes on the wire and step time of DDP with and without the sparse communication hook.

    python bench/sparse_comm.py                          # BERT-base; links plain, 10gbit, 1gbit
    python bench/sparse_comm.py --layers 2 --links plain,1gbit --steps 2          # quick
    CTSCALE_CLUSTER=s13h CTSCALE_CLUSTER_NET=10.216.0 nice -n 10 python bench/sparse_comm.py

Needs root: two "hosts" are network namespaces of ``launch/local_cluster.sh`` (node0, node1, on
a bridge; ``CTSCALE_CLUSTER``/``CTSCALE_CLUSTER_NET`` name them, default ``ctbench`` on
10.217.0). The script brings the cluster up, runs one rank per node (gloo over eth0) and takes
it down again. Per link, it shapes the egress of both nodes' eth0 with ``tc qdisc ... tbf rate
R`` (``plain``: no qdisc, the bare veth); this kernel has no ``netem`` (CONFIG_NET_SCH_NETEM is
not set), so no latency is added: the rate is the only limit.

Each rank builds a randomly initialised BERT-base-shaped ``BertForSequenceClassification``
(12 layers, hidden 768, 12 heads, intermediate 3072, vocab 30522: 109 M parameters, 438 MB of
fp32 gradients; ``--layers``/``--hidden`` shrink it) through ``build_backend`` (ddp, with or
without ``train.sparse_grad_comm``) and plain SGD (two models per rank: AdamW's state would
not fit beside the other engineers' jobs), and runs real optimizer steps on
synthetic batches (``--batch`` sequences of ``--seq-len`` tokens per rank), as the trainer does:

    backend.communicate_survivors(strategy, step)              # hook runs only
    backend.forward_backward(batch, boundary=True)              # the all-reduce happens here
    for v in backend.grad_views(): strategy.apply(v, step)
    backend.step()

Runs: vanilla DDP; CT-D at each ``--p`` (a random fixed child of density p over the candidates
``layer``, as a Fisher mask would be; embeddings, pooler and head are sent whole) and CT-F at
``--ctf-p``, each without and with the hook, in one process group per link: two models per rank
(DDP without and with the hook), the runs taking turns step by step, rotated every round, so
that the load of a shared machine drifts over all of them alike. Reported per run, medians over
``--steps`` rounds (after ``--warmup``): payload MB per step
and rank as the hook counts it (elements all-reduced x 4 bytes; vanilla and no-hook runs: every
element), the candidate payload over p x the dense candidate payload, MB sent per step by rank
0's eth0 (``/sys/class/net/eth0/statistics/tx_bytes``: the ring all-reduce, barriers, TCP/IP
headers), step seconds (the slowest rank's), rank 0's CPU seconds in the step (process time: on
a shared machine, wall time minus CPU time is waiting for the link or for a core), and the speed-up over vanilla DDP and over the
same method without the hook.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from _common import REPO, machine_line, median, table

CLUSTER = REPO / "launch" / "local_cluster.sh"
LINKS = {"plain": None, "10gbit": 10e9, "1gbit": 1e9}  # bits per second; None: no qdisc


def runs(a: argparse.Namespace) -> list[tuple[str, float, bool]]:
    """(method, p, hook) in the order they run."""
    out = [("vanilla", 1.0, False)]
    out += [("ct-d", p, hook) for p in a.p for hook in (False, True)]
    out += [("ct-f", p, hook) for p in a.ctf_p for hook in (False, True)]
    return out


# -- worker: one rank on one node ---------------------------------------------------------
def build_backend_for(hook: bool, a: argparse.Namespace):
    """DDP over a random BERT, with or without ``train.sparse_grad_comm``; its config."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, get_linear_schedule_with_warmup

    from ctscale.backends import build_backend
    from ctscale.config import load_config

    sets = [
        "distributed.backend=ddp",
        f"method.name={'ct-d' if hook else 'vanilla'}",  # the hook refuses vanilla
        f"train.sparse_grad_comm={hook}",
        f"train.batch_size={a.batch * 2}",
        "train.max_grad_norm=1.0",
    ]
    cfg = load_config(None, sets)
    backend = build_backend(cfg)
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=30522,
            hidden_size=a.hidden,
            num_hidden_layers=a.layers,
            num_attention_heads=max(1, a.hidden // 64),
            intermediate_size=4 * a.hidden,
            num_labels=2,
        )
    )
    # plain SGD, the same in every run: AdamW's two moments would double the memory of the two
    # models each rank holds (the OOM killer took a rank with them) and add CPU time to every step
    sgd = lambda named: torch.optim.SGD([q for _, q in named], lr=1e-5)  # noqa: E731
    backend.setup(model, sgd, lambda opt: get_linear_schedule_with_warmup(opt, 0, 10**6))
    backend.train_mode(True)
    return backend, cfg


def strategy_for(method: str, p: float, backend, cfg, candidates: str = ""):
    import torch

    from ctscale.methods.ct_d.fisher import candidate_filter
    from ctscale.methods.ct_f import RandomChildMask
    from ctscale.methods.fixed_mask import FixedChildMask
    from ctscale.methods.vanilla import NoMask

    if method == "vanilla":
        return NoMask()
    if method == "ct-f":
        return RandomChildMask(p, seed=0, kernel="eager")
    patterns = candidates.split(",") if candidates else cfg.fisher.candidates
    is_candidate = candidate_filter(patterns, cfg.fisher.exclude)
    masks = {}
    for v in backend.shard_ranges():  # the same random child on every rank (seeded by name)
        if is_candidate(v.name):
            gen = torch.Generator().manual_seed(zlib.crc32(v.name.encode()))
            masks[v.key()] = torch.rand(v.global_numel, generator=gen) < p
    return FixedChildMask(masks, is_candidate)


def tx_bytes() -> int:
    return int(Path("/sys/class/net/eth0/statistics/tx_bytes").read_text())


def worker(a: argparse.Namespace) -> None:
    """Two DDP models (without, with the hook); the runs take turns step by step (rotated each
    round), so that load drift on the shared machine hits them all alike."""
    import torch

    from ctscale import dist

    torch.set_num_threads(1)
    plain, cfg = build_backend_for(False, a)
    hooked, _ = build_backend_for(True, a)
    numel = sum(q.numel() for q in plain.model.parameters())
    gen = torch.Generator().manual_seed(1000 + plain.rank)
    batch = {
        "input_ids": torch.randint(0, 30522, (a.batch, a.seq_len), generator=gen),
        "attention_mask": torch.ones(a.batch, a.seq_len, dtype=torch.long),
        "labels": torch.randint(0, 2, (a.batch,), generator=gen),
    }
    todo = runs(a)
    strategies = {}
    for method, p, _ in todo:
        if (method, p) not in strategies:
            strategies[(method, p)] = strategy_for(method, p, plain, cfg, a.candidates)
    steps = {run: [] for run in todo}
    step = 0
    for round_ in range(a.warmup + a.steps):
        shift = round_ % len(todo)
        for run in todo[shift:] + todo[:shift]:
            method, p, hook = run
            backend, strategy = (hooked if hook else plain), strategies[(method, p)]
            if hook:
                backend.communicate_survivors(strategy, step)
                backend.comm.counts.reset()
            dist.barrier()
            tx0, t0, cpu0 = tx_bytes(), time.perf_counter(), time.process_time()
            backend.forward_backward(batch, boundary=True)
            for view in backend.grad_views():
                strategy.apply(view, step)
            backend.step()
            slowest = torch.tensor([time.perf_counter() - t0])
            cpu = time.process_time() - cpu0
            tx = tx_bytes() - tx0  # before the max below: only the step's own traffic
            torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
            counts = backend.comm.counts if hook else None
            step += 1
            if round_ >= a.warmup:
                steps[run].append(
                    {
                        "seconds": float(slowest),
                        "cpu": cpu,
                        "tx": tx,
                        "sent": counts.sent if counts else numel,
                        "candidate_sent": counts.candidate_sent if counts else None,
                        "candidate_dense": counts.candidate_dense if counts else None,
                    }
                )
    results = [
        {"method": m, "p": p, "hook": h, "numel": numel, "steps": steps[(m, p, h)]} for m, p, h in todo
    ]
    if dist.rank() == 0:
        Path(a.out).write_text(json.dumps(results))


# -- orchestrator: cluster, link shaping, launch, table ------------------------------------
def cluster(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), *args], capture_output=True, text=True, check=check)


def shape(rate: float | None) -> None:
    """tbf on both nodes' eth0 egress (each direction of the link); None removes it."""
    for node in ("node0", "node1"):
        cluster("exec", node, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
        if rate is not None:
            burst = max(int(rate / 8 / 100), 65536)  # 10 ms at the rate: tbf needs >= rate / HZ
            tbf = ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", f"{int(rate)}bit"]
            cluster("exec", node, *tbf, "burst", str(burst), "latency", "100ms")


def launch(a: argparse.Namespace, net: str, out: Path) -> None:
    """One rank per node; waits for both (a failing rank fails the benchmark)."""
    port = 29500 + os.getpid() % 1000
    procs = []
    for rank in (0, 1):
        env = {
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": f"{net}.10",
            "MASTER_PORT": str(port),
            "GLOO_SOCKET_IFNAME": "eth0",
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",
            "HF_HUB_OFFLINE": "1",
        }
        args = [
            f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(a).items()
            if k not in ("links", "worker", "out")
        ]
        cmd = [
            "env",
            *(f"{k}={v}" for k, v in env.items()),
            sys.executable,
            __file__,
            "--worker",
            f"--out={out}",
            *args,
        ]
        procs.append(subprocess.Popen(["bash", str(CLUSTER), "exec", f"node{rank}", *cmd]))
    codes = [proc.wait() for proc in procs]
    if any(codes):
        raise SystemExit(f"a rank failed (exit codes {codes})")


def rows(results: list[dict]) -> list[list[object]]:
    def step_s(r):
        return median([s["seconds"] for s in r["steps"]])

    vanilla = step_s(results[0])
    by_run = {(r["method"], r["p"], r["hook"]): r for r in results}
    out = []
    for r in results:
        sent = median([s["sent"] for s in r["steps"]])
        cand = "-"
        if r["hook"]:
            ratio = median([s["candidate_sent"] / (r["p"] * s["candidate_dense"]) for s in r["steps"]])
            cand = f"{ratio:.3f}"
        unhooked = by_run.get((r["method"], r["p"], False))
        vs_same = f"{step_s(unhooked) / step_s(r):.2f}x" if r["hook"] and unhooked else "-"
        label = "vanilla DDP" if r["method"] == "vanilla" else f"{r['method']} p={r['p']}"
        out.append(
            [
                label + (" + hook" if r["hook"] else ""),
                f"{sent * 4 / 1e6:.1f}",
                f"{sent / r['numel']:.3f}",
                cand,
                f"{median([s['tx'] for s in r['steps']]) / 1e6:.1f}",
                f"{step_s(r):.2f}",
                f"{median([s['cpu'] for s in r['steps']]):.2f}",
                f"{vanilla / step_s(r):.2f}x",
                vs_same,
            ]
        )
    return out


HEADER = [
    "run",
    "payload MB/step",
    "payload / dense",
    "candidate payload / (p x dense)",
    "eth0 tx MB/step",
    "step s",
    "rank-0 CPU s",
    "speed-up vs vanilla",
    "vs same method, no hook",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--links", default="plain,10gbit,1gbit", help=f"comma list of {', '.join(LINKS)}")
    ap.add_argument("--p", default="0.1,0.3", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--ctf-p", default="0.1", type=lambda s: [float(x) for x in s.split(",") if x])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank and step")
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--candidates",
        default="",
        help="comma list of regexes naming CT-D's candidate tensors (default: the config's, the "
        "transformer blocks; '.': every tensor, so embeddings and head are masked too)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    links = a.links.split(",")
    if unknown := [x for x in links if x not in LINKS]:
        raise SystemExit(f"--links: unknown {unknown}; choose from {', '.join(LINKS)}")
    os.environ.setdefault("CTSCALE_CLUSTER", "ctbench")
    os.environ.setdefault("CTSCALE_CLUSTER_NET", "10.217.0")
    net = os.environ["CTSCALE_CLUSTER_NET"]
    print(machine_line())
    print("command: " + shlex.join(["python", "bench/sparse_comm.py", *sys.argv[1:]]))
    made = cluster("up", "2", check=False)
    if made.returncode:
        raise SystemExit(f"local_cluster.sh up 2 failed: {made.stderr.strip()}")
    try:
        for link in links:
            shape(LINKS[link])
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "results.json"
                started = time.perf_counter()
                launch(a, net, out)
                results = json.loads(out.read_text())
            shaped = "tbf rate " + link if LINKS[link] else "no qdisc"
            print(f"\nlink {link} ({shaped}), {time.perf_counter() - started:.0f} s")
            print(table(HEADER, rows(results)))
    finally:
        cluster("down", check=False)


if __name__ == "__main__":
    main()
