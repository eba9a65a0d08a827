"""A rank killed mid-run: torchrun restarts the job, which resumes from the last complete
checkpoint and ends with the same weights as an uninterrupted run (loopback only, bounded)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from dist_harness import free_port
from dist_workers import tiny_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _torchrun(out: Path, tiny_bert: Path, glue_dir: Path, max_restarts: int) -> subprocess.Popen:
    overrides = tiny_overrides(tiny_bert, glue_dir, out) + [
        "distributed.backend=ddp",
        "method.name=ct-f",
        "train.max_steps=30",
        "train.save_every=5",
        "train.save_model=true",
        "train.resume=true",
        "train.log_every=5",
    ]
    env = {
        **os.environ,
        "MASTER_PORT": str(free_port()),
        "MAX_RESTARTS": str(max_restarts),
        "OMP_NUM_THREADS": "1",
    }
    args = [a for o in overrides for a in ("--set", o)]
    return subprocess.Popen(
        ["bash", str(REPO / "launch" / "torchrun.sh"), *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _worker_with_rank(launcher: psutil.Process, rank: str) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == rank and "ctscale" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def test_killed_rank_restarts_from_checkpoint_and_matches(tiny_bert, glue_dir, tmp_path):
    straight = _torchrun(tmp_path / "straight", tiny_bert, glue_dir, max_restarts=0)
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out[-3000:]

    faulty_dir = tmp_path / "faulty"
    job = _torchrun(faulty_dir, tiny_bert, glue_dir, max_restarts=1)
    launcher = psutil.Process(job.pid)
    deadline = time.monotonic() + 240
    killed_after = None
    while time.monotonic() < deadline and job.poll() is None:
        latest = faulty_dir / "checkpoints" / "latest"
        if latest.is_file() and latest.read_text().strip() >= "step-00000010":
            victim = _worker_with_rank(launcher, "1")
            if victim is not None:
                killed_after = latest.read_text().strip()
                os.kill(victim.pid, signal.SIGKILL)
                break
        time.sleep(0.02)
    assert killed_after is not None, "the run finished or stalled before a rank could be killed"
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out[-3000:]

    events = [line for line in (faulty_dir / "metrics.jsonl").read_text().splitlines() if '"resumed"' in line]
    assert len(events) == 1, "the restarted job did not resume from a checkpoint"
    want = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    got = load_file(faulty_dir / "model" / "model.safetensors")
    for name, value in want.items():
        assert torch.equal(got[name], value), (
            f"{name} differs after the restart (killed after {killed_after})"
        )
