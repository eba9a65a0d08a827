"""Synthetic GLUE data in the original TSV layouts, made by the tests themselves.

Unit and distributed tests need GLUE-*shaped* data, not GLUE itself: the same files, headers and
label vocabularies that ``ctscale.tasks.glue`` reads, with enough rows for a few training steps.
So a plain clone runs them with nothing beside it. Only tests about the real files (row counts,
contents) or about a pretrained model's real behaviour read ``../shared/data/glue``.

Every layout of the public GLUE release is written: CoLA without a header, MRPC's header with a
UTF-8 BOM, STS-B's float scores, MNLI's two dev files, QQP and QNLI's columns. Labels follow a
simple learnable rule (a cue word), so that training visibly moves the loss.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "the a man woman child dog cat city river house car book music film story game team player "
    "teacher doctor student company market price garden window road night morning summer winter "
    "old new small large quick slow bright dark happy quiet strong young famous simple "
    "walks reads writes buys sells builds sees hears finds keeps opens plays watches visits"
).split()
POSITIVE, NEGATIVE = ("good", "great", "wonderful", "lovely"), ("bad", "awful", "boring", "terrible")

MNLI_TRAIN_HEADER = [
    *("index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse"),
    *("sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"),
]
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]
STSB_HEADER = [
    *("index", "genre", "filename", "year", "old_index", "source1", "source2"),
    *("sentence1", "sentence2", "score"),
]


def write_tsv(path: Path, rows: list[list[str]], bom: bool = False) -> Path:
    """Write rows as a GLUE-style TSV (tab-separated, no quoting) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join("\t".join(r) + "\n" for r in rows)
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


def _sentence(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(n - 3, n + 3))) + " ."


def _pair(rng: random.Random, same: bool) -> tuple[str, str]:
    """A sentence and a second one that repeats part of it (``same``) or is unrelated."""
    first = _sentence(rng)
    words = first.split()[:-1]
    second = " ".join(words[: max(3, len(words) // 2)]) + " ." if same else _sentence(rng, 5)
    return first, second


def _sentiment(rng: random.Random, positive: bool) -> str:
    words = _sentence(rng).split()
    words.insert(rng.randrange(len(words)), rng.choice(POSITIVE if positive else NEGATIVE))
    return " ".join(words)


def _rows(task: str, n: int, rng: random.Random, dev: bool = False) -> list[list[str]]:
    """``n`` data rows (plus the header where the layout has one) of ``task``."""
    rows: list[list[str]] = []
    for i in range(n):
        y = rng.random() < 0.5
        if task == "CoLA":  # no header: source, label, original mark, sentence
            rows.append(["gj04", str(int(y)), "" if y else "*", _sentiment(rng, y)])
        elif task == "SST-2":
            rows.append([_sentiment(rng, y) + " ", str(int(y))])  # real rows end in a space
        elif task == "MRPC":
            a, b = _pair(rng, y)
            rows.append([str(int(y)), str(1000 + i), str(2000 + i), a, b])
        elif task == "STS-B":
            a, b = _pair(rng, y)
            score = rng.uniform(3.0, 5.0) if y else rng.uniform(0.0, 2.0)
            rows.append(
                [str(i), "main-news", "MSRpar", "2012test", f"{i:04d}", "none", "none", a, b, f"{score:.3f}"]
            )
        elif task == "QQP":
            a, b = _pair(rng, y)
            rows.append(
                [
                    str(i),
                    str(2 * i),
                    str(2 * i + 1),
                    a.replace(" .", " ?"),
                    b.replace(" .", " ?"),
                    str(int(y)),
                ]
            )
        elif task == "MNLI":
            gold = rng.choice(("entailment", "neutral", "contradiction"))
            a, b = _pair(rng, gold == "entailment")
            if gold == "contradiction":
                b = "no " + b
            meta = [str(i), str(30000 + i), f"{i}n", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)"]
            rows.append(meta + [a, b] + [gold] * (5 if dev else 1) + [gold])
        elif task == "QNLI":
            a, b = _pair(rng, y)
            rows.append([str(i), a.replace(" .", " ?"), b, "entailment" if y else "not_entailment"])
        elif task == "RTE":
            a, b = _pair(rng, y)
            rows.append([str(i), a, b, "entailment" if y else "not_entailment"])
        elif task == "WNLI":
            a, b = _pair(rng, y)
            rows.append([str(i), a, b, str(int(y))])
    headers = {
        "SST-2": ["sentence", "label"],
        "MRPC": ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
        "STS-B": STSB_HEADER,
        "QQP": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        "MNLI": MNLI_DEV_HEADER if dev else MNLI_TRAIN_HEADER,
        "QNLI": ["index", "question", "sentence", "label"],
        "RTE": ["index", "sentence1", "sentence2", "label"],
        "WNLI": ["index", "sentence1", "sentence2", "label"],
    }
    return ([headers[task]] if task in headers else []) + rows


TASK_DIRS = ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI")


def write_glue(root: Path, n_train: int = 240, n_dev: int = 48, seed: int = 0) -> Path:
    """A GLUE root under ``root`` with every task in its original layout; returns ``root``."""
    for task in TASK_DIRS:
        rng = random.Random(f"{seed}-{task}")  # one stream per task: adding a task changes no other
        write_tsv(root / task / "train.tsv", _rows(task, n_train, rng), bom=task == "MRPC")
        dev_files = ("dev_matched.tsv", "dev_mismatched.tsv") if task == "MNLI" else ("dev.tsv",)
        for name in dev_files:
            write_tsv(root / task / name, _rows(task, n_dev, rng, dev=True), bom=task == "MRPC")
    return root
