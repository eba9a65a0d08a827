"""GLUE tasks: the task registry, TSV/hub loaders and tokenization.

The TSV loader reads the layout of the original GLUE release (the files the GLUE download script
produced): one directory per task (``CoLA``, ``SST-2``, ``MRPC``, ``STS-B``, ``QQP``, ``MNLI``,
``QNLI``, ``RTE``, ``WNLI``) holding ``train.tsv`` and ``dev.tsv`` (MNLI: ``dev_matched.tsv`` and
``dev_mismatched.tsv``). Text fields are stripped of surrounding whitespace (SST-2 rows end in a
space).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ctscale.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlueTask:
    """What a training loop needs to know about one GLUE task."""

    name: str
    label_list: tuple[str, ...] | None  # label strings as in the TSV; None for regression
    is_regression: bool
    metrics: tuple[str, ...]  # "main" is their mean (see ctscale.tasks.metrics)
    eval_splits: tuple[str, ...]
    headline: tuple[str, ...] | None = None  # the metrics "main" averages; None: all of them

    @property
    def num_labels(self) -> int:
        """Return the classifier width: 1 for regression, else the number of classes."""
        return 1 if self.label_list is None else len(self.label_list)


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
_VAL = ("validation",)

GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", _BINARY, False, ("mcc",), _VAL),
        GlueTask("sst2", _BINARY, False, ("accuracy",), _VAL),
        GlueTask("mrpc", _BINARY, False, ("accuracy", "f1"), _VAL),
        GlueTask("stsb", None, True, ("pearson", "spearman"), _VAL),
        GlueTask("qqp", _BINARY, False, ("accuracy", "f1"), _VAL),
        GlueTask(
            "mnli",
            ("contradiction", "entailment", "neutral"),
            False,
            ("accuracy",),
            ("validation_matched", "validation_mismatched"),
        ),
        GlueTask("qnli", _NLI2, False, ("accuracy",), _VAL),
        GlueTask("rte", _NLI2, False, ("accuracy",), _VAL),
        GlueTask("wnli", _BINARY, False, ("accuracy",), _VAL),
    )
}


@dataclass(frozen=True)
class _Layout:
    """Where a task's data lives: TSV directory/columns and the hub config/columns."""

    dir_name: str
    columns: tuple[str | int, str | int | None, str | int]  # text_a, text_b, label
    width: int | None = None  # column count of headerless files (CoLA)
    hub_config: str = ""
    hub_columns: tuple[str, str | None] = ("sentence1", "sentence2")
    hub_labels: tuple[str, ...] | None = None  # TSV label string of each hub class id


_LAYOUTS: dict[str, _Layout] = {
    # CoLA has no header: source, label, original label mark, sentence.
    "cola": _Layout(
        "CoLA",
        (3, None, 1),
        width=4,
        hub_config="cola",
        hub_columns=("sentence", None),
        hub_labels=_BINARY,
    ),
    "sst2": _Layout(
        "SST-2",
        ("sentence", None, "label"),
        hub_config="sst2",
        hub_columns=("sentence", None),
        hub_labels=_BINARY,
    ),
    "mrpc": _Layout(
        "MRPC",
        ("#1 String", "#2 String", "Quality"),
        hub_config="mrpc",
        hub_labels=_BINARY,
    ),
    # STS-B and MNLI: the score / gold_label is the last of many columns.
    "stsb": _Layout("STS-B", ("sentence1", "sentence2", "score"), hub_config="stsb"),
    "qqp": _Layout(
        "QQP",
        ("question1", "question2", "is_duplicate"),
        hub_config="qqp",
        hub_columns=("question1", "question2"),
        hub_labels=_BINARY,
    ),
    "mnli": _Layout(
        "MNLI",
        ("sentence1", "sentence2", "gold_label"),
        hub_config="mnli",
        hub_columns=("premise", "hypothesis"),
        hub_labels=("entailment", "neutral", "contradiction"),
    ),
    "qnli": _Layout(
        "QNLI",
        ("question", "sentence", "label"),
        hub_config="qnli",
        hub_columns=("question", "sentence"),
        hub_labels=_NLI2,
    ),
    "rte": _Layout("RTE", ("sentence1", "sentence2", "label"), hub_config="rte", hub_labels=_NLI2),
    "wnli": _Layout(
        "WNLI",
        ("sentence1", "sentence2", "label"),
        hub_config="wnli",
        hub_labels=_BINARY,
    ),
}

# Rows with the wrong column count are skipped (the real QQP file has a few), up to
# this share of a file.
MAX_BAD_ROW_FRACTION = 0.01


def _canonical(name: str) -> str:
    # "SST-2", "sst_2", "STS-B" and "stsb" all name the same task.
    return name.strip().lower().replace("-", "").replace("_", "")


def get_task(name: str) -> GlueTask:
    """Return the GlueTask for ``name`` (case-insensitive; ``sst-2``/``sts-b`` aliases)."""
    task = GLUE_TASKS.get(_canonical(name))
    if task is None:
        valid = ", ".join(GLUE_TASKS)
        raise DataError(f"unknown GLUE task {name!r}; valid tasks: {valid}")
    return task


@dataclass
class Examples:
    """A split of a task: texts and labels (ids into ``label_list``, or float scores)."""

    text_a: list[str]
    text_b: list[str] | None
    labels: list[float] | list[int]

    def __post_init__(self) -> None:
        n = len(self.text_a)
        if len(self.labels) != n or (self.text_b is not None and len(self.text_b) != n):
            raise ValueError("text_a, text_b and labels must have the same length")

    def __len__(self) -> int:
        """Return the number of examples."""
        return len(self.text_a)

    def subset(self, indices: Sequence[int]) -> Examples:
        """Return a new Examples holding the rows at ``indices``, in that order."""
        return Examples(
            text_a=[self.text_a[i] for i in indices],
            text_b=None if self.text_b is None else [self.text_b[i] for i in indices],
            labels=[self.labels[i] for i in indices],
        )


def default_glue_dir() -> Path | None:
    """Return the first existing GLUE root among ``$CTSCALE_GLUE_DIR``,
    ``./../shared/data/glue`` and ``<repo root>/../shared/data/glue``; None if none."""
    repo_root = Path(__file__).resolve().parents[2]  # ctscale/tasks/glue.py -> repo root
    candidates = [
        os.environ.get("CTSCALE_GLUE_DIR"),
        Path.cwd() / ".." / "shared" / "data" / "glue",
        repo_root / ".." / "shared" / "data" / "glue",
    ]
    for cand in candidates:
        if cand and Path(cand).is_dir():
            return Path(cand).resolve()
    return None


# Split name -> TSV file name. MNLI has two dev files, so plain "validation" is
# ambiguous there.
_SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv", "dev": "dev.tsv"}
_MNLI_SPLIT_FILES = {
    "train": "train.tsv",
    "validation_matched": "dev_matched.tsv",
    "dev_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
    "dev_mismatched": "dev_mismatched.tsv",
}


def _split_file(task: GlueTask, split: str) -> str:
    """Return the TSV file name holding ``split`` of ``task``."""
    files = _MNLI_SPLIT_FILES if task.name == "mnli" else _SPLIT_FILES
    key = split.strip().lower()
    if key not in files:
        valid = ", ".join(("train", *task.eval_splits))
        raise DataError(f"unknown split {split!r} for GLUE task {task.name}; valid splits: {valid}")
    return files[key]


def load_glue_split(task: str | GlueTask, split: str, data_dir: str | Path | None) -> Examples:
    """Return the examples of one split of a GLUE task.

    ``split`` is ``train``, ``validation`` (alias ``dev``), or for MNLI
    ``validation_matched`` / ``validation_mismatched``. ``data_dir`` is a GLUE root
    holding ``<TASKDIR>/<split>.tsv``; None downloads the split from the Hugging Face
    hub (``nyu-mll/glue``) instead.
    """
    t = task if isinstance(task, GlueTask) else get_task(task)
    file_name = _split_file(t, split)
    if data_dir is None:
        return _load_hub(t, split)
    return load_glue_tsv(t, _task_dir(t, Path(data_dir)) / file_name)


def _task_dir(task: GlueTask, root: Path) -> Path:
    """Return ``root/<TASKDIR>``, matching the directory name case-insensitively."""
    if not root.is_dir():
        raise DataError(
            f"GLUE data directory {root} does not exist; pass the directory that holds "
            f"CoLA/, SST-2/, MRPC/, ... or set CTSCALE_GLUE_DIR"
        )
    want = _LAYOUTS[task.name].dir_name
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name.lower() == want.lower():
            return child
    found = ", ".join(sorted(c.name for c in root.iterdir() if c.is_dir())) or "nothing"
    raise DataError(
        f"no {want}/ directory for GLUE task {task.name} in {root} (found: {found}); "
        f"download GLUE so that {root / want} holds train.tsv and dev.tsv"
    )


def _read_rows(path: Path) -> list[tuple[int, list[str]]]:
    """Return the non-blank rows of a TSV file with their 1-based line numbers."""
    if not path.is_file():
        present = sorted(p.name for p in path.parent.glob("*.tsv")) or ["no .tsv files"]
        raise DataError(f"split file {path} not found (that directory has: {', '.join(present)})")
    # QUOTE_NONE: GLUE text holds unbalanced quotes; utf-8-sig drops MRPC's BOM.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    if not rows:
        raise DataError(f"{path} is empty; re-download the GLUE data for this task")
    return rows


def _column_index(path: Path, header: list[str], name: str | int) -> int:
    """Return the position of column ``name`` in ``header`` (an int is one already)."""
    if isinstance(name, int):
        return name
    try:
        return header.index(name)
    except ValueError:
        raise DataError(
            f"{path} has no column {name!r} (header: {', '.join(header)}); "
            f"is this the right task's file, in the original GLUE layout?"
        ) from None


def _parse_label(task: GlueTask, raw: str, where: str) -> int | float:
    """Return the class id of ``raw`` (or its float score for regression)."""
    raw = raw.strip()
    if task.label_list is None:
        try:
            score = float(raw)
        except ValueError:
            score = math.nan
        if not (0.0 <= score <= 5.0):  # also rejects nan
            raise DataError(f"{where}: score {raw!r} is not a number in [0, 5]")
        return score
    if raw not in task.label_list:
        raise DataError(f"{where}: label {raw!r} is not one of {task.name}'s labels {list(task.label_list)}")
    return task.label_list.index(raw)


def load_glue_tsv(task: GlueTask, path: Path) -> Examples:
    """Return the examples in one GLUE TSV file of ``task``."""
    layout = _LAYOUTS[task.name]
    rows = _read_rows(path)
    if layout.width is None:  # header row: read columns by name
        header = [h.strip() for h in rows[0][1]]
        rows = rows[1:]
        width = len(header)
        if not rows:
            raise DataError(f"{path} has a header but no data rows")
    else:
        header, width = [], layout.width
    a_col, b_col, y_col = (None if c is None else _column_index(path, header, c) for c in layout.columns)

    good = [(line, row) for line, row in rows if len(row) == width]
    bad = len(rows) - len(good)
    if bad:
        first_bad = next(line for line, row in rows if len(row) != width)
        msg = f"{path}: {bad} of {len(rows)} rows do not have {width} columns (first: line {first_bad})"
        if bad > MAX_BAD_ROW_FRACTION * len(rows):
            raise DataError(f"{msg}; more than {MAX_BAD_ROW_FRACTION:.0%} are malformed, check the file")
        log.warning("%s; skipping them", msg)

    assert a_col is not None and y_col is not None  # only text_b is optional (layout.columns)
    text_a = [row[a_col].strip() for _, row in good]
    text_b = None if b_col is None else [row[b_col].strip() for _, row in good]
    labels = [_parse_label(task, row[y_col], f"{path} line {line}") for line, row in good]
    return Examples(text_a, text_b, labels)


_HUB_SPLITS = {
    "dev": "validation",
    "dev_matched": "validation_matched",
    "dev_mismatched": "validation_mismatched",
}


def _load_hub(task: GlueTask, split: str) -> Examples:
    """Return one split from the hub, labels mapped to this task's label_list."""
    # Imported lazily: datasets is heavy and only needed without local data.
    from datasets import load_dataset

    layout = _LAYOUTS[task.name]
    key = split.strip().lower()
    hub_split = _HUB_SPLITS.get(key, key)
    try:
        ds = load_dataset("nyu-mll/glue", layout.hub_config, split=hub_split)
    except Exception as e:  # network, cache or hub errors: all mean "no data"
        raise DataError(
            f"could not load GLUE {layout.hub_config}/{hub_split} from the hub ({e}); "
            f"pass a local GLUE directory (data_dir, or CTSCALE_GLUE_DIR)"
        ) from e
    col_a, col_b = layout.hub_columns
    text_a = [s.strip() for s in ds[col_a]]
    text_b = None if col_b is None else [s.strip() for s in ds[col_b]]
    if task.label_list is None:
        return Examples(text_a, text_b, [float(y) for y in ds["label"]])
    assert layout.hub_labels is not None
    # Hub class ids may follow another order (MNLI); map them via the TSV strings.
    to_id = [task.label_list.index(s) for s in layout.hub_labels]
    raw = list(ds["label"])
    if any(y < 0 for y in raw):
        raise DataError(f"GLUE {layout.hub_config}/{hub_split} has no labels (test split?)")
    return Examples(text_a, text_b, [to_id[y] for y in raw])


def tokenize(examples: Examples, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """Return ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the
    tokenizer makes them) padded to the longest example and truncated to
    ``max_length``, plus ``labels`` (int64 class ids, or float32 regression scores).

    A tokenizer without a pad token (decoders such as Llama or GPT-2) gets
    ``pad_token = eos_token`` set on it; the attention mask hides the padding.
    """
    if len(examples) == 0:
        raise DataError("cannot tokenize an empty set of examples")
    if max_length < 1:
        raise DataError(f"max_length must be at least 1, got {max_length}")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(
        examples.text_a,
        examples.text_b,
        padding="longest",
        truncation=True,  # pairs: trims the longer text first
        max_length=max_length,
        return_tensors="pt",
    )
    out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    is_float = bool(examples.labels) and isinstance(examples.labels[0], float)
    out["labels"] = torch.tensor(examples.labels, dtype=torch.float32 if is_float else torch.long)
    return out


def pad_collate(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Return a batch of single-example rows, right-padding 1-D tensors to the longest.

    ``input_ids`` are padded with ``pad_id``, every other 1-D tensor (attention_mask,
    token_type_ids) with 0; 0-d tensors (``labels``) are stacked.
    """
    if not rows:
        raise DataError("cannot collate an empty list of rows")
    batch: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if values[0].dim() == 0:
            batch[key] = torch.stack(values)
            continue
        fill = pad_id if key == "input_ids" else 0
        width = max(v.shape[0] for v in values)
        out = values[0].new_full((len(values), width), fill)
        for i, v in enumerate(values):
            out[i, : v.shape[0]] = v
        batch[key] = out
    return batch
