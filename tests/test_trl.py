"""ChildTuningCallback inside TRL's SFTTrainer: a tiny Llama with SmolLM2's tokenizer (and chat
template) on `messages` conversations, a few steps of CT-D and CT-F, with the child-network
invariants of tests/test_hf.py (non-child entries bit-identical at weight decay 0; CT-F's masked
gradient equal to ctscale's counter-hash mask)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from test_causal_lm import write_tiny_decoder
from test_chat import chat_records
from test_hf import GrabAfter, Grabber, full_mask
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from ctscale.hf import ChildTuningCallback
from ctscale.methods.counter_rng import bernoulli_mask

P = 0.3


def sft(model_dir: Path, out: Path, callbacks: list, max_grad_norm: float = 1.0, seed: int = 0):
    """An SFTTrainer over 16 conversations: global batch 4, AdamW at lr 1e-3, weight decay 0."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        weight_decay=0.0,
        warmup_steps=0,
        max_grad_norm=max_grad_norm,
        max_length=96,
        seed=seed,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    data = Dataset.from_list(chat_records(16))
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tok, callbacks=callbacks
    )
    return trainer, model


@pytest.fixture(scope="module")
def decoder(smol_tokenizer, tmp_path_factory) -> Path:
    return write_tiny_decoder(tmp_path_factory.mktemp("llama"), smol_tokenizer, "llama")


def test_ctd_in_sft_trainer_trains_exactly_the_child_network(decoder, tmp_path):
    callback = ChildTuningCallback("ct-d", reserve_p=P, fisher_batches=2)
    trainer, model = sft(decoder, tmp_path, [callback])
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert callback.masked_steps == 3
    mask = full_mask(tmp_path / "mask.safetensors")
    assert mask and all(n.startswith("model.layers.") for n in mask)
    end = dict(model.named_parameters())
    moved = 0
    for name, keep in mask.items():
        assert torch.equal(end[name].detach()[~keep], start[name][~keep]), name  # bit-identical
        moved += int((end[name].detach() != start[name])[keep].sum())
    assert moved > 0.9 * sum(int(k.sum()) for k in mask.values())  # the child did train
    assert not torch.equal(end["model.norm.weight"].detach(), start["model.norm.weight"])  # non-candidate


def test_ctf_in_sft_trainer_masks_with_the_counter_hash(decoder, tmp_path):
    before, after = Grabber(), GrabAfter()
    callback = ChildTuningCallback("ct-f", reserve_p=P)
    trainer, _ = sft(decoder, tmp_path, [], max_grad_norm=0.0, seed=5)
    for cb in (before, callback, after):  # in this order at on_pre_optimizer_step
        trainer.add_callback(cb)
    trainer.train()
    assert callback.masked_steps == 3
    kept = total = 0
    step = 2  # the grabbers hold the last step's gradients
    for name, g in before.grads.items():
        keep = bernoulli_mask(5, step, name, 0, g.numel(), P).view(g.shape)
        assert torch.equal(after.grads[name], g.masked_fill(~keep, 0).mul(1.0 / P)), name
        kept, total = kept + int(keep.sum()), total + keep.numel()
    assert abs(kept / total - P) < 0.01
