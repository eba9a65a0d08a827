"""ChildTuningCallback in real ``transformers.Trainer`` runs on CPU: tiny BERT, 32 RTE examples.

One process runs in this process (the example script's ``main``); the 2-process runs launch
``examples/hf_trainer_glue.py`` with the shipped accelerate configs and torchrun, exactly as
their headers say, and must reach the 1-process weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from ctscale.errors import ConfigError, CtscaleError, MaskError
from ctscale.hf import ChildTuningCallback
from ctscale.methods.counter_rng import bernoulli_mask
from ctscale.storage import mask_file

from dist_harness import free_port

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "hf_trainer_glue.py"
ACCEL = REPO / "launch" / "accelerate"
P = 0.3
TOL = 5e-6  # 2 processes vs 1: reduction-order rounding only


def _example():
    spec = importlib.util.spec_from_file_location("hf_trainer_glue", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def example_args(tiny_bert: Path, glue_dir: Path, out: Path, *extra: str) -> list[str]:
    """4 AdamW steps at lr 1e-3 over global batches of 8, weight decay 0."""
    return [
        *("--model", str(tiny_bert), "--data-dir", str(glue_dir), "--output-dir", str(out)),
        *("--max-train-samples", "32", "--batch-size", "8", "--max-steps", "4"),
        *("--lr", "1e-3", "--weight-decay", "0", "--reserve-p", str(P)),
        *extra,
    ]


CTD = ("--method", "ct-d", "--fisher-batches", "2")  # Fisher pass in the callback
CTF = ("--method", "ct-f", "--max-grad-norm", "0")  # every engine's order is the same update


@pytest.fixture(scope="module")
def one_process(tiny_bert, glue_dir, tmp_path_factory) -> dict[str, Path]:
    """1-process runs of the example script (in this process): the reference of every test."""
    example, runs = _example(), {}
    for name, extra in {"ct-d": CTD, "ct-f": CTF}.items():
        runs[name] = tmp_path_factory.mktemp(f"one-{name}")
        example.main(example_args(tiny_bert, glue_dir, runs[name], *extra))
    return runs


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def full_mask(path: Path) -> dict[str, torch.Tensor]:
    info = mask_file.read_info(path)
    wanted = [(n, s, 0, torch.Size(s).numel()) for n, s in info.shapes.items()]
    return {n: bits.view(info.shapes[n]) for (n, _), bits in mask_file.load_mask(path, wanted).items()}


# -- (a) CT-D: non-child entries never move ---------------------------------------------------
def test_ctd_trains_exactly_the_child_network(one_process, tiny_bert):
    run = one_process["ct-d"]
    info = mask_file.read_info(run / "mask.safetensors")
    assert info.metadata["fisher_batches"] == 2 and info.metadata["reserve_p"] == P
    assert info.total_selected == round(P * info.total_entries)  # exact global top-p
    assert all(".layer." in n for n in info.shapes) and len(info.shapes) == 32  # 2 BERT layers
    start, end, mask = (
        load_file(tiny_bert / "model.safetensors"),
        weights(run),
        full_mask(run / "mask.safetensors"),
    )
    for name, keep in mask.items():
        assert torch.equal(end[name][~keep], start[name][~keep]), name  # bit-identical (wd 0)
    child = torch.cat([(end[n] != start[n])[k] for n, k in mask.items()]).float().mean().item()
    assert child > 0.99  # child entries did train
    assert not torch.equal(end["classifier.weight"], start["classifier.weight"])  # non-candidates train


def test_ctd_fisher_pass_runs_without_dropout(tiny_bert, glue_dir, tmp_path):
    """``fisher_dropout=False`` (the default): the same weights with dropout 0.1 choose the same
    child network as with dropout 0 (with dropout on, the draws would change the Fisher)."""
    dropped = tmp_path / "dropout"
    shutil.copytree(tiny_bert, dropped)
    config = json.loads((dropped / "config.json").read_text())
    config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    (dropped / "config.json").write_text(json.dumps(config))
    example, masks = _example(), []
    for model in (tiny_bert, dropped):
        out = tmp_path / f"run-{model.name}"
        example.main(example_args(model, glue_dir, out, *CTD, "--max-steps", "1"))
        masks.append(full_mask(out / "mask.safetensors"))
    assert masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


def test_callback_logs_its_fisher_pass_and_mask(tiny_bert, glue_dir, tmp_path, capsys):
    """The Fisher pass (batches, seconds) and the mask's selected/total reach the console (rank
    0) and the Trainer's log history (merged into its first record)."""
    out = tmp_path / "run"
    _example().main(example_args(tiny_bert, glue_dir, out, *CTD, "--max-steps", "1"))
    line = [s for s in capsys.readouterr().out.splitlines() if s.startswith("child-tuning:")]
    assert len(line) == 1 and "ct-d, 5,126 of 17,088 candidate entries" in line[0]
    assert "fisher pass: 2 batches in" in line[0]
    first = json.loads((out / "trainer_state.json").read_text())["log_history"][0]
    info = mask_file.read_info(out / "mask.safetensors")
    assert first["child_tuning/selected"] == info.total_selected == 5126
    assert first["child_tuning/total"] == info.total_entries == 17088
    assert first["child_tuning/reserve_p"] == P and first["child_tuning/fisher_batches"] == 2
    assert first["child_tuning/fisher_seconds"] > 0 and "loss" in first  # the first training record


# -- (b) CT-F: the first update is ctscale's mask, applied after the Trainer's clipping --------
class Grabber(TrainerCallback):
    """Copies of the gradients at ``on_pre_optimizer_step`` (before or after the mask)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}


class GrabAfter(Grabber):
    """A second class: the Trainer keeps one callback per class."""


def test_ctf_first_step_is_clip_then_ctscale_mask_then_adamw(tiny_bert, glue_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    example = _example()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    clip, lr, wd, seed = 1e-3, 1e-3, 0.01, 7
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=lr,
        weight_decay=wd,
        max_grad_norm=clip,
        seed=seed,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    data = example.glue_dataset("rte", "train", str(glue_dir), tok, 128, 32)
    before, after = Grabber(), GrabAfter()
    callback = ChildTuningCallback("ct-f", reserve_p=P)
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=example.DataCollatorWithPadding(tok)
    )
    for cb in (before, callback, after):  # run in this order at on_pre_optimizer_step
        trainer.add_callback(cb)
    trainer.train()
    assert callback.masked_steps == 1
    # clip, then mask: the gradient the mask sees has the clipped norm
    logged_norm = trainer.state.log_history[0]["grad_norm"]
    seen_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in before.grads.values()])).item()
    assert logged_norm > 2 * clip  # torch's clip_grad_norm_ scales by max / (norm + 1e-6)
    assert seen_norm == pytest.approx(clip * logged_norm / (logged_norm + 1e-6), rel=1e-5)
    kept = total = 0
    for name, g in before.grads.items():
        keep = bernoulli_mask(seed, 0, name, 0, g.numel(), P).view(g.shape)  # ctscale's CT-F draw
        assert torch.equal(after.grads[name], g.masked_fill(~keep, 0).mul(1.0 / P)), name
        kept, total = kept + int(keep.sum()), total + keep.numel()
    assert abs(kept / total - P) < 0.01
    # the update is AdamW (Trainer's groups, lr at step 0) on exactly those masked gradients
    decay = set(trainer.get_decay_parameter_names(model))
    ref = {n: t.clone().requires_grad_(True) for n, t in start.items()}
    groups = [
        {"params": [ref[n] for n in ref if n in decay], "weight_decay": wd},
        {"params": [ref[n] for n in ref if n not in decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, eps=1e-8)
    for n, t in ref.items():
        t.grad = after.grads[n]
    opt.step()
    final = dict(model.named_parameters())
    diff = max((final[n].detach() - ref[n].detach()).abs().max().item() for n in ref)
    assert diff <= 1e-7
    bias = "bert.encoder.layer.0.attention.self.query.bias"  # no decay: masked entries stay put
    frozen = after.grads[bias] == 0
    assert frozen.any() and torch.equal(final[bias].detach()[frozen], start[bias][frozen])


def test_ctd_resume_keeps_the_child_network(tiny_bert, glue_dir, tmp_path):
    """A run resumed from its step-2 checkpoint reloads its mask (no new Fisher pass on trained
    weights) and ends where the uninterrupted run ends."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    example = _example()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    data = example.glue_dataset("rte", "train", str(glue_dir), tok, 128, 32)

    def train(out: Path, resume: str | None = None) -> dict[str, torch.Tensor]:
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
        model.accepts_loss_kwargs = False
        args = TrainingArguments(
            output_dir=str(out),
            per_device_train_batch_size=8,
            max_steps=4,
            learning_rate=1e-3,
            weight_decay=0.0,
            save_strategy="steps",
            save_steps=2,
            use_cpu=True,
            report_to="none",
            disable_tqdm=True,
        )
        callback = ChildTuningCallback("ct-d", reserve_p=P, fisher_batches=2)
        collate = example.DataCollatorWithPadding(tok)
        trainer = Trainer(
            model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[callback]
        )
        trainer.train(resume_from_checkpoint=resume)
        assert callback.masked_steps == (2 if resume else 4)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    whole = train(tmp_path / "whole")
    mask = tmp_path / "whole" / "mask.safetensors"
    written = mask.stat().st_mtime_ns
    resumed = train(tmp_path / "whole", resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert mask.stat().st_mtime_ns == written  # loaded, not re-estimated
    assert max_diff(resumed, whole) <= 1e-6


# -- errors, never a silent no-op -------------------------------------------------------------
def _begin(callback: ChildTuningCallback, model, out: Path, global_step: int = 0) -> None:
    args = SimpleNamespace(seed=0, output_dir=str(out), gradient_accumulation_steps=1)
    state = SimpleNamespace(global_step=global_step)
    callback.on_train_begin(args, state, None, model=model, optimizer=None, train_dataloader=[])


def test_bad_options_and_masks_are_clear_errors(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(ConfigError, match="method='ct-x'"):
        ChildTuningCallback("ct-x")
    with pytest.raises(ConfigError, match=r"reserve_p=0 must be in \(0, 1\]"):
        ChildTuningCallback("ct-f", reserve_p=0)
    with pytest.raises(ConfigError, match="CT-D options"):
        ChildTuningCallback("ct-f", mask_file="m.safetensors")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    with pytest.raises(MaskError, match="no parameter matches fisher.candidates"):
        _begin(ChildTuningCallback("ct-d", candidates=["no_such_module"]), model, tmp_path)
    other = tmp_path / "other.safetensors"  # a mask of another model
    bits = torch.ones(4, dtype=torch.bool)
    mask_file.save_mask(other, [mask_file.MaskPiece("decoder.w", (4,), 0, 4, bits)], {"method": "ct-d"})
    with pytest.raises(MaskError, match="decoder.w"):
        _begin(ChildTuningCallback("ct-d", mask_file=other), model, tmp_path)
    with pytest.raises(MaskError, match="resuming at step 3"):
        _begin(ChildTuningCallback("ct-d"), model, tmp_path / "fresh", global_step=3)
    from torch.distributed.fsdp import FullyShardedDataParallel

    fsdp1 = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(fsdp1)  # an (empty) FSDP1 wrapper: only its type matters here
    with pytest.raises(ConfigError, match="not FSDP1"):
        _begin(ChildTuningCallback("ct-f"), torch.nn.Sequential(fsdp1, torch.nn.Linear(2, 2)), tmp_path)
    callback = ChildTuningCallback("ct-f")
    _begin(callback, model, tmp_path)
    with pytest.raises(CtscaleError, match="ran without a mask"):  # the update bypassed the hook
        callback.on_step_end(None, SimpleNamespace(global_step=1), None)


def test_ctd_under_deepspeed_needs_a_mask_file(tmp_path):
    callback = ChildTuningCallback("ct-d")
    args = SimpleNamespace(seed=0, output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="CT-D under DeepSpeed needs mask_file"):
        callback._build_strategy(args, SimpleNamespace(global_step=0), None, None, deepspeed=True)


def test_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp, fsdp = (
        load_config_from_file(str(ACCEL / "ddp.yaml")),
        load_config_from_file(str(ACCEL / "fsdp2.yaml")),
    )
    assert (ddp.distributed_type, ddp.num_processes) == ("MULTI_GPU", 2)
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    for name, stage in (("zero2", 2), ("zero3", 3), ("zero2_offload", 2), ("zero3_offload", 3)):
        cfg = load_config_from_file(str(ACCEL / f"deepspeed_{name}.yaml"))
        assert cfg.distributed_type == "DEEPSPEED"
        ds = REPO / cfg.deepspeed_config["deepspeed_config_file"]
        assert store_json(ds)["zero_optimization"]["stage"] == stage
    for path in ACCEL.glob("*.yaml"):  # each header carries its exact command
        assert f"accelerate launch --config_file launch/accelerate/{path.name}" in path.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_offload_clips_by_the_masked_norm(stage, tiny_bert, glue_dir, tmp_path):
    """Under optimizer offload DeepSpeed takes the gradient norms before the mask; the callback
    replaces them, so the norm DeepSpeed clips by (the Trainer's logged grad_norm) is the masked
    one, as without offload. Without the replacement, CT-F's would be smaller by ~sqrt(p)."""
    ctf_clipped = ("--method", "ct-f", "--max-grad-norm", "1e-3")  # below every step's norm
    norms = {}
    for name in (stage, f"{stage}_offload"):
        out = tmp_path / name
        launch(accelerate(f"deepspeed_{name}.yaml", example_args(tiny_bert, glue_dir, out, *ctf_clipped)))
        history = store_json(out / "trainer_state.json")["log_history"]
        norms[name] = [h["grad_norm"] for h in history if "grad_norm" in h]
    assert len(norms[stage]) == 4 and min(norms[stage]) > 1e-3  # clipping acted every step
    assert norms[f"{stage}_offload"] == pytest.approx(norms[stage], rel=1e-5)


def store_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


# -- (c) 2 processes == 1 process -------------------------------------------------------------
def launch(cmd: list[str], timeout: int = 400) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def accelerate(config: str, args: list[str]) -> list[str]:
    port = str(free_port())
    return [
        "accelerate",
        "launch",
        "--config_file",
        str(ACCEL / config),
        "--main_process_port",
        port,
        str(EXAMPLE),
        *args,
    ]


def torchrun(args: list[str]) -> list[str]:
    port = str(free_port())
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        port,
        str(EXAMPLE),
        *args,
    ]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,how,extra",
    [
        ("ddp-ctd", "ddp.yaml", CTD),  # Fisher pass under DDP; clip, then mask
        # Fisher pass on DTensor shards; 2 micro-batches per rank per step
        ("fsdp2-ctd", "torchrun-fsdp2", (*CTD, "--fsdp-size", "2", "--grad-accum", "2")),
        ("zero2-ctd-file", "deepspeed_zero2.yaml", ("--method", "ct-d", "--mask-file", "ONE")),
        ("zero3-ctf", "deepspeed_zero3.yaml", (*CTF, "--grad-accum", "2")),  # inside ZeRO-3's step
    ],
)
def test_two_processes_match_one(name, how, extra, one_process, tiny_bert, glue_dir, tmp_path):
    ref = one_process["ct-f" if "ctf" in name else "ct-d"]
    extra = [str(ref / "mask.safetensors") if e == "ONE" else e for e in extra]
    args = example_args(tiny_bert, glue_dir, tmp_path, *extra)
    launch(torchrun(args) if how.startswith("torchrun") else accelerate(how, args))
    diff = max_diff(weights(tmp_path), weights(ref))
    print(f"{name}: max |2-process - 1-process| = {diff:.3g}")
    assert diff <= TOL, f"{name}: max |2-process - 1-process| = {diff:.3g}"
    if "--fisher-batches" in extra:  # the same child network, chosen from sharded Fishers
        two, one = full_mask(tmp_path / "mask"), full_mask(ref / "mask.safetensors")
        assert all(torch.equal(two[n], one[n]) for n in one) and two.keys() == one.keys()
        # where the gradients lived: DDP replicas (rank 0 writes every piece, rank 1 none) or
        # FSDP2 row shards (rank 1 holds the tail of each tensor)
        files = store_json(tmp_path / "mask" / "mask.index.json")["files"]
        rank1 = files[1]["pieces"]
        assert len(files) == 2 and (
            all(p["start"] > 0 for p in rank1) and rank1 if "fsdp" in name else not rank1
        )
