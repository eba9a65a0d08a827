"""Writers killed half way leave nothing that loads as valid, and the old files intact:
checkpoints (``latest`` moves only after a complete write) and the exported model."""

from __future__ import annotations

import logging
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from ctscale.config import load_config
from ctscale.storage.checkpoint import CheckpointManager
from ctscale.trainer import Trainer

from dist_workers import tiny_overrides


class Killed(Exception):
    pass


@pytest.fixture
def trained(tiny_bert, glue_dir, tmp_path):
    cfg = load_config(
        None, tiny_overrides(tiny_bert, glue_dir, tmp_path) + ["method.name=ct-f", "train.save_model=true"]
    )
    trainer = Trainer(cfg)
    trainer.run()  # checkpoints at steps 2 and 4, model exported
    return trainer, tmp_path


def test_checkpoint_writer_killed_half_way_leaves_latest_on_the_complete_one(trained, monkeypatch):
    trainer, out = trained
    manager = CheckpointManager(out, keep=2)
    assert manager.latest().name == "step-00000004"
    real_save = trainer.backend.save_checkpoint

    def dies_half_way(path):
        real_save(path)
        (path / "model.safetensors").write_bytes(b"partial")  # a torn write
        raise Killed

    monkeypatch.setattr(trainer.backend, "save_checkpoint", dies_half_way)
    with pytest.raises(Killed):
        manager.save(trainer.backend, 6, {"model_fingerprint": trainer.fingerprint})
    assert manager.latest().name == "step-00000004"
    assert not (out / "checkpoints" / "step-00000006").exists()
    monkeypatch.undo()
    # the next save cleans the torn temporary directory and completes
    manager.save(trainer.backend, 6, {"model_fingerprint": trainer.fingerprint})
    assert manager.latest().name == "step-00000006"
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000006"]


def test_model_export_killed_half_way_keeps_the_previous_model(trained, monkeypatch):
    trainer, out = trained
    before = load_file(out / "model" / "model.safetensors")
    model = trainer.backend.unwrapped_model()
    real = model.save_pretrained

    def dies_half_way(path, **kwargs):
        real(path, **kwargs)
        raise Killed

    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # the new export would differ
    monkeypatch.setattr(model, "save_pretrained", dies_half_way)
    with pytest.raises(Killed):
        trainer.save_model()
    after = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_latest_pointing_to_a_missing_checkpoint_falls_back_in_one_line(trained, caplog):
    _, out = trained
    (out / "checkpoints" / "latest").write_text("step-00000099")
    caplog.set_level(logging.WARNING, logger="ctscale.storage.checkpoint")
    assert CheckpointManager(out).latest().name == "step-00000004"
    reports = [r.getMessage() for r in caplog.records if r.name == "ctscale.storage.checkpoint"]
    assert len(reports) == 1 and "step-00000099" in reports[0] and "missing" in reports[0], reports


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_every_written_file_takes_the_umask_mode(tmp_path, umask):
    """Masks, configs, predictions and plots are as readable as any file the user's umask makes
    (a group on a shared cluster filesystem), not 0600 as a bare temporary file would be."""
    from ctscale.config import Config
    from ctscale.storage import atomic
    from ctscale.storage.config_snapshot import save_config
    from ctscale.storage.mask_file import MaskPiece, save_mask

    old = os.umask(umask)
    try:
        save_config(Config(), tmp_path / "config.yaml")
        bits = torch.tensor([True, False, True, True])
        save_mask(tmp_path / "mask.safetensors", [MaskPiece("w", (4,), 0, 4, bits)], {"method": "ct-d"})
        save_mask(tmp_path / "mask", [MaskPiece("w", (4,), 0, 4, bits)], {"method": "ct-d"})
        atomic.write_text(tmp_path / "note.txt", "x")
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 5  # config, single-file mask, shard + index, note
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_a_failed_atomic_write_keeps_the_old_content_and_leaves_no_temporary_file(tmp_path):
    from ctscale.storage import atomic

    target = tmp_path / "f.txt"
    atomic.write_text(target, "old")
    with pytest.raises(Killed), atomic.replacing(target) as tmp:
        tmp.write_text("half")
        raise Killed
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
