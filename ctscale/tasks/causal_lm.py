"""Causal-LM fine-tuning data: JSONL prompt/response pairs (loss on the response) or plain text.

Each line of ``data.train_file`` / ``data.eval_file`` is one JSON object, either
``{"prompt": "...", "response": "..."}`` (the prompt is context: its tokens get label -100) or
``{"text": "..."}`` (every token is a target). An EOS token ends every example. The training
loss of a step is the mean over *all target tokens of the global batch*, so it is the same at
any world size and accumulation (HF's ``num_items_in_batch``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ctscale import batching, dist
from ctscale.config import Config, ModelConfig
from ctscale.errors import DataError
from ctscale.models import load_causal_lm
from ctscale.tasks.base import Predict, subsample

log = logging.getLogger(__name__)
IGNORE = -100  # label of a context or padding token (HF's ignore_index)


@dataclass
class LMExamples:
    """Raw records: ``prompts[i]`` is None for plain text."""

    prompts: list[str | None]
    targets: list[str]

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, indices) -> LMExamples:
        return LMExamples([self.prompts[i] for i in indices], [self.targets[i] for i in indices])


def load_jsonl(path: str | Path, key: str = "data.train_file") -> LMExamples:
    """Records of a JSONL file; a bad line is an error naming the file, the line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}={str(path)!r}: no such file; give a JSONL file (one JSON object per line)")
    prompts: list[str | None] = []
    targets: list[str] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg}); write one JSON object per line") from None
        prompt, target = _fields(record, where)
        prompts.append(prompt)
        targets.append(target)
    if not targets:
        raise DataError(f"{key}={str(path)!r} holds no records; add at least one JSON line")
    return LMExamples(prompts, targets)


def _fields(record: object, where: str) -> tuple[str | None, str]:
    if isinstance(record, dict):
        keys = set(record)
        if keys == {"text"} and isinstance(record["text"], str):
            return None, record["text"]
        if keys == {"prompt", "response"} and all(isinstance(record[k], str) for k in keys):
            return record["prompt"], record["response"]
        found = ", ".join(sorted(map(str, keys))) or "none"
    else:
        found = f"a JSON {type(record).__name__}, not an object"
    raise DataError(
        f'{where}: expected {{"prompt": str, "response": str}} or {{"text": str}}, found keys: '
        f"{found}; fix the record"
    )


@dataclass
class Tokenized:
    """Token ids and labels of every example (unpadded), and the targets each one predicts."""

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    dropped: int  # examples whose response lay wholly beyond max_length

    def __post_init__(self) -> None:
        # the loss predicts token t from tokens < t: label 0 is never a target
        self.target_counts = torch.tensor([int((lab[1:] != IGNORE).sum()) for lab in self.labels])

    def __len__(self) -> int:
        return len(self.input_ids)

    def targets(self, indices: torch.Tensor) -> int:
        return int(self.target_counts[indices].sum())

    def collate(self, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE on padding)."""
        width = max(self.input_ids[i].numel() for i in indices)
        ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
        labels = torch.full((len(indices), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            n = self.input_ids[i].numel()
            ids[row, :n], labels[row, :n], mask[row, :n] = self.input_ids[i], self.labels[i], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode(examples: LMExamples, tokenizer, max_length: int, chat_template: bool = False) -> Tokenized:
    """Tokenise: [prompt][response][EOS] (or [text][EOS]), truncated to ``max_length``."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; causal-LM data needs one to end examples")
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "data.chat_template=true but the tokenizer has no chat template; set "
            "data.chat_template=false or use an instruction-tuned model's tokenizer"
        )
    prompts = [_prompt_text(p, tokenizer, chat_template) for p in examples.prompts]
    has_prompt = [p is not None for p in prompts]
    # prompts keep the tokenizer's specials (BOS) unless the chat template already wrote them
    contexts = _tokens([p for p in prompts if p is not None], tokenizer, not chat_template)
    responses = _tokens([t for t, h in zip(examples.targets, has_prompt) if h], tokenizer, False)
    texts = _tokens([t for t, h in zip(examples.targets, has_prompt) if not h], tokenizer, True)
    ids_out, labels_out, dropped = [], [], 0
    for h in has_prompt:
        ctx, body = (next(contexts), next(responses)) if h else ([], next(texts))
        target = body + [tokenizer.eos_token_id]
        ids = (ctx + target)[:max_length]
        labels = ([IGNORE] * len(ctx) + target)[:max_length]
        if not any(lab != IGNORE for lab in labels[1:]):
            dropped += 1  # nothing left to learn from once truncated
            continue
        ids_out.append(torch.tensor(ids))
        labels_out.append(torch.tensor(labels))
    return Tokenized(ids_out, labels_out, dropped)


def _tokens(texts: list[str], tokenizer, specials: bool):
    return iter(tokenizer(texts, add_special_tokens=specials)["input_ids"] if texts else [])


def _prompt_text(prompt: str | None, tokenizer, chat_template: bool) -> str | None:
    if prompt is None or not chat_template:
        return prompt
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class JsonlData:
    """Training (and optional eval) JSONL files, tokenised once on every rank."""

    train: Tokenized
    evals: dict[str, Tokenized]
    pad_id: int

    @classmethod
    def from_config(cls, cfg: Config, tokenizer) -> JsonlData:
        d = cfg.data

        def load(path: str, key: str, limit: int | None) -> Tokenized:
            raw = subsample(load_jsonl(path, key), limit, cfg.train.seed)
            data = encode(raw, tokenizer, d.max_length, d.chat_template)
            if len(data) == 0:
                raise DataError(
                    f"{key}={path!r}: every example is cut off before its response at "
                    f"data.max_length={d.max_length}; raise data.max_length"
                )
            if data.dropped:
                log.warning("%s: %d examples dropped, truncated before any target token", path, data.dropped)
            return data

        assert d.train_file is not None  # config validation: task jsonl needs data.train_file
        train = load(d.train_file, "data.train_file", d.max_train_samples)
        evals = {"validation": load(d.eval_file, "data.eval_file", d.max_eval_samples)} if d.eval_file else {}
        return cls(train, evals, tokenizer.pad_token_id)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return tuple(self.evals)

    @property
    def train_size(self) -> int:
        return len(self.train)

    def load_model(self, cfg: ModelConfig) -> torch.nn.Module:
        return load_causal_lm(cfg)

    def train_batch(self, indices: torch.Tensor, window: torch.Tensor, parts: int) -> dict:
        batch = self.train.collate(indices.tolist(), self.pad_id)
        # each of the `parts` micro-batch losses is later divided by grad_accum and averaged over
        # ranks; dividing the token-loss sum by targets/parts makes the total the global token mean
        batch["num_items_in_batch"] = torch.tensor(self.train.targets(window) / parts)
        return batch

    def evaluate(
        self, split: str, predict: Predict, rank: int, world_size: int, batch_size: int
    ) -> dict[str, float]:
        """Mean token loss over the split's targets and its perplexity."""
        data = self.evals[split]
        idx, real = batching.eval_shard(len(data), rank, world_size)
        total, count = 0.0, 0
        for lo in range(0, idx.numel(), batch_size):
            rows = idx[lo : lo + batch_size]
            batch = data.collate(rows.tolist(), self.pad_id)
            logits = predict(batch)[:, :-1]
            targets = batch["labels"][:, 1:].to(logits.device)
            losses = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
            ).sum(-1)
            keep = max(0, min(real - lo, rows.numel()))  # padding rows repeat index 0
            total += float(losses[:keep].double().sum())
            count += data.targets(rows[:keep])
        parts = dist.all_gather_objects((total, count))
        loss = sum(t for t, _ in parts) / max(1, sum(c for _, c in parts))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
