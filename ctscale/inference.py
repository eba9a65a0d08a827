"""Score and use a finished run: ``ctscale eval`` and ``ctscale predict``.

    ctscale eval --run runs/reviews [--data dev.csv | --split test] [--set data.text_column=...]
    ctscale predict --run runs/reviews --data new.csv --out preds.jsonl
    ctscale predict --run runs/chat --data prompts.jsonl --out answers.jsonl --max-new-tokens 64

A run directory (``train.output_dir``) holds ``config.yaml`` and ``model/``, the Hugging Face
export that every backend writes the same way (``Trainer.save_model`` consolidates DeepSpeed,
FSDP2 and DDP shards first), so these commands need no engine, one process, and no training
data: a classifier's classes come from the exported ``id2label``. ``--set`` overrides keys of
the run's config (e.g. another column name in the file to score).

Predictions, one JSON object per input row, in order: ``{"row", "label", "probabilities"}``
(classification), ``{"row", "score"}`` (regression) or ``{"row", "generated"}`` (causal LMs:
the next assistant turn of a ``messages``/``prompt`` row, or the continuation of a ``text`` row).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctscale.config import Config, load_config
from ctscale.errors import ConfigError, DataError
from ctscale.storage import atomic
from ctscale.tasks.sources import Table, dataset_split, open_dataset, read_file, train_and_eval

CAUSAL_TASKS = ("jsonl", "chat")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Generation:
    """Decoding options of ``ctscale predict`` for causal LMs (temperature 0: greedy)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def load_run(run: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The run's config, with ``model`` pointing at its exported model directory."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(
            f"--run {str(run)!r}: no config.yaml there; give a train.output_dir of ctscale train"
        )
    if not (run / "model" / "config.json").is_file():
        raise ConfigError(
            f"--run {str(run)!r}: no exported model (model/config.json); train with "
            "train.save_model=true (the default)"
        )
    cfg = load_config(run / "config.yaml", overrides)
    cfg.model.name_or_path = str((run / "model").resolve())
    cfg.model.gguf_file, cfg.model.random_init = None, False
    return cfg


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_model(cfg: Config):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if cfg.data.task in CAUSAL_TASKS else AutoModelForSequenceClassification
    model: torch.nn.Module = auto.from_pretrained(
        cfg.model.name_or_path, dtype=getattr(torch, cfg.model.dtype)
    )
    return model.to(_device()).eval()


def _predict_fn(model):
    @torch.no_grad()
    def predict(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**{k: v.to(model.device) for k, v in batch.items() if k in MODEL_INPUTS}).logits

    return predict


def _classes(cfg: Config, model) -> tuple[str, ...] | None:
    """The trained model's classes (None for regression), in head order."""
    if model.config.problem_type == "regression" or model.config.num_labels == 1:
        return None
    return tuple(model.config.id2label[i] for i in range(model.config.num_labels))


def _eval_table(cfg: Config, data: str | None, split: str | None) -> Table:
    """What to score: ``--data``, a split of ``data.dataset``, or the run's training/validation rows."""
    d = cfg.data
    if data:
        return read_file(data, "--data")
    if split and d.dataset and split != "validation":
        return dataset_split(open_dataset(d.dataset), d.dataset, split, "--split")
    train, evals = train_and_eval(d, cfg.train.seed)
    if split == "train":
        return train
    if split not in (None, "validation"):
        raise DataError(
            f"--split {split!r}: this run reads files; choose train or validation, or give --data FILE"
        )
    if evals is None:
        raise DataError("the run has no validation data; give --data FILE (or --split train)")
    return evals


def evaluate_run(
    run: str | Path,
    data: str | None = None,
    split: str | None = None,
    overrides: Sequence[str] = (),
    batch_size: int = 64,
) -> dict[str, float]:
    """The task's metrics of the run's model on ``--data``, ``--split`` or its validation data."""
    cfg = load_run(run, overrides)
    from ctscale.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    model = _load_model(cfg)
    task_data = _eval_data(cfg, tokenizer, model, data, split)
    return task_data.evaluate("eval", _predict_fn(model), 0, 1, batch_size)


def _eval_data(cfg: Config, tokenizer, model, data: str | None, split: str | None):
    """A TaskData whose split ``eval`` is what to score."""
    from ctscale.tasks.base import subsample
    from ctscale.tasks.causal_lm import JsonlData, encode, load_jsonl
    from ctscale.tasks.chat import Rows, conversations, encode_chat
    from ctscale.tasks.glue import default_glue_dir, get_task, load_glue_split, load_glue_tsv
    from ctscale.tasks.glue_data import GlueData
    from ctscale.tasks.tabular import make_task, to_examples

    d = cfg.data

    def limit(examples):
        """The run's own splits as the run scored them (data.max_eval_samples); --data whole."""
        return examples if data else subsample(examples, d.max_eval_samples, cfg.train.seed)

    if d.task == "jsonl":
        path = data or (d.train_file if split == "train" else d.eval_file)
        if not path:
            raise DataError("the run has no data.eval_file; give --data FILE (or --split train)")
        raw = load_jsonl(path, "--data" if data else "data.eval_file")
        tokens = encode(limit(raw), tokenizer, d.max_length, d.chat_template)
        return JsonlData(tokens, {"eval": tokens}, tokenizer.pad_token_id)
    if d.task == "chat":
        table = _eval_table(cfg, data, split)
        rows = limit(Rows(zip(conversations(table), table.numbers)))
        convs, numbers = [c for c, _ in rows], [n for _, n in rows]
        tokens = encode_chat(convs, tokenizer, d.max_length, d.overlong, table.name, numbers)
        return JsonlData(tokens, {"eval": tokens}, tokenizer.pad_token_id)
    if d.task not in ("classification", "regression"):  # a GLUE task
        task = get_task(d.task)
        if data:
            examples = load_glue_tsv(task, Path(data))
        else:
            data_dir = d.data_dir or default_glue_dir()
            examples = limit(load_glue_split(task, split or task.eval_splits[0], data_dir))
        return GlueData(task, examples, {"eval": examples}, tokenizer, d.max_length)
    tabular = make_task(d.task, _classes(cfg, model), ("eval",))
    examples = to_examples(_eval_table(cfg, data, split), d, tabular)
    examples = examples if data else limit(examples)
    return GlueData(tabular, examples, {"eval": examples}, tokenizer, d.max_length)


# -- predict -------------------------------------------------------------------------------------
def predict_run(
    run: str | Path,
    data: str,
    out: str | Path,
    overrides: Sequence[str] = (),
    batch_size: int = 32,
    generation: Generation | None = None,
) -> int:
    """Write one prediction per row of ``data`` to ``out`` (JSONL, atomically); the row count."""
    cfg = load_run(run, overrides)
    from ctscale.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    model = _load_model(cfg)
    table = read_file(data, "--data")
    if cfg.data.task in CAUSAL_TASKS:
        records = _generate(cfg, tokenizer, model, table, generation or Generation())
    else:
        records = _classify(cfg, tokenizer, model, table, batch_size)
    _write_jsonl(Path(out), records)
    return len(records)


def _classify(cfg: Config, tokenizer, model, table: Table, batch_size: int) -> list[dict]:
    from ctscale.tasks.tabular import texts

    d = cfg.data
    text_a = texts(table, d.text_column, "data.text_column")
    text_b = texts(table, d.text_pair_column, "data.text_pair_column") if d.text_pair_column else None
    classes = _classes(cfg, model)
    predict = _predict_fn(model)
    records: list[dict] = []
    for lo in range(0, len(text_a), batch_size):
        enc = tokenizer(
            text_a[lo : lo + batch_size],
            None if text_b is None else text_b[lo : lo + batch_size],
            padding="longest",
            truncation=True,
            max_length=d.max_length,
            return_tensors="pt",
        )
        logits = predict(dict(enc)).float().cpu()
        for i, row in enumerate(logits, start=lo):
            number = table.numbers[i]
            if classes is None:
                records.append({"row": number, "score": float(row[0])})
                continue
            probs = torch.softmax(row, -1).tolist()
            best = int(row.argmax())
            records.append(
                {
                    "row": number,
                    "label": classes[best],
                    "probabilities": dict(zip(classes, probs, strict=True)),
                }
            )
    return records


def _prompt_ids(cfg: Config, tokenizer, table: Table, i: int, row: dict) -> list[int]:
    """The context to continue: chat rows through the chat template (generation prompt)."""
    from ctscale.tasks.chat import checked_messages

    chat = cfg.data.task == "chat" or cfg.data.chat_template
    if row.get("messages") is not None:
        messages = checked_messages(row["messages"], table.where(i, "messages"))
        while messages and messages[-1]["role"] == "assistant":  # a reference answer: not input
            messages.pop()
    elif row.get("prompt") is not None:
        if not chat:
            return tokenizer(row["prompt"])["input_ids"]  # as causal_lm.encode: with specials
        messages = checked_messages(row["prompt"], table.where(i, "prompt"), "user")
    elif isinstance(row.get("text"), str):
        return tokenizer(row["text"])["input_ids"]
    else:
        raise DataError(
            f"{table.name}, row {table.numbers[i]}: nothing to continue; give 'messages', 'prompt' "
            f"or 'text' (columns: {', '.join(table.columns)})"
        )
    if not messages:
        raise DataError(f"{table.where(i, 'messages')}: only assistant turns; add the user turn to answer")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{table.name}: chat rows need a tokenizer with a chat template; this model has none")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _generate(cfg: Config, tokenizer, model, table: Table, gen: Generation) -> list[dict]:
    torch.manual_seed(gen.seed)
    sample = gen.temperature > 0
    options: dict[str, Any] = {"do_sample": sample, "max_new_tokens": gen.max_new_tokens}
    if sample:
        options |= {"temperature": gen.temperature, "top_p": gen.top_p}
    records = []
    for i, row in enumerate(table.rows):
        ids = torch.tensor([_prompt_ids(cfg, tokenizer, table, i, row)], device=model.device)
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **options,
        )
        text = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
        records.append({"row": table.numbers[i], "generated": text})
    return records


def _write_jsonl(path: Path, records: list[dict]) -> None:
    """All lines or none (``ctscale.storage.atomic``)."""
    with atomic.replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
