"""Your own classification/regression data: every file format, a `datasets` dataset, column
mapping, discovered labels (in the exported model), validation fraction, metrics, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from transformers import AutoConfig, AutoTokenizer

from ctscale.config import load_config
from ctscale.errors import ConfigError, DataError
from ctscale.tasks import compute_metrics
from ctscale.tasks.sources import dataset_split
from ctscale.tasks.tabular import load_tabular, make_task
from ctscale.trainer import Trainer

WORDS = {"pos": ["good", "great", "fine", "lovely"], "neg": ["bad", "awful", "poor", "grim"]}


def review_rows(n: int, offset: int = 0, labels=("neg", "pos", "meh")) -> dict[str, list]:
    """``review`` / ``sentiment`` rows: the label is readable from the words (learnable)."""
    review, sentiment = [], []
    for i in range(offset, offset + n):
        label = labels[i % len(labels)]
        words = WORDS.get(label, ["so", "so"])
        review.append(f"a {words[i % len(words)]} film, {words[(i + 1) % len(words)]} acting {i}")
        sentiment.append(label)
    return {"review": review, "sentiment": sentiment}


def write_table(path: Path, columns: dict[str, list]) -> Path:
    """``columns`` as a CSV, TSV, JSON (array), JSONL or Parquet file, by ``path``'s suffix."""
    ds = Dataset.from_dict(columns)
    suffix = path.suffix
    if suffix == ".csv":
        ds.to_csv(path, index=False)
    elif suffix == ".tsv":
        ds.to_csv(path, index=False, sep="\t")
    elif suffix == ".jsonl":
        ds.to_json(path)
    elif suffix == ".json":
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        path.write_text(json.dumps(rows))
    else:
        ds.to_parquet(path)
    return path


def table_cfg(train: Path | str, *extra: str, task: str = "classification"):
    return load_config(
        None,
        [
            f"data.task={task}",
            f"data.train_file={train}",
            "data.text_column=review",
            "data.label_column=sentiment",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    return AutoTokenizer.from_pretrained(tiny_bert)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_every_file_format_gives_the_same_examples(tmp_path, tokenizer, suffix):
    train = write_table(tmp_path / f"train{suffix}", review_rows(12))
    dev = write_table(tmp_path / f"dev{suffix}", review_rows(6, offset=50))
    data = load_tabular(table_cfg(train, f"data.eval_file={dev}"), tokenizer)
    assert data.task.label_list == ("meh", "neg", "pos")  # discovered, sorted
    assert data.train.text_a == review_rows(12)["review"]
    assert data.train.labels == [1, 2, 0] * 4
    assert data.evals["validation"].labels == [0, 1, 2] * 2  # rows 50.. start at "meh"
    assert data.eval_splits == ("validation",)


def test_integer_labels_sort_numerically_and_pairs(tmp_path, tokenizer):
    rows = {"a": [f"x{i}" for i in range(9)], "b": [f"y{i}" for i in range(9)], "y": [10, 2, 0] * 3}
    train = write_table(tmp_path / "t.csv", rows)
    cfg = load_config(
        None,
        [
            "data.task=classification",
            f"data.train_file={train}",
            "data.text_column=a",
            "data.text_pair_column=b",
            "data.label_column=y",
        ],
    )
    data = load_tabular(cfg, tokenizer)
    assert data.task.label_list == ("0", "2", "10") and data.train.labels == [2, 1, 0] * 3
    assert data.train.text_b == rows["b"]
    batch = data.train_batch(__import__("torch").arange(3), None, 1)
    assert "token_type_ids" in batch and batch["labels"].tolist() == [2, 1, 0]


def test_validation_fraction_is_seeded_and_disjoint(tmp_path, tokenizer):
    train = write_table(tmp_path / "t.jsonl", review_rows(20))
    cfg = table_cfg(train, "data.validation_fraction=0.25")
    a, b = load_tabular(cfg, tokenizer), load_tabular(cfg, tokenizer)
    held = a.evals["validation"].text_a
    assert len(held) == 5 and len(a.train) == 15 and held == b.evals["validation"].text_a
    assert not set(held) & set(a.train.text_a)
    cfg.train.seed = 7
    assert load_tabular(cfg, tokenizer).evals["validation"].text_a != held


def test_datasets_directory_with_class_label_and_validation_split(tmp_path, tokenizer):
    features = Features({"review": Value("string"), "sentiment": ClassLabel(names=["pos", "neg"])})
    rows = review_rows(8, labels=("neg", "pos"))
    ds = DatasetDict(
        train=Dataset.from_dict(rows, features=features),
        validation=Dataset.from_dict(review_rows(4, offset=9, labels=("neg", "pos")), features=features),
    )
    ds.save_to_disk(tmp_path / "ds")
    cfg = load_config(
        None,
        [
            "data.task=classification",
            f"data.dataset={tmp_path / 'ds'}",
            "data.text_column=review",
            "data.label_column=sentiment",
        ],
    )
    data = load_tabular(cfg, tokenizer)
    assert data.task.label_list == ("pos", "neg")  # ClassLabel order kept
    assert data.train.labels == [1, 0] * 4 and len(data.evals["validation"]) == 4
    cfg.data.eval_split = "test"
    with pytest.raises(
        DataError, match=r"data.eval_split='test'.*no such split \(splits: train, validation\)"
    ):
        load_tabular(cfg, tokenizer)


def test_regression_scores_and_metrics(tmp_path, tokenizer):
    rows = {"review": [f"text {i}" for i in range(6)], "sentiment": [0.5, 1.0, 2.25, 3, 4.5, 5.0]}
    train = write_table(tmp_path / "r.parquet", rows)
    data = load_tabular(table_cfg(train, task="regression"), tokenizer)
    assert data.task.is_regression and data.train.labels == [0.5, 1.0, 2.25, 3.0, 4.5, 5.0]
    out = compute_metrics(data.task, [1.0, 2.0, 3.0], [1.0, 2.5, 2.9])
    assert set(out) == {"pearson", "spearman", "main"} and out["spearman"] == pytest.approx(1.0)


def test_classification_metrics_accuracy_macro_f1_mcc():
    task = make_task("classification", ("a", "b", "c"), ("validation",))
    out = compute_metrics(task, [0, 1, 2, 2], [0, 1, 1, 2])
    assert out["accuracy"] == 0.75 and out["main"] == 0.75  # headline: accuracy
    # per class F1: a 1, b 2/3, c 2/3
    assert out["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert -1 <= out["mcc"] <= 1 and out["mcc"] > 0.6


def test_trains_and_exports_the_labels(tiny_bert, tmp_path):
    train = write_table(tmp_path / "train.csv", review_rows(24, labels=("pos", "neg")))
    out = tmp_path / "run"
    cfg = table_cfg(
        train,
        "data.validation_fraction=0.25",
        f"model.name_or_path={tiny_bert}",
        f"train.output_dir={out}",
        "train.batch_size=6",
        "train.max_steps=3",
        "train.tensorboard=false",
    )
    metrics = Trainer(cfg).run()["validation"]
    assert set(metrics) == {"accuracy", "macro_f1", "mcc", "main"}
    config = AutoConfig.from_pretrained(out / "model")
    assert config.id2label == {0: "neg", 1: "pos"}
    assert config.label2id == {"neg": 0, "pos": 1}


# -- bad input: one error naming the file, row and column ------------------------------------
def test_missing_column_names_the_file_and_the_key(tmp_path, tokenizer):
    train = write_table(tmp_path / "t.csv", review_rows(6))
    cfg = table_cfg(train, "data.label_column=stars")
    with pytest.raises(
        DataError, match=r"t.csv has no column 'stars' \(columns: review, sentiment\); set data.label_column"
    ):
        load_tabular(cfg, tokenizer)


def test_unknown_label_at_evaluation_names_the_row(tmp_path, tokenizer):
    train = write_table(tmp_path / "t.csv", review_rows(6))
    dev = write_table(tmp_path / "d.csv", {"review": ["a", "b", "c"], "sentiment": ["pos", "neg", "great"]})
    with pytest.raises(
        DataError,
        match=r"d.csv, row 3, column 'sentiment': unknown label 'great'; the model knows meh, neg, pos",
    ):
        load_tabular(table_cfg(train, f"data.eval_file={dev}"), tokenizer)


@pytest.mark.parametrize(
    "columns,match",
    [
        ({"review": ["a", "", "c"], "sentiment": ["x", "y", "x"]}, r"row 2, column 'review': expected text"),
        (
            {"review": ["a", "b", "c"], "sentiment": [1.0, 2.5, 1.0]},
            r"row 2, column 'sentiment': label 2.5 has a fraction",
        ),
        ({"review": ["a", "b"], "sentiment": ["x", "x"]}, r"only one label value \(x\)"),
    ],
)
def test_bad_rows_are_named(tmp_path, tokenizer, columns, match):
    train = write_table(tmp_path / "t.jsonl", columns)
    with pytest.raises(DataError, match=match):
        load_tabular(table_cfg(train), tokenizer)


def test_empty_or_unreadable_files(tmp_path, tokenizer):
    empty = tmp_path / "empty.csv"
    empty.write_text("review,sentiment\n")
    with pytest.raises(DataError, match=r"empty.csv \(data.train_file\) holds no rows"):
        load_tabular(table_cfg(empty), tokenizer)
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_tabular(table_cfg(tmp_path / "x.txt"), tokenizer)
    with pytest.raises(DataError, match="no such file"):
        load_tabular(table_cfg(tmp_path / "absent.csv"), tokenizer)
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match=r"bad.parquet: could not read it as PARQUET"):
        load_tabular(table_cfg(bad), tokenizer)


def test_config_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="reads exactly one of data.train_file"):
        load_config(None, ["data.task=classification"])
    with pytest.raises(ConfigError, match="reads exactly one of data.train_file"):
        load_config(None, ["data.task=regression", "data.train_file=a.csv", "data.dataset=x/y"])
    with pytest.raises(ConfigError, match="keep one of them"):
        load_config(
            None,
            [
                "data.task=chat",
                "data.train_file=a.jsonl",
                "data.eval_file=b.jsonl",
                "data.validation_fraction=0.1",
            ],
        )
    with pytest.raises(ConfigError, match="data.dataset is read only by data.task"):
        load_config(None, ["data.task=rte", "data.dataset=x/y"])
    with pytest.raises(ConfigError, match=r"data.validation_fraction must be null or in \(0, 1\)"):
        load_config(None, ["data.task=chat", "data.train_file=a.jsonl", "data.validation_fraction=1.0"])


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            ["data.task=jsonl", "data.train_file=a.jsonl", "data.dataset=x/y"],
            "data.dataset='x/y' is read only by",
        ),
        (
            ["data.task=jsonl", "data.train_file=a.jsonl", "data.validation_fraction=0.1"],
            "validation_fraction",
        ),
        (["data.task=rte", "data.overlong=drop"], "data.overlong='drop' is read only by data.task 'chat'"),
        (["data.task=chat", "data.train_file=a.jsonl", "data.label_column=y"], "data.label_column='y'"),
    ],
)
def test_keys_another_task_would_ignore_are_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
    load_config(None, ["data.task=rte", "data.text_column=sentence"])  # GLUE: `ctscale predict` reads it


def test_dataset_errors_name_the_dataset(tmp_path, tokenizer):
    offline = load_config(None, ["data.task=classification", "data.dataset=nobody/no-such-dataset"])
    with pytest.raises(
        DataError, match=r"data.dataset='nobody/no-such-dataset': could not load it .*save_to_disk"
    ):
        load_tabular(offline, tokenizer)
    empty = {"train": Dataset.from_dict({"text": [], "label": []})}  # (datasets cannot save this)
    with pytest.raises(DataError, match=r"dataset 'mine' split 'train' \(data.train_split\) holds no rows"):
        dataset_split(empty, "mine", "train", "data.train_split")
    (tmp_path / "plain").mkdir()
    cfg = load_config(None, ["data.task=classification", f"data.dataset={tmp_path / 'plain'}"])
    with pytest.raises(DataError, match="not a directory written by Dataset.save_to_disk"):
        load_tabular(cfg, tokenizer)


def test_a_checkpoint_whose_head_has_another_size_is_one_error(tiny_bert, tmp_path):
    train = write_table(tmp_path / "t.csv", review_rows(18))  # 3 classes; tiny_bert's head has 2
    cfg = table_cfg(train, f"model.name_or_path={tiny_bert}", f"train.output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=r"classification head whose size is not this task's 3 output\(s\)"):
        Trainer(cfg).prepare()
