"""Your own data, read by the ``datasets`` library: local files or a ``datasets`` dataset.

A :class:`Table` is one split's rows plus the name every error message uses (the file, or the
dataset and split) and each row's number in that source, so that a bad cell is reported as
``file, row N, column 'x'`` even after a validation fraction was split off.

Sources (``data.*`` keys): ``train_file`` / ``eval_file`` (``.csv``, ``.tsv``, ``.json``,
``.jsonl``, ``.parquet``), or ``dataset`` (a directory written by ``save_to_disk`` or a hub id)
with ``train_split`` / ``eval_split``; ``validation_fraction`` holds out a seeded share of the
training rows when there is no validation data of its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctscale.config import DataConfig
from ctscale.errors import DataError

log = logging.getLogger(__name__)

# file suffix -> (datasets builder, its options)
BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}


@dataclass
class Table:
    """Rows of one split (a ``datasets.Dataset``), where they came from, their row numbers."""

    rows: Any  # datasets.Dataset
    name: str  # "data/train.csv" or "dataset 'imdb' split 'train'"
    numbers: list[int]  # 1-based row number in the source of each row

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> list[str]:
        return list(self.rows.column_names)

    def where(self, i: int, column: str) -> str:
        """``name, row N, column 'c'`` of row ``i`` of this table."""
        return f"{self.name}, row {self.numbers[i]}, column {column!r}"

    def column(self, name: str, key: str) -> list:
        """All values of a column; a missing one is an error naming the config key to set."""
        if name not in self.columns:
            raise DataError(
                f"{self.name} has no column {name!r} (columns: {', '.join(self.columns) or 'none'}); "
                f"set {key} to one of them"
            )
        return list(self.rows[name])

    def select(self, indices: list[int]) -> Table:
        return Table(self.rows.select(indices), self.name, [self.numbers[i] for i in indices])


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_file(path: str | Path, key: str) -> Table:
    """One CSV/TSV/JSON/JSONL/Parquet file as a table; errors name the file and the fix."""
    from datasets import load_dataset

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}={str(path)!r}: no such file; give a CSV, TSV, JSON, JSONL or Parquet file")
    suffix = path.suffix.lower()
    if suffix not in BUILDERS:
        raise DataError(
            f"{key}={str(path)!r}: unsupported file type {suffix or '(none)'!r}; use one of "
            f"{', '.join(BUILDERS)} (or save a `datasets` dataset with save_to_disk and set data.dataset)"
        )
    builder, options = BUILDERS[suffix]
    _quiet_datasets()
    try:
        rows = load_dataset(builder, data_files={"data": str(path)}, split="data", **options)
    except Exception as err:  # the parsers raise many types; all mean "this file is malformed"
        if _no_data_lines(path, suffix):  # datasets refuses a header-only file with a riddle
            raise DataError(f"{path} ({key}) holds no rows; give it at least one example") from None
        raise DataError(
            f"{path}: could not read it as {suffix[1:].upper()} ({_first_line(err)}); fix the file"
        ) from err
    return _non_empty(Table(rows, str(path), list(range(1, len(rows) + 1))), key)


def _no_data_lines(path: Path, suffix: str) -> bool:
    """Whether a text file holds no data rows (a CSV/TSV header alone counts as none)."""
    if suffix == ".parquet":
        return False
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        return False
    return len(lines) <= (1 if suffix in (".csv", ".tsv") else 0)


def open_dataset(name: str) -> dict[str, Any]:
    """Split name -> ``datasets.Dataset`` of a save_to_disk directory or a hub dataset."""
    import datasets

    _quiet_datasets()
    local = Path(name).expanduser()
    if local.is_dir():
        try:
            loaded = datasets.load_from_disk(str(local))
        except Exception as err:
            raise DataError(
                f"data.dataset={name!r}: not a directory written by Dataset.save_to_disk or "
                f"DatasetDict.save_to_disk ({_first_line(err)}); save the dataset with one of them"
            ) from err
    elif name.startswith((".", "/", "~")):
        raise DataError(
            f"data.dataset={name!r}: no such directory; give a save_to_disk directory or a hub id"
        )
    else:
        try:
            loaded = datasets.load_dataset(name)
        except Exception as err:  # network, cache or hub errors
            raise DataError(
                f"data.dataset={name!r}: could not load it from the Hugging Face hub "
                f"({_first_line(err)}); offline, save it with save_to_disk and give that directory"
            ) from err
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}  # one split saved on its own is the training data
    return dict(loaded)


def dataset_split(splits: dict[str, Any], dataset: str, split: str, key: str) -> Table:
    """One split of an opened dataset; a missing or empty one is an error naming ``key``."""
    if split not in splits:
        raise DataError(
            f"{key}={split!r}: dataset {dataset!r} has no such split (splits: {', '.join(splits)}); "
            f"set {key} to one of them"
        )
    rows = splits[split]
    return _non_empty(Table(rows, f"dataset {dataset!r} split {split!r}", list(range(1, len(rows) + 1))), key)


def _non_empty(table: Table, key: str) -> Table:
    if len(table) == 0:
        raise DataError(f"{table.name} ({key}) holds no rows; give it at least one example")
    return table


def hold_out(table: Table, fraction: float, seed: int) -> tuple[Table, Table]:
    """(train, validation): a seeded ``fraction`` of the rows (at least one) for validation,
    both in their original order; the same split on every rank and at every world size."""
    n = len(table)
    k = max(1, round(fraction * n))
    if k >= n:
        raise DataError(
            f"data.validation_fraction={fraction} of {table.name}'s {n} rows leaves no training rows; "
            "lower it or give more rows"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return table.select(sorted(order[k:])), table.select(sorted(order[:k]))


def train_and_eval(data: DataConfig, seed: int) -> tuple[Table, Table | None]:
    """The training table and the validation table (None when there is no validation data)."""
    if data.dataset:
        splits = open_dataset(data.dataset)
        train = dataset_split(splits, data.dataset, data.train_split, "data.train_split")
        if data.eval_split:
            evals: Table | None = dataset_split(splits, data.dataset, data.eval_split, "data.eval_split")
        elif data.validation_fraction is None and "validation" in splits:
            evals = dataset_split(splits, data.dataset, "validation", "data.eval_split")
        else:
            evals = None
    else:
        assert data.train_file, "config validation requires a source"
        train = read_file(data.train_file, "data.train_file")
        evals = read_file(data.eval_file, "data.eval_file") if data.eval_file else None
    if evals is None and data.validation_fraction is not None:
        train, evals = hold_out(train, data.validation_fraction, seed)
    if evals is None:
        log.warning("no validation data: set data.eval_file, data.eval_split or data.validation_fraction")
    return train, evals
