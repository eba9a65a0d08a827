"""The launchers run a 2-process job end to end: Fisher, selection, mask, training, eval, model."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ctscale import store
from ctscale.config import load_config
from ctscale.trainer import Trainer

from dist_harness import free_port
from dist_workers import tiny_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def launch(script: str, overrides: list[str], extra_env: dict | None = None, timeout: int = 400):
    env = {
        **os.environ,
        "MASTER_PORT": str(free_port()),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        **(extra_env or {}),
    }
    args = [a for o in overrides for a in ("--set", o)]
    return subprocess.run(
        ["bash", str(REPO / "launch" / script), *args],
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
    info = store.read_info(tmp_path / "mask")
    assert len(info.files) == 2 and info.total_selected == round(0.3 * info.total_entries)
    saved = load_file(tmp_path / "model" / "model.safetensors")
    assert saved.keys() == single_process_model.keys()
    diff = max((saved[k].float() - single_process_model[k].float()).abs().max().item() for k in saved)
    assert diff <= 5e-6
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r["event"] == "eval" for r in records)
    assert torch.tensor([r["loss"] for r in records if r["event"] == "train"]).isfinite().all()
