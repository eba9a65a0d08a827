"""A ~1.5 B-parameter decoder on this CPU machine: CT-D on 2 ranks, peak RSS and time per phase.

    python bench/billion_run.py --mode child-only            # FSDP2, AdamW state for the child only
    python bench/billion_run.py --mode vanilla               # the same run with dense AdamW
    python bench/billion_run.py --mode dense-ct-d --engine deepspeed   # ZeRO-3
    python bench/billion_run.py --mode dense-ct-d --engine deepspeed --ds-config zero3_bf16_masters.json
    python bench/billion_run.py --mode child-only --layers 2           # a quick dry run (0.17 B)

The model is Qwen2-1.5B's block shape (hidden 1536, 12 heads / 2 KV heads, MLP 8960, tied
embeddings) with 30 blocks and SmolLM2's vocabulary size (49,152 instead of Qwen2's 151,936):
1.48 B parameters, with random weights
(``model.random_init``: no weights needed to exercise the machinery), fp32 everywhere, on
synthetic instruction data (``bench/synthetic.py``: offline, tokenizer trained on the spot). The script
runs the real ``ctscale train`` under torchrun (2 ranks, gloo): Fisher pass, global top-p
selection, sharded mask saved, a few CT-D training steps. A monitor samples every rank's RSS
and stops the run if the ranks together pass ``--budget-gib`` or the machine runs low on
memory (so "does not fit" is measured, not an OOM-killed machine). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import synthetic

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
MODES = {
    "child-only": ["method.name=ct-d", "method.child_only_optimizer=true"],
    "dense-ct-d": ["method.name=ct-d"],
    "vanilla": ["method.name=vanilla"],
}
ENGINES = {"fsdp": ["distributed.backend=fsdp"], "deepspeed": ["distributed.backend=deepspeed"]}
# ds_configs/zero3.json with buffers sized for CPU memory: DeepSpeed's defaults (reduce bucket
# 5e8 and sub-group 1e9 entries: 2 and 4 GB of fp32 buffers per rank) are meant for GPUs.
ZERO3_CPU = {
    "reduce_bucket_size": 5e7,
    "sub_group_size": 1e8,
    "stage3_prefetch_bucket_size": 5e7,
    "stage3_max_live_parameters": 1e8,
    "stage3_max_reuse_distance": 1e8,
}


def write_ds_config(path: Path, shipped: str) -> Path:
    config = json.loads((REPO / "ds_configs" / shipped).read_text())
    config["zero_optimization"].update(ZERO3_CPU)
    path.write_text(json.dumps(config, indent=2))
    return path


def run(args: argparse.Namespace) -> dict:
    work = Path(args.workdir)
    model_dir = work / f"qwen2-{args.layers}l"
    out = work / f"run-{args.engine}-{args.mode}-{args.dtype}-{args.ds_config.removesuffix('.json')}"
    parameters = synthetic.write_decoder(model_dir, layers=args.layers)
    data = model_dir / "train.jsonl"
    overrides = [
        f"model.name_or_path={model_dir}",
        "model.random_init=true",
        f"model.dtype={args.dtype}",
        "data.task=jsonl",
        f"data.train_file={data}",
        "data.max_length=64",
        f"train.output_dir={out}",
        "train.overwrite=true",  # a rerun into the same work directory replaces the run
        "train.batch_size=2",  # one sequence per rank per step
        f"train.max_steps={args.steps}",
        "train.log_every=1",
        "train.save_model=false",
        "train.tensorboard=false",
        "train.eval_every_epoch=false",
        "train.lr=1e-5",
        f"fisher.num_batches={args.fisher_batches}",
        f"method.reserve_p={args.p}",
        *MODES[args.mode],
        *ENGINES[args.engine],
    ]
    if args.engine == "deepspeed":
        ds_config = write_ds_config(work / f"{args.ds_config.removesuffix('.json')}_cpu.json", args.ds_config)
        overrides.append(f"distributed.deepspeed_config={ds_config}")
        if json.loads(ds_config.read_text()).get("bf16", {}).get("enabled") is True:
            overrides.append("train.bf16=true")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    if args.mmap_threshold:  # glibc: tensors above this size are mmapped, so freeing returns them
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
        str(args.port), "-m", "ctscale", "train", *[a for o in overrides for a in ("--set", o)],
    ]  # fmt: skip
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    started = time.time()
    # a log file, not a pipe: nobody reads a pipe during the run, and once its 64 KiB buffer is
    # full (DeepSpeed's deprecation warnings fill it) every rank blocks in its next write
    log_path = work / f"{out.name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    samples, stopped = monitor(proc, args.budget_gib * GIB)
    peaks: dict[int, int] = {}
    for _, ranks in samples:
        for rank, rss in ranks.items():
            peaks[rank] = max(peaks.get(rank, 0), rss)
    log_tail = log_path.read_text(errors="replace")[-4000:]
    records = (
        [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        if (out / "metrics.jsonl").exists()
        else []
    )
    seconds, bounds = phases(records, started)
    if stopped is not None or proc.returncode != 0:
        bounds.append(("stopped", time.time()))
    return {
        "engine": args.engine,
        "mode": args.mode,
        "layers": args.layers,
        "parameters": parameters,
        "reserve_p": args.p,
        "fisher_batches": args.fisher_batches,
        "dtype": args.dtype,
        "ds_config": args.ds_config if args.engine == "deepspeed" else None,
        "mmap_threshold": args.mmap_threshold,
        "exit_code": proc.returncode,
        "fit": proc.returncode == 0 and stopped is None,
        "stopped": stopped,
        "peak_rss_gib_per_rank": {r: round(v / GIB, 2) for r, v in sorted(peaks.items())},
        "phases_s": seconds,
        "peak_rss_gib_per_phase": phase_peaks(samples, bounds),
        "wall_s": round(time.time() - started, 1),
        "log_tail": None if proc.returncode == 0 else log_tail[-1500:],
    }


def monitor(proc: subprocess.Popen, budget: float) -> tuple[list[tuple[float, dict[int, int]]], str | None]:
    """Sample each rank's RSS every 0.2 s; stop the job when the ranks together pass ``budget``
    or the machine has < 1 GiB available. Returns ([(time, {rank: rss})], why it was stopped)."""
    samples: list[tuple[float, dict[int, int]]] = []
    stopped = None
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        ranks: dict[int, int] = {}
        for child in parent.children(recursive=True):
            try:
                rank = int(child.environ().get("RANK", -1))
                rss = child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
                continue
            if rank >= 0:
                ranks[rank] = rss
        samples.append((time.time(), ranks))
        total = sum(ranks.values())
        low = psutil.virtual_memory().available < GIB
        if stopped is None and (total > budget or low):
            stopped = f"ranks' RSS {total / GIB:.1f} GiB" + (
                " (machine < 1 GiB free)" if low else f" > budget {budget / GIB:.0f} GiB"
            )
            proc.send_signal(signal.SIGTERM)  # torchrun stops its workers
            for child in parent.children(recursive=True):
                child.kill()
        time.sleep(0.2)
    return samples, stopped


def phase_peaks(samples: list[tuple[float, dict[int, int]]], bounds: list[tuple[str, float]]) -> dict:
    """Peak RSS (GiB) per rank within each phase; ``bounds`` are (phase, start time) in order."""
    out: dict[str, dict[int, float]] = {}
    for i, (phase, start) in enumerate(bounds):
        end = bounds[i + 1][1] if i + 1 < len(bounds) else float("inf")
        for t, ranks in samples:
            if start <= t < end:
                for rank, rss in ranks.items():
                    peak = out.setdefault(phase, {})
                    peak[rank] = max(peak.get(rank, 0.0), round(rss / GIB, 2))
    return out


def phases(records: list[dict], started: float) -> tuple[dict, list[tuple[str, float]]]:
    """Seconds per phase from metrics.jsonl (start-up + model build, Fisher, selection, mask
    save and load, every training step), and the start time of each phase."""
    bounds = [("startup_and_build", started)]
    ready = next((r for r in records if r["event"] == "mask_ready"), None)
    if ready is None:
        return {}, bounds
    setup_start = ready["time"] - ready["seconds"]
    out = {"startup_and_build": round(setup_start - started, 1)}
    t = setup_start
    for key, value in ready.items():
        if key.endswith("_seconds"):
            out[key.removesuffix("_seconds")] = value
            bounds.append((key.removesuffix("_seconds"), t))
            t += value
    bounds.append(("train", ready["time"]))
    steps = [r["time"] for r in records if r["event"] == "train"]
    out["train_steps"] = [round(b - a, 1) for a, b in zip([ready["time"], *steps], steps)]
    return out, bounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=ENGINES, default="fsdp")
    parser.add_argument("--mode", choices=MODES, default="child-only")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model.dtype")
    parser.add_argument(
        "--ds-config",
        default="zero3.json",
        help="ds_configs/ file for --engine deepspeed (buffers resized for CPU); zero3_bf16_masters.json: "
        "bf16 masters and AdamW states, 8 B per parameter",
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fisher-batches", type=int, default=2)
    parser.add_argument("--budget-gib", type=float, default=21.0)
    parser.add_argument("--workdir", default="/tmp/ctscale-billion")
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument(
        "--mmap-threshold", type=int, default=0, help="glibc MALLOC_MMAP_THRESHOLD_ (bytes; 0: default)"
    )
    result = run(parser.parse_args())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
