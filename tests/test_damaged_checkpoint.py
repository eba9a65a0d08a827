"""A damaged checkpoint is a decision, not a traceback: every checkpoint carries a manifest of
its files' sizes and sha256, checked before a resume. A damaged newest checkpoint is reported in
one line and the newest intact one is used; none intact is one ``ctscale: error:`` line, exit 2.
Temporary files of interrupted writes are removed when the next run starts."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch

from ctscale.cli import main
from ctscale.config import load_config
from ctscale.storage.checkpoint import MANIFEST, CheckpointManager
from ctscale.trainer import Trainer

from conftest import ROWS
from dist_harness import run_world
from dist_workers import damage_then_resume, tiny_overrides


@pytest.fixture
def trained(tiny_bert, glue_dir, tmp_path):
    """An uninterrupted 4-step run (checkpoints at steps 2 and 4): its overrides, run directory
    and final weights."""
    overrides = tiny_overrides(tiny_bert, glue_dir, tmp_path) + ["method.name=ct-f"]
    trainer = Trainer(load_config(None, overrides))
    trainer.run()
    final = {k: v.clone() for k, v in trainer.backend.consolidated_state_dict().items()}
    return overrides, tmp_path, final


def _damage(file: Path, how: str) -> None:
    data = bytearray(file.read_bytes())
    if how == "truncate":
        file.write_bytes(data[: len(data) // 2])
    else:  # one flipped bit in the middle: same size, loads fine, wrong numbers
        data[len(data) // 2] ^= 0x01
        file.write_bytes(data)


def _resumed_event(out: Path) -> dict:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(e for e in reversed(events) if e["event"] == "resumed")


def test_every_checkpoint_has_a_manifest_of_its_files(trained):
    _, out, _ = trained
    ckpt = out / "checkpoints" / "step-00000004"
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(files) == on_disk and "trainer_state.json" in files
    for name, entry in files.items():
        data = (ckpt / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize(
    ("how", "file"), [("truncate", "optimizer.pt"), ("flip", "model.safetensors"), ("delete", MANIFEST)]
)
def test_damaged_latest_checkpoint_resumes_from_the_previous_one(trained, how, file, caplog):
    overrides, out, uninterrupted = trained
    damaged = out / "checkpoints" / "step-00000004" / file
    if how == "delete":  # as a copy that stopped before its last file
        damaged.unlink()
    else:
        _damage(damaged, how)
    caplog.set_level(logging.WARNING, logger="ctscale.storage.checkpoint")
    trainer = Trainer(load_config(None, [*overrides, "train.resume=true"]))
    trainer.run()
    reports = [r.getMessage() for r in caplog.records if r.name == "ctscale.storage.checkpoint"]
    assert len(reports) == 1 and "step-00000004" in reports[0] and file in reports[0], reports
    assert "resuming from step-00000002" in reports[0]
    event = _resumed_event(out)
    assert event["from"].endswith("step-00000002") and set(event["skipped"]) == {"step-00000004"}
    got = trainer.backend.consolidated_state_dict()
    for name, want in uninterrupted.items():
        assert torch.equal(got[name], want), f"{name} differs from the uninterrupted run"


def test_no_intact_checkpoint_is_one_clear_error(trained, capsys):
    overrides, out, _ = trained
    for step in ("step-00000002", "step-00000004"):
        _damage(out / "checkpoints" / step / "model.safetensors", "truncate")
    capsys.readouterr()
    args = [a for o in [*overrides, "train.resume=true"] for a in ("--set", o)]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "ctscale" in line or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith("ctscale: error: no intact checkpoint"), err
    assert "step-00000002" in lines[0] and "step-00000004" in lines[0] and "model.safetensors" in lines[0]


def test_stale_temporary_files_are_removed_at_the_next_start(trained):
    overrides, out, _ = trained
    ckpts = out / "checkpoints"
    stale = [ckpts / ".tmp-step-00000006", ckpts / ".latest.tmp-4242", out / ".model.tmp-4242"]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"partial")
    stale[1].write_text("step-000")
    stale[2].mkdir()
    # resumed at its last step: no training step and no save runs, only the start
    Trainer(load_config(None, [*overrides, "train.resume=true"])).run()
    assert not [p for p in stale if p.exists()]
    assert CheckpointManager(out).latest().name == "step-00000004"


def test_damaged_checkpoints_passed_over_do_not_outlive_the_intact_ones(trained):
    """keep_checkpoints=1 after resuming past a damaged step-4 with saves at step 3: the new
    checkpoint is the one kept, not the damaged, newer-numbered one."""
    overrides, out, _ = trained
    _damage(out / "checkpoints" / "step-00000004" / "optimizer.pt", "truncate")
    more = ["train.resume=true", "train.save_every=3", "train.keep_checkpoints=1"]
    Trainer(load_config(None, [*overrides, *more])).run()
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000003"]
    assert CheckpointManager(out).latest().name == "step-00000003"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("row", "damaged"), [("fsdp", "dcp/__1_0.distcp"), ("zero2", "deepspeed-rank00001.pt")]
)
def test_damaged_sharded_checkpoint_at_two_ranks(row, damaged, tiny_bert, glue_dir, tmp_path):
    """The reported case: one rank's file of the newest FSDP2 / ZeRO-2 checkpoint truncated.
    Every rank agrees to resume from step 2 and the run ends at the uninterrupted weights."""
    overrides = tiny_overrides(tiny_bert, glue_dir, tmp_path) + ROWS[row] + ["method.name=ct-f"]
    complete, resumed = run_world(damage_then_resume, 2, overrides, damaged)[0]
    assert resumed["steps"] == [2, 3]
    event = _resumed_event(tmp_path)
    assert event["from"].endswith("step-00000002") and damaged in event["skipped"]["step-00000004"]
    for name, want in complete["state"].items():
        assert torch.equal(resumed["state"][name], want), f"{row}: {name} differs from the uninterrupted run"
