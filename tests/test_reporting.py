"""Visible training: the console line of a log step, evaluation every N steps, the trackers of
``train.report_to`` (TensorBoard, W&B offline, MLflow's local file store) and the HF callback's
Child-Tuning summary in the Trainer's logs. One process, tiny BERT, offline."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

from ctscale.config import load_config
from ctscale.errors import ConfigError
from ctscale.trainer import Trainer

from dist_workers import tiny_overrides

LINE = re.compile(
    r"^step (\d+)/4 \| loss (\d+\.\d{4}) \| grad_norm (\d+\.\d{3}) \| lr (\S+) \| (\d+\.\d) samples/s$"
)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _run(tiny_bert, glue_dir, run: Path, *extra: str) -> Trainer:
    cfg = load_config(None, tiny_overrides(tiny_bert, glue_dir, run) + ["train.save_every=0", *extra])
    trainer = Trainer(cfg)
    trainer.run()
    return trainer


def test_log_steps_print_loss_grad_norm_lr_and_throughput(tiny_bert, glue_dir, tmp_path, capsys):
    run = tmp_path / "run"
    _run(tiny_bert, glue_dir, run, "method.name=ct-d", "train.log_every=2", "train.report_to=[]")
    out = capsys.readouterr().out.splitlines()
    lines = [m for m in map(LINE.match, out) if m]
    assert [int(m[1]) for m in lines] == [2, 4]
    train = [r for r in _records(run) if r["event"] == "train"]
    for m, r in zip(lines, train, strict=True):
        # the printed loss is the logged global-batch mean; the norm is the pre-clip norm
        assert float(m[2]) == pytest.approx(r["loss"], abs=5e-5)
        assert float(m[3]) == pytest.approx(r["grad_norm"], abs=5e-4)
        assert r["grad_norm"] > 0.1  # above train.max_grad_norm: it is the norm before clipping
        assert float(m[4]) == pytest.approx(r["lr"], rel=1e-2)
        assert float(m[5]) > 0 and r["samples_per_s"] > 0
    # the CT-D mask and its Fisher pass get one line before training
    mask = [line for line in out if line.startswith("mask: ct-d")]
    assert len(mask) == 1 and "5,126 of 17,088 candidate entries" in mask[0]
    assert "fisher pass: 2 batches in" in mask[0]
    (ready,) = [r for r in _records(run) if r["event"] == "mask_ready"]
    assert (ready["mask_selected"], ready["mask_entries"]) == (5126, 17088)
    assert any(line.startswith("eval step 4/4 | validation/accuracy=") for line in out)
    assert not (run / "tensorboard").exists()  # report_to=[]: no tracker


def test_grad_norm_is_the_norm_clipping_saw(tiny_bert, glue_dir, tmp_path):
    """The local backend's reported norm is the global L2 norm of the (masked) gradients before
    clipping, the value clip_grad_norm_ returned, not a recomputation after it."""
    from ctscale.backends.local import LocalBackend

    model = torch.nn.Linear(3, 2)
    backend = LocalBackend(grad_accum=1, max_grad_norm=0.5)
    backend.setup(
        model,
        lambda named: torch.optim.SGD([p for _, p in named], lr=0.0),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
    )
    assert backend.grad_norm() is None  # before the first step
    model(torch.ones(4, 3)).pow(2).sum().mul(10).backward()
    expected = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    backend.step()
    assert backend.grad_norm() == pytest.approx(expected, rel=1e-6) and expected > 0.5
    off = LocalBackend(grad_accum=1, max_grad_norm=0.0)  # clipping off: not computed, not shown
    off.setup(model, lambda named: torch.optim.SGD([p for _, p in named], lr=0.0), lambda o: None)
    assert off.grad_norm() is None


def test_eval_every_n_steps(tiny_bert, glue_dir, tmp_path):
    run = tmp_path / "run"
    _run(tiny_bert, glue_dir, run, "train.eval_every=2", "train.log_every=1", "train.report_to=[]")
    assert [r["step"] for r in _records(run) if r["event"] == "eval"] == [2, 4]
    # with eval_every_epoch too: steps 2, 3 (end of the 3-step epoch) and 4, each once
    run = tmp_path / "both"
    _run(tiny_bert, glue_dir, run, "train.eval_every=2", "train.eval_every_epoch=true", "train.report_to=[]")
    assert [r["step"] for r in _records(run) if r["event"] == "eval"] == [2, 3, 4]


def test_report_to_config_errors():
    with pytest.raises(ConfigError, match=r"unknown tracker 'wandbb'.*did you mean 'wandb'"):
        load_config(None, ["train.report_to=[wandbb]"])
    with pytest.raises(ConfigError, match="lists a tracker twice"):
        load_config(None, ["train.report_to=[mlflow, mlflow]"])
    with pytest.raises(ConfigError, match="train.eval_every must be >= 0"):
        load_config(None, ["train.eval_every=-1"])
    assert load_config(None).train.report_to == ["tensorboard"]


def test_a_missing_tracker_package_fails_before_the_model_loads(tiny_bert, glue_dir, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    cfg = load_config(
        None, tiny_overrides(tiny_bert, glue_dir, tmp_path / "run") + ["train.report_to=[wandb]"]
    )
    trainer = Trainer(cfg)
    monkeypatch.setattr(trainer, "step_profiler", lambda: pytest.fail("got past the tracker check"))
    with pytest.raises(
        ConfigError, match=r'wandb package is not installed; run `pip install "ctscale\[wandb\]"`'
    ):
        trainer.prepare()


def test_tensorboard_false_still_turns_tensorboard_off(tiny_bert, glue_dir, tmp_path):
    """The older switch keeps working: ``train.tensorboard=false`` drops it from report_to."""
    cfg = load_config(None, tiny_overrides(tiny_bert, glue_dir, tmp_path) + ["train.tensorboard=false"])
    assert Trainer(cfg).report_to == []


@pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None or importlib.util.find_spec("mlflow") is None,
    reason='needs the wandb and mlflow extras: pip install "ctscale[wandb,mlflow]"',
)
def test_report_to_wandb_offline_and_mlflow_file_store(tiny_bert, glue_dir, tmp_path, monkeypatch):
    for var in (
        "WANDB_MODE",
        "WANDB_PROJECT",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_ALLOW_FILE_STORE",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    _run(tiny_bert, glue_dir, run, "train.log_every=2", "train.report_to=[tensorboard, wandb, mlflow]")
    train = [r for r in _records(run) if r["event"] == "train"]
    evals = [r for r in _records(run) if r["event"] == "eval"]
    # W&B: an offline run in the run directory. Its transaction log (protobuf records, values as
    # JSON text; a few KiB, one 32 KiB block, so no record is split) holds every logged value
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    (log,) = wandb_run.glob("run-*.wandb")
    payload = log.read_bytes()
    assert payload.startswith(b":W&B")
    for r in train:
        for key in ("loss", "grad_norm", "lr", "samples_per_s"):
            assert f"train/{key}".encode() in payload and json.dumps(r[key]).encode() in payload, key
    assert json.dumps(evals[-1]["validation/accuracy"]).encode() in payload
    # MLflow: the local file store under the run directory, every logged step
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"file:{run / 'mlruns'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("ctscale").experiment_id])
    history = client.get_metric_history(mlrun.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in train]
    assert {"train/grad_norm", "train/lr", "train/samples_per_s", "validation/accuracy"} <= set(
        mlrun.data.metrics
    )
    assert mlrun.data.params["method.name"] == "vanilla" and mlrun.info.status == "FINISHED"
    assert (run / "tensorboard").is_dir()


def test_scalars_names():
    from ctscale import reporting

    record = {"time": 1.0, "event": "eval", "step": 3, "validation/accuracy": 0.5, "note": "x"}
    assert reporting.scalars(record) == {"validation/accuracy": 0.5}
    assert reporting.scalars({"event": "train", "step": 2, "loss": 1, "flag": True}) == {"train/loss": 1.0}
