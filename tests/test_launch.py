"""The launchers run a 2-process job end to end: Fisher, selection, mask, training, eval, model."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ctscale.config import load_config
from ctscale.storage import mask_file
from ctscale.trainer import Trainer

from dist_harness import free_port
from dist_workers import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def launch(
    script: str,
    overrides: list[str],
    extra_env: dict | None = None,
    timeout: int = 400,
    command: str | None = None,
):
    env = {
        **os.environ,
        "MASTER_PORT": str(free_port()),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        **(extra_env or {}),
    }
    args = [a for o in overrides for a in ("--set", o)]
    return subprocess.run(
        ["bash", str(REPO / "launch" / script), *([command] if command else []), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def single_process_model(tiny_bert, glue_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    cfg = load_config(
        None, tiny_overrides(tiny_bert, glue_dir, out) + ["method.name=ct-d", "train.save_model=true"]
    )
    Trainer(cfg).run()
    return load_file(out / "model" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,backend",
    [
        ("torchrun.sh", ["distributed.backend=ddp"]),
        ("deepspeed.sh", ["distributed.backend=deepspeed", "distributed.zero_stage=2"]),
    ],
    ids=["torchrun-ddp", "deepspeed-zero2"],
)
def test_two_process_job_end_to_end(script, backend, tiny_bert, glue_dir, tmp_path, single_process_model):
    if "deepspeed" in script and not (REPO / "ctscale" / "backends" / "deepspeed.py").exists():
        pytest.skip("deepspeed backend not built")
    overrides = (
        tiny_overrides(tiny_bert, glue_dir, tmp_path)
        + backend
        + ["method.name=ct-d", "train.save_model=true"]
    )
    proc = launch(script, overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"final"')]
    assert len(final) == 1 and 0.0 <= final[0]["final"]["validation"]["accuracy"] <= 1.0  # rank 0 only
    info = mask_file.read_info(tmp_path / "mask")
    assert len(info.files) == 2 and info.total_selected == round(0.3 * info.total_entries)
    saved = load_file(tmp_path / "model" / "model.safetensors")
    assert saved.keys() == single_process_model.keys()
    diff = max((saved[k].float() - single_process_model[k].float()).abs().max().item() for k in saved)
    assert diff <= 5e-6
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r["event"] == "eval" for r in records)
    assert torch.tensor([r["loss"] for r in records if r["event"] == "train"]).isfinite().all()


# A stand-in for torchrun / deepspeed / srun: records its arguments, one per line, and exits 0.
RECORDER = """#!/usr/bin/env bash
printf '%s\\n' "$@" >"$RECORDED"
"""


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh", "slurm.sbatch"])
@pytest.mark.parametrize("command", [None, "train", "fisher"])
def test_launchers_run_train_or_fisher(script, command, tmp_path):
    """A first argument `train` or `fisher` names the ctscale command (default train); the rest
    reaches it unchanged. Fast: the launcher programs are recorders."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("torchrun", "deepspeed", "srun", "scontrol"):
        (bin_dir / name).write_text(RECORDER if name != "srun" else SRUN_RUNS_ITS_COMMAND)
        (bin_dir / name).chmod(0o755)
    recorded = tmp_path / "argv"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RECORDED": str(recorded),
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_ID": "7",
    }
    tail = ["--config", "my config.yaml", "--out", "runs/m"]
    argv = ([command] if command else []) + tail
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / script), *argv], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    args = recorded.read_text().splitlines()
    (at,) = [i for i in range(len(args) - 1) if args[i] in ("-m", "--module") and args[i + 1] == "ctscale"]
    # slurm.sbatch turns checkpoints and resume on for training (before the user's arguments)
    on = ["--set", "train.save_every=500", "--set", "train.resume=true"]
    checkpoints = on if script == "slurm.sbatch" and command in (None, "train") else []
    assert args[at + 2 :] == [command or "train", *checkpoints, *tail]


# fake srun (test_slurm has the full one): drop srun's options, run the per-node command
SRUN_RUNS_ITS_COMMAND = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
SLURM_NODEID=0 SLURM_GPUS_ON_NODE=1 exec "$@"
"""


@pytest.mark.slow
def test_torchrun_fisher_writes_the_single_process_mask(tiny_bert, glue_dir, tmp_path):
    """`launch/torchrun.sh fisher`: 2 processes write the same child network as `ctscale fisher`
    in one process (a sharded mask, loaded here whole)."""
    from ctscale.cli import main

    overrides = tiny_overrides(tiny_bert, glue_dir, tmp_path / "run")
    one = tmp_path / "one.safetensors"
    assert main(["fisher", *(a for o in overrides for a in ("--set", o)), "--out", str(one)]) == 0
    proc = launch("torchrun.sh", ["distributed.backend=ddp", *overrides], timeout=300, command="fisher")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = tmp_path / "run" / "mask"
    assert len(mask_file.read_info(two).files) == 2

    def bits(path):
        info = mask_file.read_info(path)
        return mask_file.load_mask(path, [(n, s, 0, math.prod(s)) for n, s in info.shapes.items()])

    a, b = bits(one), bits(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_jobs_on_one_host_at_once_both_finish_right(tiny_bert, glue_dir, tmp_path, single_process_model):
    """Two single-node jobs started together with the launcher's defaults (no port, no
    rendezvous id given): each gets a rendezvous of its own (torchrun --standalone), and each
    trains what one process trains. With one fixed port and id, the second job joined the
    first one's rendezvous, or never started."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RDZV_ID")}
    env |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    jobs = []
    for name in ("a", "b"):
        overrides = tiny_overrides(tiny_bert, glue_dir, tmp_path / name) + [
            "distributed.backend=ddp",
            "method.name=ct-d",
            "train.save_model=true",
        ]
        args = [a for o in overrides for a in ("--set", o)]
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed below)
        cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), *args]
        jobs.append((subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in jobs:
        try:
            proc.wait(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    for (proc, _), name in zip(jobs, "ab"):
        assert proc.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        saved = load_file(tmp_path / name / "model" / "model.safetensors")
        diff = max((saved[k].float() - single_process_model[k].float()).abs().max().item() for k in saved)
        assert diff <= 5e-6
