"""CT-D on a PEFT/LoRA model through ChildTuningCallback (issue 17 item 3), and the warning for
candidate tensors whose Fisher is all zero, in any model.

LoRA starts lora_B at zero, so lora_A's gradient (and Fisher) is exactly zero at the Fisher
pass: a top-p over A and B would freeze every A entry. The callback selects within lora_B only
and trains lora_A fully; candidates that name lora_A are refused with that reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ctscale.errors import ConfigError, MaskError
from ctscale.hf import ChildTuningCallback
from ctscale.methods.base import GradView
from ctscale.methods.ct_d.fisher import FisherAccumulator
from ctscale.methods.ct_d.pipeline import save_child_network
from ctscale.storage import mask_file

from conftest import tiny_decoder_config

P = 0.3


def lora_llama() -> torch.nn.Module:
    """A 2-layer, hidden-32 Llama with rank-2 LoRA adapters on q_proj and v_proj (PEFT)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_decoder_config("llama", vocab_size=64))
    lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return get_peft_model(model, lora)


def token_rows(n: int = 16, length: int = 8) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 64, (length,), generator=gen)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_ctd_on_lora_selects_within_lora_b_and_trains_lora_a(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    model = lora_llama()
    before = state(model)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    callback = ChildTuningCallback("ct-d", reserve_p=P, fisher_batches=2)
    Trainer(model=model, args=args, train_dataset=token_rows(), callbacks=[callback]).train()
    assert callback.masked_steps == 3

    info = mask_file.read_info(tmp_path / "mask.safetensors")
    lora_b = sorted(n for n in before if ".lora_B." in n)
    assert sorted(info.shapes) == lora_b  # lora_A is not a candidate (on main: density 0 here)
    total = sum(before[n].numel() for n in lora_b)
    assert info.total_selected == round(P * total)
    assert info.metadata["scope"]["candidates"] == [r"\.lora_(B|embedding_B)\."]

    after = state(model)
    wanted = [(n, s, 0, torch.Size(s).numel()) for n, s in info.shapes.items()]
    mask = {
        n: bits.view(info.shapes[n])
        for (n, _), bits in mask_file.load_mask(tmp_path / "mask.safetensors", wanted).items()
    }
    child_moved = []
    for name in lora_b:  # weight decay 0: non-child entries of B never move, child entries do
        moved = after[name] != before[name]
        assert not moved[~mask[name]].any(), name
        child_moved.append(moved[mask[name]])
    assert torch.cat(child_moved).float().mean() > 0.9
    # A is not masked: each row of A moves once the matching column of B holds a child entry
    # (A's gradient is B^T times the output gradient; a B column outside the child stays 0)
    trained = 0
    for name in (n for n in before if ".lora_A." in n):
        live_rows = mask[name.replace(".lora_A.", ".lora_B.")].any(dim=0)
        moved = after[name] != before[name]
        assert moved[live_rows].all(dim=1).all() and not moved[~live_rows].any(), name
        trained += int(live_rows.sum())
    assert trained >= 2
    for name in (n for n in before if "lora_" not in n):  # the base model is frozen
        assert torch.equal(after[name], before[name]), name


def test_ctd_candidates_naming_lora_a_are_refused_with_the_reason(tmp_path: Path) -> None:
    model = lora_llama()
    callback = ChildTuningCallback("ct-d", candidates=["layers"])
    args = SimpleNamespace(seed=0, output_dir=str(tmp_path), gradient_accumulation_steps=1)
    with pytest.raises(
        ConfigError, match=r"lora_A\.default\.weight.*starts lora_B at zero.*freeze every lora_A"
    ):
        callback.on_train_begin(args, SimpleNamespace(global_step=0), None, model=model, train_dataloader=[])
    assert not (tmp_path / "mask.safetensors").exists()


def test_all_zero_fisher_tensors_are_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Any model: a candidate whose gradient was zero in every batch can only be frozen."""
    shapes = {"layer.0.w": (4,), "layer.0.dead": (3,), "layer.1.unused": (2,)}
    fisher = FisherAccumulator(shapes)
    grads = {"layer.0.w": torch.tensor([1.0, -2.0, 0.5, 0.0]), "layer.0.dead": torch.zeros(3)}
    for _ in range(2):  # "layer.1.unused" never gets a gradient (no view at all)
        fisher.add(GradView(n, shapes[n], 0, g.numel(), g.clone()) for n, g in grads.items())
    with caplog.at_level(logging.WARNING, logger="ctscale.methods.ct_d.fisher"):
        save_child_network(tmp_path / "m.safetensors", fisher, 0.5, shapes, {"task": "t"})
    (record,) = [r for r in caplog.records if "all-zero Fisher" in r.getMessage()]
    message = record.getMessage()
    assert "2 of 3 candidate tensors" in message
    assert "layer.0.dead, layer.1.unused" in message
    assert "layer.0.w" not in message


def test_a_mask_that_freezes_lora_a_is_refused(tmp_path: Path) -> None:
    """A mask made by a top-p over A and B (as before issue 17) keeps no entry of lora_A."""
    model = lora_llama()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n}
    pieces = []
    for name, shape in shapes.items():
        bits = torch.full((torch.Size(shape).numel(),), ".lora_B." in name, dtype=torch.bool)
        pieces.append(mask_file.MaskPiece(name, shape, 0, bits.numel(), bits))
    path = tmp_path / "old.safetensors"
    mask_file.save_mask(path, pieces, {"method": "ct-d"})
    callback = ChildTuningCallback("ct-d", mask_file=path)
    args = SimpleNamespace(seed=0, output_dir=str(tmp_path), gradient_accumulation_steps=1)
    with pytest.raises(MaskError, match=r"keeps no entry of the LoRA tensor .*lora_A.*and 3 more"):
        callback.on_train_begin(args, SimpleNamespace(global_step=0), None, model=model, train_dataloader=[])
