"""A rank killed mid-run, on every backend: torchrun restarts the job, which resumes from the
last complete checkpoint and ends with the same weights as an uninterrupted run (loopback only,
bounded: a hung restart fails the test instead of the suite)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROWS
from dist_harness import free_port
from dist_workers import tiny_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 12, 4  # the kill lands after the first checkpoint, with 8 steps to go
BACKENDS = ("ddp", "fsdp", "zero1", "zero2", "zero3")


def _torchrun(out: Path, tiny_bert: Path, glue_dir: Path, row: str, max_restarts: int) -> subprocess.Popen:
    overrides = tiny_overrides(tiny_bert, glue_dir, out) + [
        *ROWS[row],
        "method.name=ct-f",
        f"train.max_steps={STEPS}",
        f"train.save_every={SAVE_EVERY}",
        "train.save_model=true",
        "train.resume=true",
        f"train.log_every={SAVE_EVERY}",
    ]
    env = {
        **os.environ,
        "MASTER_PORT": str(free_port()),
        "MAX_RESTARTS": str(max_restarts),
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
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


def _finish(job: subprocess.Popen, timeout: float) -> str:
    """The job's output once it exits; a job still running after ``timeout`` s is killed (a hang)."""
    try:
        out, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts its workers in sessions of their own: kill them one by one
        for proc in [*psutil.Process(job.pid).children(recursive=True), psutil.Process(job.pid)]:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        out, _ = job.communicate()
        pytest.fail(f"the job hung (killed after {timeout:.0f} s):\n{out[-3000:]}")
    return out


def _worker_with_rank(launcher: psutil.Process, rank: str) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == rank and "ctscale" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


@pytest.mark.parametrize("row", BACKENDS)
def test_killed_rank_restarts_from_checkpoint_and_matches(row, tiny_bert, glue_dir, tmp_path):
    straight = _torchrun(tmp_path / "straight", tiny_bert, glue_dir, row, max_restarts=0)
    out = _finish(straight, 300)
    assert straight.returncode == 0, out[-3000:]

    faulty_dir = tmp_path / "faulty"
    job = _torchrun(faulty_dir, tiny_bert, glue_dir, row, max_restarts=1)
    launcher = psutil.Process(job.pid)
    deadline = time.monotonic() + 240
    killed_after = None
    while time.monotonic() < deadline and job.poll() is None:
        latest = faulty_dir / "checkpoints" / "latest"
        if latest.is_file() and latest.read_text().strip() >= f"step-{SAVE_EVERY:08d}":
            victim = _worker_with_rank(launcher, "1")
            if victim is not None:
                killed_after = latest.read_text().strip()
                os.kill(victim.pid, signal.SIGKILL)
                break
        time.sleep(0.01)
    assert killed_after is not None, "the run finished or stalled before a rank could be killed"
    out = _finish(job, 180)
    assert job.returncode == 0, out[-3000:]

    events = [line for line in (faulty_dir / "metrics.jsonl").read_text().splitlines() if '"resumed"' in line]
    assert len(events) == 1, f"the restarted job did not resume from a checkpoint:\n{out[-3000:]}"
    want = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    got = load_file(faulty_dir / "model" / "model.safetensors")
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), (
            f"{row}: {name} differs after the restart (killed after {killed_after})"
        )
