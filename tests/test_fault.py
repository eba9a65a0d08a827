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
    # a file beside the run directory (which the job must find as it left it): no pipe to fill
    with open(out.with_suffix(".log"), "w") as log:
        return subprocess.Popen(
            ["bash", str(REPO / "launch" / "torchrun.sh"), *args],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _kill(job: subprocess.Popen) -> None:
    """Kill the launcher and its workers (torchrun starts them in sessions of their own)."""
    with contextlib.suppress(psutil.Error):
        launcher = psutil.Process(job.pid)
        for proc in [*launcher.children(recursive=True), launcher]:
            with contextlib.suppress(psutil.Error):
                proc.kill()
    job.wait()


def _finish(job: subprocess.Popen, out: Path, timeout: float) -> str:
    """The job's output once it exits; a job still running after ``timeout`` s is killed (a hang)."""
    try:
        job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(job)
        pytest.fail(f"the job hung (killed after {timeout:.0f} s):\n{_log(out)}")
    return _log(out)


def _log(out: Path) -> str:
    return out.with_suffix(".log").read_text(errors="replace")[-3000:]


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
    # the uninterrupted run alongside (start-up is mostly waiting: cheaper than one after the other)
    straight_dir, faulty_dir = tmp_path / "straight", tmp_path / "faulty"
    straight = _torchrun(straight_dir, tiny_bert, glue_dir, row, max_restarts=0)
    job = _torchrun(faulty_dir, tiny_bert, glue_dir, row, max_restarts=1)
    try:
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
        out = _finish(job, faulty_dir, 300)
        assert job.returncode == 0, out
        straight_out = _finish(straight, straight_dir, 300)
        assert straight.returncode == 0, straight_out
    finally:
        for proc in (job, straight):
            if proc.poll() is None:
                _kill(proc)

    events = [line for line in (faulty_dir / "metrics.jsonl").read_text().splitlines() if '"resumed"' in line]
    assert len(events) == 1, f"the restarted job did not resume from a checkpoint:\n{out}"
    want = load_file(straight_dir / "model" / "model.safetensors")
    got = load_file(faulty_dir / "model" / "model.safetensors")
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), (
            f"{row}: {name} differs after the restart (killed after {killed_after})"
        )
