"""bench/gpu_check.sh, dry run on CPU: the script a GPU machine runs must not rot unseen."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_reports_every_method(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--cpu", "--out", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    results = {r["method"]: r for r in summary["results"]}
    assert list(results) == ["vanilla", "ct-d", "ct-f (eager kernel)"]  # no C++ compile on CPU
    assert summary["portability"] and all(summary["portability"].values())
    assert results["vanilla"]["ratio_vs_vanilla"] == 1.0
    for r in results.values():
        assert r["steps_timed"] == 2 and r["median_step_s"] > 0 and r["final_loss"] > 0
    assert results["ct-d"]["mask_setup_s"] > results["vanilla"]["mask_setup_s"]  # the Fisher pass ran
    assert "| ct-d |" in proc.stdout
