"""Offline inputs for the decoder benchmarks: a BPE tokenizer trained on the spot, instruction
JSONL, and a Qwen2-shaped ``config.json`` (no weights: runs use ``model.random_init``).

    python bench/synthetic.py /tmp/model --layers 30      # 1.48 B parameters (Qwen2-1.5B blocks)

Nothing is downloaded, so the same files exist on a machine without network or model hub.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def instruction_records(n: int) -> list[dict]:
    """Arithmetic prompt/response pairs of a few dozen tokens."""
    out = []
    for i in range(n):
        a, b = i % 13 + 2, (7 * i) % 17 + 3
        prompt = f"Compute {a} times {b} and explain the steps in one sentence."
        out.append(
            {"prompt": prompt, "response": f"{a} times {b} is {a * b}, by adding {a} to itself {b} times."}
        )
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_tokenizer(path: Path, texts: list[str], vocab_size: int = 1024) -> None:
    """A byte-level BPE tokenizer trained on ``texts`` (EOS doubles as padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)


def write_decoder(
    path: Path,
    layers: int = 30,
    hidden: int = 1536,
    intermediate: int = 8960,
    heads: int = 12,
    kv_heads: int = 2,
    vocab: int = 49_152,
) -> int:
    """A Qwen2 ``config.json`` (defaults: Qwen2-1.5B's blocks, SmolLM2's vocabulary size), the
    tokenizer, and ``train.jsonl``; returns the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    path.mkdir(parents=True, exist_ok=True)
    config = Qwen2Config(
        vocab_size=vocab,  # >= the tokenizer's: the extra rows are never looked up
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    config.save_pretrained(path)
    records = instruction_records(64)
    write_tokenizer(path, [r["prompt"] + " " + r["response"] for r in records])
    write_jsonl(path / "train.jsonl", records)
    with torch.device("meta"):  # shapes only
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=8960)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=2)
    args = parser.parse_args()
    n = write_decoder(args.path, args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads)
    print(json.dumps({"path": str(args.path), "parameters": n}))


if __name__ == "__main__":
    main()
