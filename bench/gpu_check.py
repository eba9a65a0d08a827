"""GPU check: CT-D / CT-F vs vanilla under DeepSpeed ZeRO-3, NCCL, bf16, on a ~1 B decoder.

    bash bench/gpu_check.sh            # one GPU, no network; prints a table, writes $OUT/gpu_check.json
    bash bench/gpu_check.sh --cpu      # the same script on CPU (gloo, tiny model): a dry run

Each method runs the real ``ctscale train`` (torchrun, one process per GPU) on a 1.0 B-parameter
Qwen2-shaped decoder with random weights (``bench/synthetic.py``: tokenizer and data made on
the spot), ``ds_configs/zero3.json`` with ``train.bf16=true``. Reports the median step time
(first steps dropped), the ratio to vanilla, the peak GPU memory, and CT-D's Fisher/selection time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def run_method(method: str, model_dir: Path, out: Path, args: argparse.Namespace) -> dict:
    overrides = [
        f"model.name_or_path={model_dir}",
        "model.random_init=true",
        "data.task=jsonl",
        f"data.train_file={model_dir / 'train.jsonl'}",
        f"data.max_length={args.seq}",
        f"train.output_dir={out}",
        f"train.batch_size={args.batch * args.gpus}",
        f"train.max_steps={args.steps}",
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
        return {"method": method, "error": (proc.stdout + proc.stderr)[-3000:]}
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    ready = next(r for r in records if r["event"] == "mask_ready")
    times = [b["time"] - a["time"] for a, b in zip(train, train[1:])][args.warmup :]
    return {
        "method": method,
        "median_step_s": statistics.median(times),
        "steps_timed": len(times),
        "max_gpu_mem_gib": train[-1].get("max_gpu_mem_gib"),
        "mask_setup_s": round(ready["seconds"], 2),
        "final_loss": train[-1]["loss"],
        "wall_s": round(time.time() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="dry run: gloo, tiny model")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="step intervals dropped before the median")
    parser.add_argument("--batch", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument(
        "--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ctscale-gpu-check"
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    if args.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
        args.steps, args.warmup, args.batch = 4, 1, 2
    layers, hidden, inter, heads, kv = SHAPES["cpu" if args.cpu else "gpu"]
    model_dir = args.work / "model"
    params = synthetic.write_decoder(model_dir, layers, hidden, inter, heads, kv)
    results = [run_method(m, model_dir, args.work / m, args) for m in ("vanilla", "ct-f", "ct-d")]
    base = results[0].get("median_step_s")
    for r in results:
        if base and "median_step_s" in r:
            r["ratio_vs_vanilla"] = round(r["median_step_s"] / base, 3)
    summary = {"machine": platform.node(), "device": _device(), "parameters": params, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    print(f"{params / 1e6:,.1f} M parameters, ZeRO-3, bf16, {args.gpus} process(es) on {summary['device']}")
    print("| method | median step (s) | vs vanilla | peak GPU memory (GiB) | mask set-up (s) |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['method']} | failed | | | |\n{r['error']}")
            continue
        print(
            f"| {r['method']} | {r['median_step_s']:.3f} | {r.get('ratio_vs_vanilla', float('nan')):.3f} | "
            f"{r['max_gpu_mem_gib']} | {r['mask_setup_s']} |"
        )
    if any("error" in r for r in results):
        sys.exit(1)


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


if __name__ == "__main__":
    main()
