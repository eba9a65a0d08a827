"""Chat data (``data.task: chat``): SmolLM2's real chat template, loss on every assistant turn
(content + end-of-turn token, nothing else), TRL's prompt-completion form, truncation, bad rows."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from test_causal_lm import write_tiny_decoder
from transformers import AutoTokenizer

from ctscale.config import load_config
from ctscale.errors import DataError
from ctscale.tasks.causal_lm import IGNORE
from ctscale.tasks.chat import Conversation, encode_chat, encode_conversation, load_chat
from ctscale.trainer import Trainer

MULTI = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": "And 4 plus 4?"},
    {"role": "assistant", "content": "4 plus 4 is 8."},
]


def chat_records(n: int, offset: int = 0) -> list[dict]:
    """Single- and multi-turn conversations, some with a system turn, some prompt/completion."""
    out = []
    for i in range(offset, offset + n):
        a, b = i % 7 + 1, (3 * i) % 11 + 2
        turn = [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]
        if i % 3 == 0:
            out.append({"messages": [{"role": "system", "content": "Be brief."}, *turn]})
        elif i % 3 == 1:
            out.append(
                {
                    "messages": turn
                    + [
                        {"role": "user", "content": "Twice?"},
                        {"role": "assistant", "content": f"{2 * (a + b)}."},
                    ]
                }
            )
        else:
            out.append({"messages": turn})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tok(smol_tokenizer):
    return AutoTokenizer.from_pretrained(smol_tokenizer)


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive labelled positions, as token ids."""
    runs, current = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert lab == i
            current.append(i)
    return runs + ([current] if current else [])


def test_labels_are_exactly_every_assistant_turn_and_its_end_of_turn_token(tok):
    ids, labels = encode_conversation(
        Conversation(MULTI, [m["role"] == "assistant" for m in MULTI]), tok, "x"
    )
    # the whole sequence is the template's rendering, token for token
    assert tok.decode(ids) == tok.apply_chat_template(MULTI, tokenize=False)
    runs = labelled_runs(ids, labels)
    wanted = [m["content"] for m in MULTI if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == [w + "<|im_end|>" for w in wanted]
    for run, content in zip(runs, wanted, strict=True):
        assert run == tok(content, add_special_tokens=False)["input_ids"] + [
            tok.convert_tokens_to_ids("<|im_end|>")
        ]
    # the context before each target is what `ctscale predict` feeds the model
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    prompt = tok.apply_chat_template(MULTI[:2], tokenize=False, add_generation_prompt=True)
    assert ids[:first] == tok(prompt, add_special_tokens=False)["input_ids"]


def test_prompt_completion_forms_label_the_completion_only(tok, tmp_path):
    path = write_jsonl(
        tmp_path / "pc.jsonl",
        [
            {"prompt": "Say hi.", "completion": "Hi!"},
            {
                "prompt": [
                    {"role": "user", "content": "One?"},
                    {"role": "assistant", "content": "1"},
                    {"role": "user", "content": "Two?"},
                ],
                "completion": [{"role": "assistant", "content": "2"}],
            },
        ],
    )
    cfg = load_config(None, ["data.task=chat", f"data.train_file={path}", "data.max_length=256"])
    data = load_chat(cfg, tok).train
    runs = [labelled_runs(i.tolist(), lab.tolist()) for i, lab in zip(data.input_ids, data.labels)]
    assert [[tok.decode(r) for r in rs] for rs in runs] == [["Hi!<|im_end|>"], ["2<|im_end|>"]]
    messages = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    assert tok.decode(data.input_ids[0]) == tok.apply_chat_template(messages, tokenize=False)


def test_truncate_or_drop_long_conversations_with_a_count(tok, caplog):
    short = Conversation(MULTI[1:3], [False, True])
    long = Conversation([{"role": "user", "content": "word " * 60}, MULTI[2]], [False, True])
    cut = Conversation(MULTI, [m["role"] == "assistant" for m in MULTI])  # 2nd answer beyond 60
    convs = [short, long, cut]
    with caplog.at_level(logging.WARNING):
        data = encode_chat(convs, tok, 60, "truncate", "c.jsonl", [1, 2, 3])
    assert len(data) == 2 and data.dropped == 1  # `long` keeps no assistant token
    assert all(len(ids) <= 60 for ids in data.input_ids)
    assert "c.jsonl: 2 of 3 conversations longer than data.max_length=60 truncated, 1 dropped" in caplog.text
    data = encode_chat(convs, tok, 60, "drop", "c.jsonl", [1, 2, 3])
    assert len(data) == 1 and data.dropped == 2
    with pytest.raises(DataError, match="every conversation was dropped at data.max_length=8"):
        encode_chat(convs, tok, 8, "drop", "c.jsonl", [1, 2, 3])


@pytest.mark.parametrize(
    "record,match",
    [
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
            r"row 2, column 'messages', message 1: unknown role 'bot'; use one of system, user, assistant",
        ),
        ({"messages": [{"role": "user", "content": "a"}]}, r"row 2, column 'messages': no assistant turn"),
        ({"messages": []}, r"row 2, column 'messages': expected a non-empty list of messages"),
        ({"messages": "hello"}, r"row 2, column 'messages': expected a non-empty list of messages"),
        (
            {"prompt": "a", "completion": [{"role": "user", "content": "b"}]},
            r"row 2, column 'completion': no assistant turn",
        ),
    ],
)
def test_bad_rows_are_named(tok, tmp_path, record, match):
    good = {"messages": MULTI[1:3]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    cfg = load_config(None, ["data.task=chat", f"data.train_file={path}"])
    with pytest.raises(DataError, match=r"bad.jsonl, " + match):
        load_chat(cfg, tok)


def test_missing_columns_and_a_template_less_tokenizer(tok, tiny_bert, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    cfg = load_config(None, ["data.task=chat", f"data.train_file={path}"])
    with pytest.raises(
        DataError,
        match=r"t.jsonl has neither a 'messages' column nor 'prompt' and 'completion'.*columns: text",
    ):
        load_chat(cfg, tok)
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": MULTI}])
    cfg = load_config(None, ["data.task=chat", f"data.train_file={path}"])
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        load_chat(cfg, AutoTokenizer.from_pretrained(tiny_bert))


def test_datasets_directory_and_validation_split(tok, tmp_path):
    DatasetDict(
        train=Dataset.from_list(chat_records(6)), validation=Dataset.from_list(chat_records(3, 50))
    ).save_to_disk(tmp_path / "ds")
    cfg = load_config(None, ["data.task=chat", f"data.dataset={tmp_path / 'ds'}", "data.max_length=256"])
    data = load_chat(cfg, tok)
    assert len(data.train) == 6 and len(data.evals["validation"]) == 3


def test_chat_sft_trains_a_tiny_decoder(smol_tokenizer, tmp_path):
    model_dir = write_tiny_decoder(tmp_path / "llama", smol_tokenizer, "llama")
    train = write_jsonl(tmp_path / "train.jsonl", chat_records(16))
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"model.name_or_path={model_dir}",
            "data.task=chat",
            f"data.train_file={train}",
            "data.validation_fraction=0.25",
            "data.max_length=96",
            f"train.output_dir={out}",
            "train.batch_size=4",
            "train.max_steps=2",
            "train.lr=1e-3",
            "train.tensorboard=false",
            "method.name=ct-f",
        ],
    )
    metrics = Trainer(cfg).run()["validation"]
    assert math.isfinite(metrics["loss"]) and metrics["perplexity"] == pytest.approx(
        math.exp(metrics["loss"])
    )
    assert (out / "model" / "config.json").is_file()
