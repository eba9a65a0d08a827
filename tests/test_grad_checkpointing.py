"""Gradient checkpointing (``model.gradient_checkpointing``) recomputes activations and must
not change the result: the same weights with and without it, in 1 process and under FSDP2."""

from __future__ import annotations

import pytest

from ctscale.config import load_config
from ctscale.models import load_classifier
from ctscale.tasks import get_task

from dist_harness import run_world
from dist_workers import tiny_overrides, train_runs


@pytest.mark.slow
def test_checkpointing_changes_no_weight(tiny_bert, glue_dir, tmp_path, reference):
    cfg = load_config(None, [f"model.name_or_path={tiny_bert}", "model.gradient_checkpointing=true"])
    model = load_classifier(cfg.model, get_task("rte"))
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing  # on
    base = tiny_overrides(tiny_bert, glue_dir, tmp_path / "local") + ["method.name=ct-d"]
    local = run_world(train_runs, 1, [base + ["model.gradient_checkpointing=true"]])[0][0]
    fsdp = tiny_overrides(tiny_bert, glue_dir, tmp_path / "fsdp") + [
        "method.name=ct-d",
        "model.gradient_checkpointing=true",
        "distributed.backend=fsdp",
    ]
    sharded = run_world(train_runs, 2, [fsdp])[0][0]
    want = reference["ct-d"]["state"]  # 1 process, no checkpointing
    for got in (local["state"], sharded["state"]):
        assert got.keys() == want.keys()
        assert max((got[k] - want[k]).abs().max().item() for k in want) <= 5e-6
