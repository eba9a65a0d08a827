"""bench/gpu_check.sh, dry run on CPU: the script a GPU machine runs must not rot unseen."""

from __future__ import annotations

import json
import os
import subprocess
from types import SimpleNamespace

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_check_dry_run_reports_every_method(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--cpu", "--profile", "--out", str(tmp_path / "out")],
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
    # --profile: phase times from 2 extra, untimed steps
    for r in results.values():
        assert set(r["phases_ms_per_step"]) == {"forward_backward", "mask", "optimizer_step"}
    assert results["ct-f (eager kernel)"]["phases_ms_per_step"]["mask"]["host_ms"] > 0


def test_rounds_rotate_the_order_and_ratios_pair_within_a_round(monkeypatch, tmp_path):
    """``--repeats``: each round starts at the next method; a ratio divides by the vanilla run
    of its own round; the profile is taken in round 0 only."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_check

    calls = []
    step = {("vanilla", 0): 1.0, ("ct-d", 0): 1.1, ("vanilla", 1): 2.0, ("ct-d", 1): 2.4}

    def fake_run(label, method, extra, model_dir, out, args, profile):
        calls.append((label, profile))
        return {"method": label, "median_step_s": step[(label, len(calls) > 2)], "max_gpu_mem_gib": None}

    monkeypatch.setattr(gpu_check, "run_method", fake_run)
    runs = [("vanilla", "vanilla", []), ("ct-d", "ct-d", [])]
    args = SimpleNamespace(repeats=2, profile=True, work=tmp_path)
    rows = gpu_check.run_rounds(runs, tmp_path, args)
    assert calls == [("vanilla", True), ("ct-d", True), ("ct-d", False), ("vanilla", False)]
    results = {r["method"]: r for r in gpu_check.summarize(rows, ["vanilla", "ct-d"])}
    assert results["ct-d"]["ratios_by_round"] == [1.1, 1.2]
    assert results["ct-d"]["ratio_vs_vanilla"] == pytest.approx(1.15)
    assert results["vanilla"]["median_step_s"] == 1.5
