"""``train.profile_from``: a torch.profiler window over a few steps, results unchanged."""

from __future__ import annotations

import json

import torch

from ctscale.config import load_config
from ctscale.profiling import PHASES
from ctscale.trainer import Trainer

from dist_workers import tiny_overrides


def _train(tiny_bert, glue_dir, out, *extra: str) -> dict[str, torch.Tensor]:
    trainer = Trainer(
        load_config(None, [*tiny_overrides(tiny_bert, glue_dir, out), "method.name=ct-f", *extra])
    )
    trainer.run()
    return {k: v.detach().clone() for k, v in trainer.backend.unwrapped_model().state_dict().items()}


def test_profile_window_writes_trace_ops_and_phase_times(tiny_bert, glue_dir, tmp_path):
    profiled = _train(tiny_bert, glue_dir, tmp_path / "on", "train.profile_from=1", "train.profile_steps=2")
    plain = _train(tiny_bert, glue_dir, tmp_path / "off")
    assert all(torch.equal(profiled[k], plain[k]) for k in plain), "profiling changed the weights"

    records = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    (event,) = [r for r in records if r["event"] == "profile"]
    assert event["steps"] == [1, 3]
    assert set(event["phases_ms_per_step"]) == set(PHASES)
    assert all(p["host_ms"] > 0 for p in event["phases_ms_per_step"].values())

    profile_dir = tmp_path / "on" / "profile"
    assert sorted(p.name for p in profile_dir.iterdir()) == ["ops-rank00000.txt", "trace-rank00000.json"]
    names = [
        e.get("name") for e in json.loads((profile_dir / "trace-rank00000.json").read_text())["traceEvents"]
    ]
    assert {f"ctscale/{p}": names.count(f"ctscale/{p}") for p in PHASES} == {
        f"ctscale/{p}": 2 for p in PHASES
    }
    assert "aten::" in (profile_dir / "ops-rank00000.txt").read_text()
    assert not (tmp_path / "off" / "profile").exists()
