"""Chat fine-tuning (``data.task: chat``): conversations through the tokenizer's chat template,
loss on the assistant turns only.

Rows (JSONL files or a ``datasets`` dataset, read by :mod:`ctscale.tasks.sources`) take one of
the forms instruction-tuning tools share:

- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``: every
  assistant turn is a target (multi-turn: all of them, not only the last);
- TRL's prompt-completion: ``{"prompt": str, "completion": str}`` (a user turn and an assistant
  turn) or ``{"prompt": [messages], "completion": [messages]}``: only the completion's assistant
  turns are targets.

Token layout, built piece by piece so that the target boundaries are exact: for assistant turn
``i``, the context is the template's rendering of the turns before it with the generation prompt
(``<|im_start|>assistant\\n``) and the target is what the template adds for the turn itself,
trailing whitespace removed: the content and its end-of-turn token (``...<|im_end|>``). The
context at inference is the same rendering, so training and ``ctscale predict`` agree. Batches,
the global token-mean loss and evaluation (loss, perplexity) are the causal-LM task's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ctscale.config import Config
from ctscale.errors import DataError
from ctscale.tasks.base import subsample
from ctscale.tasks.causal_lm import IGNORE, JsonlData, Tokenized
from ctscale.tasks.sources import Table, train_and_eval

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    """Messages (role, content) and, per message, whether it is a training target."""

    messages: list[dict[str, str]]
    targets: list[bool]


class Rows(list):
    """A list that ``subsample`` can take a seeded subset of."""

    def subset(self, indices) -> Rows:
        return Rows(self[i] for i in indices)


def checked_messages(value: object, where: str, text_role: str | None = None) -> list[dict[str, str]]:
    """A checked list of messages; a bad one is an error naming the row, column and message.
    A plain string is one message of ``text_role`` where the form allows it (TRL's prompt and
    completion strings)."""
    if isinstance(value, str) and text_role is not None:
        return [{"role": text_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of messages, found {value!r}; fix the row")
    out = []
    for j, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(
                f'{where}, message {j}: expected {{"role": str, "content": str}}, found {m!r}; fix the row'
            )
        if m["role"] not in ROLES:
            raise DataError(
                f"{where}, message {j}: unknown role {m['role']!r}; use one of {', '.join(ROLES)}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def conversations(table: Table) -> list[Conversation]:
    """Every row of ``table`` as a conversation (``messages`` or prompt/completion)."""
    cols = table.columns
    has_messages = "messages" in cols
    if not has_messages and not {"prompt", "completion"} <= set(cols):
        raise DataError(
            f"{table.name} has neither a 'messages' column nor 'prompt' and 'completion' columns "
            f"(columns: {', '.join(cols) or 'none'}); write chat rows as "
            '{"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "completion": ...}'
        )
    out = []
    for i, row in enumerate(table.rows):
        if has_messages and row.get("messages") is not None:
            msgs = checked_messages(row["messages"], table.where(i, "messages"))
            targets = [m["role"] == "assistant" for m in msgs]
            column = "messages"
        else:
            if row.get("prompt") is None or row.get("completion") is None:
                raise DataError(
                    f"{table.name}, row {table.numbers[i]}: no 'messages', and no 'prompt' with a "
                    "'completion'; fix the row"
                )
            prompt = checked_messages(row["prompt"], table.where(i, "prompt"), "user")
            completion = checked_messages(row["completion"], table.where(i, "completion"), "assistant")
            msgs = prompt + completion
            targets = [False] * len(prompt) + [m["role"] == "assistant" for m in completion]
            column = "completion"
        if not any(targets):
            raise DataError(
                f"{table.where(i, column)}: no assistant turn to learn from; add one or remove the row"
            )
        out.append(Conversation(msgs, targets))
    return out


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_conversation(conv: Conversation, tokenizer, where: str) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE outside the assistant targets) of one whole conversation."""
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the rendered text covered so far

    def take(text: str, target: bool) -> None:
        piece = _ids(tokenizer, text)
        ids.extend(piece)
        labels.extend(piece if target else [IGNORE] * len(piece))

    def after(prefix: str, full: str) -> str:
        if not full.startswith(prefix):
            raise DataError(
                f"{where}: the tokenizer's chat template does not render this conversation's turns "
                "as prefixes of one another, so the assistant tokens cannot be located; use a "
                "model whose template does (SmolLM2, Llama, Qwen) or start with a user turn"
            )
        return full[len(prefix) :]

    for i, (_, target) in enumerate(zip(conv.messages, conv.targets, strict=True)):
        if not target:
            continue
        prompt = _render(tokenizer, conv.messages[:i], True)  # the context, ends "assistant\n"
        turn = after(prompt, _render(tokenizer, conv.messages[: i + 1], False)).rstrip()
        take(after(done, prompt), False)
        take(turn, True)
        done = prompt + turn
    take(after(done, _render(tokenizer, conv.messages, False)), False)
    return ids, labels


def encode_chat(
    convs: list[Conversation], tokenizer, max_length: int, overlong: str, name: str, numbers: list[int]
) -> Tokenized:
    """Tokenise conversations; longer than ``max_length``: truncated (``overlong: truncate``) or
    dropped; either way the count is logged, and a conversation left without a target is dropped."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "data.task chat needs a tokenizer with a chat template; use an instruction-tuned model "
            "(e.g. SmolLM2-Instruct) or data.task jsonl for plain prompt/response pairs"
        )
    ids_out, labels_out, truncated, dropped = [], [], 0, 0
    for conv, number in zip(convs, numbers, strict=True):
        ids, labels = encode_conversation(conv, tokenizer, f"{name}, row {number}")
        if len(ids) > max_length:
            if overlong == "drop":
                dropped += 1
                continue
            ids, labels, truncated = ids[:max_length], labels[:max_length], truncated + 1
        if all(lab == IGNORE for lab in labels[1:]):
            dropped += 1  # nothing left to learn from once truncated
            continue
        ids_out.append(torch.tensor(ids))
        labels_out.append(torch.tensor(labels))
    if truncated or dropped:
        log.warning(
            "%s: %d of %d conversations longer than data.max_length=%d truncated, %d dropped",
            name,
            truncated,
            len(convs),
            max_length,
            dropped,
        )
    if not ids_out:
        raise DataError(
            f"{name}: every conversation was dropped at data.max_length={max_length} (no assistant "
            "token left); raise data.max_length or set data.overlong=truncate"
        )
    return Tokenized(ids_out, labels_out, dropped)


def load_chat(cfg: Config, tokenizer) -> JsonlData:
    """Training (and validation) conversations, tokenised once on every rank."""
    d = cfg.data
    train_table, eval_table = train_and_eval(d, cfg.train.seed)

    def encode(table: Table, limit: int | None) -> Tokenized:
        rows = subsample(Rows(zip(conversations(table), table.numbers)), limit, cfg.train.seed)
        convs, numbers = [c for c, _ in rows], [n for _, n in rows]
        return encode_chat(convs, tokenizer, d.max_length, d.overlong, table.name, numbers)

    train = encode(train_table, d.max_train_samples)
    evals = {"validation": encode(eval_table, d.max_eval_samples)} if eval_table is not None else {}
    return JsonlData(train, evals, tokenizer.pad_token_id)
