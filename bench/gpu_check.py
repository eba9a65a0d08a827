"""GPU check: CT-D / CT-F vs vanilla under DeepSpeed ZeRO-3, NCCL, bf16, on a ~1 B decoder.

    bash bench/gpu_check.sh            # one GPU, no network; prints a table, writes $OUT/gpu_check.json
    bash bench/gpu_check.sh --cpu      # the same script on CPU (gloo, tiny model): a dry run

Each method runs the real ``ctscale train`` (torchrun, one process per GPU) on a 1.0 B-parameter
Qwen2-shaped decoder with random weights (``bench/synthetic.py``: tokenizer and data made on
the spot), ``ds_configs/zero3.json`` with ``train.bf16=true``: vanilla, CT-D, CT-F with its
eager kernel and CT-F with its ``torch.compile`` kernel (not in the CPU dry run). Reports the
median step time (first steps dropped), the ratio to vanilla, the peak GPU memory, and CT-D's
Fisher/selection time. ``--repeats N`` runs N rounds, each starting at the next method, and
reports each round's ratios; ``--profile`` adds per-phase host and GPU times (torch.profiler,
``train.profile_from``) from 2 extra steps per run of round 0. First, it checks that CT-F masks, both CT-F kernels and the top-k
selection give on this device the same bits as on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import synthetic

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # (layers, hidden, intermediate, heads, kv heads)
    "gpu": (20, 2048, 5632, 16, 4),  # 1.00 B parameters
    "cpu": (2, 64, 128, 4, 2),
}


# (label, ctscale method, extra overrides); CT-F last: its compiled kernel is the newest part
RUNS = [
    ("vanilla", "vanilla", []),
    ("ct-d", "ct-d", []),
    ("ct-f (eager kernel)", "ct-f", ["method.ctf_kernel=eager"]),
    ("ct-f (compiled kernel)", "ct-f", ["method.ctf_kernel=compiled"]),
]


def run_method(
    label: str, method: str, extra: list[str], model_dir: Path, out: Path, args, profile: bool
) -> dict:
    """One ``ctscale train`` run. With ``profile``, 2 more steps run under torch.profiler after
    the timed ones (not timed: the profiler slows them)."""
    steps = args.steps + (2 if profile else 0)
    overrides = [
        f"model.name_or_path={model_dir}",
        "model.random_init=true",
        "data.task=jsonl",
        f"data.train_file={model_dir / 'train.jsonl'}",
        f"data.max_length={args.seq}",
        f"train.output_dir={out}",
        "train.overwrite=true",  # a rerun into the same work directory replaces the run
        f"train.batch_size={args.batch * args.gpus}",
        f"train.max_steps={steps}",
        "train.epochs=1000",  # max_steps decides; 64 examples make few steps per epoch
        "train.log_every=1",
        "train.bf16=true",
        "train.save_model=false",
        "train.tensorboard=false",
        "train.eval_every_epoch=false",
        "train.lr=1e-5",
        "distributed.backend=deepspeed",
        f"distributed.deepspeed_config={REPO / 'ds_configs' / 'zero3.json'}",
        f"method.name={method}",
        "method.reserve_p=0.3",
        "fisher.num_batches=4",
        *extra,
        *([f"train.profile_from={args.steps}"] if profile else []),
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(args.gpus),
        "-m",
        "ctscale",
        "train",
    ]
    cmd += [a for o in overrides for a in ("--set", o)]
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"method": label, "error": (proc.stdout + proc.stderr)[-3000:]}
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train" and r["step"] <= args.steps]
    ready = next(r for r in records if r["event"] == "mask_ready")
    times = [b["time"] - a["time"] for a, b in zip(train, train[1:])][args.warmup :]
    profiled = next((r for r in records if r["event"] == "profile"), None)
    return {
        "method": label,
        "median_step_s": statistics.median(times),
        "steps_timed": len(times),
        "max_gpu_mem_gib": train[-1].get("max_gpu_mem_gib"),
        "mask_setup_s": round(ready["seconds"], 2),
        "fisher_s": ready.get("fisher_seconds"),
        "select_s": ready.get("select_seconds"),
        "final_loss": train[-1]["loss"],
        "wall_s": round(time.time() - started, 1),
        **({"phases_ms_per_step": profiled["phases_ms_per_step"]} if profiled else {}),
    }


def run_rounds(runs: list[tuple], model_dir: Path, args) -> list[dict]:
    """Every method once per round; round r starts at the r-th method, so that no method always
    runs first. The profile (``--profile``) is taken in round 0 only. Stops at the first failure
    (the next runs would fail the same way: keep the GPU time for a rerun)."""
    rows = []
    for r in range(args.repeats):
        shift = r % len(runs)
        for label, method, extra in runs[shift:] + runs[:shift]:
            out = args.work / f"round{r}-{re.sub(r'[^a-z0-9]+', '-', label).strip('-')}"  # ct-f-eager-kernel
            rows.append(
                {
                    "round": r,
                    **run_method(label, method, extra, model_dir, out, args, args.profile and r == 0),
                }
            )
            if "error" in rows[-1]:
                return rows
    return rows


def summarize(rows: list[dict], labels: list[str]) -> list[dict]:
    """Per method: the median over rounds of its median step, and its ratio to vanilla's median
    step of the same round (each round's ratio, and their median)."""
    vanilla = {r["round"]: r["median_step_s"] for r in rows if r["method"] == "vanilla" and "error" not in r}
    results = []
    for label in labels:
        mine = [r for r in rows if r["method"] == label]
        if not mine:
            continue
        if any("error" in r for r in mine):
            results.append(next(r for r in mine if "error" in r))
            continue
        first = mine[0]
        ratios = [round(r["median_step_s"] / vanilla[r["round"]], 3) for r in mine if r["round"] in vanilla]
        results.append(
            {
                **{k: v for k, v in first.items() if k not in ("round", "median_step_s")},
                "median_step_s": statistics.median(r["median_step_s"] for r in mine),
                "rounds": len(mine),
                **(
                    {"ratio_vs_vanilla": statistics.median(ratios), "ratios_by_round": ratios}
                    if ratios
                    else {}
                ),
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="dry run: gloo, tiny model")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3, help="step intervals dropped before the median")
    parser.add_argument("--batch", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument(
        "--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ctscale-gpu-check"
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--only", default="", help="comma list of run labels to run (default: all)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds of all methods, each round starting at the next method"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="round 0: 2 more steps per run under torch.profiler (phase times)",
    )
    parser.add_argument(
        "--kernels-only", action="store_true", help="only the bit checks and the per-element kernel timings"
    )
    args = parser.parse_args()
    if args.kernels_only:
        summary = {
            "device": _device(),
            "portability": _portability(True),
            "kernels_ns_per_element": _kernel_timings(),
            "select_top_k_s": _selection_seconds(),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_kernels.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
        sys.exit(0 if all(summary["portability"].values()) else 1)
    if args.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
        args.steps, args.warmup, args.batch = 4, 1, 2
    layers, hidden, inter, heads, kv = SHAPES["cpu" if args.cpu else "gpu"]
    model_dir = args.work / "model"
    params = synthetic.write_decoder(model_dir, layers, hidden, inter, heads, kv)
    portability = _portability(compile_check=not args.cpu)
    runs = RUNS[:-1] if args.cpu else RUNS  # no C++ compile on CPU
    if args.only:
        runs = [r for r in runs if r[0] in args.only.split(",")]
    rows = run_rounds(runs, model_dir, args)
    results = summarize(rows, [label for label, _, _ in runs])
    summary = {
        "machine": platform.node(),
        "device": _device(),
        "parameters": params,
        "portability": portability,
        "results": results,
        "runs": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    print(f"{params / 1e6:,.1f} M parameters, ZeRO-3, bf16, {args.gpus} process(es) on {summary['device']}")
    print(
        "| method | median step (s) | vs vanilla | peak GPU memory (GiB) | mask set-up (s) | Fisher / selection (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['method']} | failed | | | |\n{r['error']}")
            continue
        print(
            f"| {r['method']} | {r['median_step_s']:.3f} | {r.get('ratio_vs_vanilla', float('nan')):.3f} | "
            f"{r['max_gpu_mem_gib']} | {r['mask_setup_s']} | {r['fisher_s']} / {r['select_s']} |"
        )
    if args.repeats > 1:
        print("ratios to vanilla by round:", {r["method"]: r.get("ratios_by_round") for r in results})
    profiled = [r for r in results if "phases_ms_per_step" in r]
    if profiled:
        print(
            "\n| method | forward+backward host / GPU ms | mask host / GPU ms | optimizer step host / GPU ms |"
        )
        print("|---|---:|---:|---:|")
        for r in profiled:
            cells = [
                r["phases_ms_per_step"].get(p, {}) for p in ("forward_backward", "mask", "optimizer_step")
            ]
            print(
                f"| {r['method']} | "
                + " | ".join(f"{c.get('host_ms')} / {c.get('gpu_ms')}" for c in cells)
                + " |"
            )
    for check, same in portability.items():
        print(f"{check}: {'identical' if same else 'DIFFERENT'}")
    if any("error" in r for r in results) or not all(portability.values()):
        sys.exit(1)


def _portability(compile_check: bool) -> dict[str, bool]:
    """CT-F masks and the top-k selection on this device equal the CPU's, bit for bit.

    Masks are portable across backends only if the counter hash and the radix select give the
    same bits on the GPU (int32 wrap-around, shifts, bincount) as on the CPU the tests run on.
    """
    import torch

    from ctscale.methods.counter_rng import bernoulli_mask, keep_and_rescale_
    from ctscale.methods.ct_d.topk import select_top_k

    device = _accelerator()
    n = (1 << 23) + 12345  # spans chunk boundaries of both the hash and the selection
    masks_equal = all(
        torch.equal(
            bernoulli_mask(seed, step, name, 1000, 1000 + n, 0.3),
            bernoulli_mask(seed, step, name, 1000, 1000 + n, 0.3, device).cpu(),
        )
        for seed, step, name in ((0, 0, "a.weight"), (42, 7, "layers.3.mlp.up_proj.weight"))
    )
    grad = torch.randn(n, generator=torch.Generator().manual_seed(1))
    fused = {  # the CT-F kernels that train: eager chunks, and one torch.compile kernel (Triton on GPU)
        compiled: keep_and_rescale_(grad.to(device, copy=True), 42, 7, "w", 1000, 0.3, compiled).cpu()
        for compiled in ((False, True) if compile_check else (False,))
    }
    expected = grad * bernoulli_mask(42, 7, "w", 1000, 1000 + n, 0.3) * (1 / 0.3)
    # 100 distinct values: the k-th largest sits in a block of ties, broken by flat index
    scores = torch.randint(100, (n,), generator=torch.Generator().manual_seed(0)).float() / 100
    k = int(0.3 * n)
    on_cpu = select_top_k({("w", 0): scores}, k)[("w", 0)]
    on_device = select_top_k({("w", 0): scores.to(device)}, k)[("w", 0)].cpu()
    checks = {
        "ct-f masks, CPU vs this device": masks_equal,
        "ct-f eager kernel on this device vs CPU masks": torch.equal(fused[False], expected),
        "top-k selection, CPU vs this device": torch.equal(on_cpu, on_device) and int(on_cpu.sum()) == k,
    }
    if compile_check:
        checks["ct-f compiled kernel on this device vs CPU masks"] = torch.equal(fused[True], expected)
    return checks


def _kernel_timings(n: int = 1 << 27, repeats: int = 7) -> dict[str, float]:
    """ns per element on this device: the CT-F kernels, CT-D's apply and one AdamW step, on one
    fp32 tensor of ``n`` entries (medians over ``repeats``, after one untimed call each)."""
    import torch

    from ctscale.methods.counter_rng import bernoulli_mask, keep_and_rescale_

    device = _accelerator()
    grad, param = torch.randn(n, device=device), torch.nn.Parameter(torch.randn(n, device=device))
    param.grad = grad.clone()
    opt = torch.optim.AdamW([param], lr=1e-5)
    keep = bernoulli_mask(0, 1, "w", 0, n, 0.3, device)
    parts = {
        "ct-f eager kernel": lambda: keep_and_rescale_(grad, 0, 1, "w", 0, 0.3),
        "ct-f compiled kernel": lambda: keep_and_rescale_(grad, 0, 1, "w", 0, 0.3, compiled=True),
        "ct-f before: bernoulli_mask + 2 multiplies": lambda: grad.mul_(
            bernoulli_mask(0, 1, "w", 0, n, 0.3, device)
        ).mul_(1 / 0.3),
        "ct-d apply: mul_(keep)": lambda: grad.mul_(keep),
        "adamw step (torch default)": opt.step,
    }
    # grad.normal_ between calls keeps values finite: the CT-F parts rescale in place
    return {
        name: round(_median_seconds(fn, repeats, grad.normal_) / n * 1e9, 4) for name, fn in parts.items()
    }


def _selection_seconds(n: int = 1 << 30) -> dict[str, float]:
    """Seconds of the exact top-30 % selection over ``n`` fp32 scores held on this device (one
    process, so no collectives), in 8 pieces; median of 3 after one untimed call."""
    import torch

    from ctscale.methods.ct_d.topk import select_top_k

    pieces = {(f"p{i}", 0): torch.empty(n // 8, device=_accelerator()).exponential_() for i in range(8)}
    k = int(0.3 * n)

    def select() -> None:
        masks = select_top_k(pieces, k)
        assert sum(int(m.sum()) for m in masks.values()) == k

    return {"entries": n, "seconds": round(_median_seconds(select, 3), 3)}


def _accelerator():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _median_seconds(fn, repeats: int, between=lambda: None) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after one untimed call, with the
    GPU synchronised around each; ``between()`` runs untimed after each call."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    fn()
    between()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        between()
    return statistics.median(times)


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


if __name__ == "__main__":
    main()
