"""GLUE loading: each task's original TSV layout, the real files, bad inputs, tokenize."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctscale.errors import DataError
from ctscale.tasks import (
    GLUE_TASKS,
    Examples,
    default_glue_dir,
    get_task,
    load_glue_split,
    pad_collate,
    tokenize,
)

from glue_data import MNLI_DEV_HEADER, MNLI_TRAIN_HEADER, STSB_HEADER, TASK_DIRS, write_glue, write_tsv


def mnli_rows(i: int, s1: str, s2: str, gold: str, dev: bool) -> list[str]:
    """Return one MNLI row: parses in the middle, sentences at 8/9, gold_label last."""
    annotator_labels = [gold] * (5 if dev else 1)
    meta = [
        str(i),
        "31193",
        f"{i}n",
        "fiction",
        "( x )",
        "( y )",
        "(ROOT x)",
        "(ROOT y)",
    ]
    return meta + [s1, s2] + annotator_labels + [gold]


@pytest.fixture
def glue_root(tmp_path: Path) -> Path:
    """A miniature GLUE root with all 9 tasks in their original layouts."""
    root = tmp_path / "glue"
    # CoLA: no header; source, label, original mark, sentence (unbalanced quote).
    write_tsv(
        root / "CoLA" / "train.tsv",
        [
            ["gj04", "1", "", "Our friends won't buy this analysis."],
            ["gj04", "0", "*", 'They drank the pub "dry.'],
        ],
    )
    write_tsv(root / "CoLA" / "dev.tsv", [["cj99", "1", "", "The sailors rode the breeze."]])
    sst = [
        ["sentence", "label"],
        ["hide new secretions ", "0"],
        ["a patient viewer ", "1"],
    ]
    write_tsv(root / "SST-2" / "train.tsv", sst)
    write_tsv(root / "SST-2" / "dev.tsv", sst)
    mrpc = [
        ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
        ["1", "702876", "702977", 'He said " the witness " .', "Referring to him ."],
        ["0", "2108705", "2108831", "Yucaipa owned it .", "Yucaipa bought it ."],
    ]
    write_tsv(root / "MRPC" / "train.tsv", mrpc, bom=True)
    write_tsv(root / "MRPC" / "dev.tsv", mrpc, bom=True)
    stsb = [
        STSB_HEADER,
        [
            "0",
            "main-captions",
            "MSRvid",
            "2012test",
            "0001",
            "none",
            "none",
            "A plane.",
            "An air plane.",
            "5.000",
        ],
        [
            "1",
            "main-news",
            "MSRpar",
            "2012test",
            "0004",
            "none",
            "none",
            "A man.",
            "A woman.",
            "0.5",
        ],
    ]
    write_tsv(root / "STS-B" / "train.tsv", stsb)
    write_tsv(root / "STS-B" / "dev.tsv", stsb)
    qqp = [
        ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        ["133273", "213221", "213222", "How is life?", "How's life?", "1"],
        ["402555", "536040", "536041", "What is AI?", "Who is Bob?", "0"],
    ]
    write_tsv(root / "QQP" / "train.tsv", qqp)
    write_tsv(root / "QQP" / "dev.tsv", qqp)
    write_tsv(
        root / "MNLI" / "train.tsv",
        [
            MNLI_TRAIN_HEADER,
            mnli_rows(0, "Conceptually cream.", "Cream is.", "neutral", False),
        ],
    )
    write_tsv(
        root / "MNLI" / "dev_matched.tsv",
        [
            MNLI_DEV_HEADER,
            mnli_rows(0, "The new rights.", "Rights are new.", "entailment", True),
            mnli_rows(1, "It is dark.", "It is bright.", "contradiction", True),
        ],
    )
    write_tsv(
        root / "MNLI" / "dev_mismatched.tsv",
        [MNLI_DEV_HEADER, mnli_rows(0, "Your gift.", "You gave.", "neutral", True)],
    )
    qnli = [
        ["index", "question", "sentence", "label"],
        ["0", "When?", "In 1990.", "entailment"],
        ["1", "Who?", "Nobody knows.", "not_entailment"],
    ]
    write_tsv(root / "QNLI" / "train.tsv", qnli)
    write_tsv(root / "QNLI" / "dev.tsv", qnli)
    rte = [
        ["index", "sentence1", "sentence2", "label"],
        ["0", "No weapons found.", "Weapons found.", "not_entailment"],
        ["1", 'A "place" of sorrow.', "A place.", "entailment"],
    ]
    write_tsv(root / "RTE" / "train.tsv", rte)
    write_tsv(root / "RTE" / "dev.tsv", rte)
    wnli = [
        ["index", "sentence1", "sentence2", "label"],
        ["0", "I stuck a pin.", "The pin had a hole.", "0"],
        ["1", "John is short.", "John is so short.", "1"],
    ]
    write_tsv(root / "WNLI" / "train.tsv", wnli)
    write_tsv(root / "WNLI" / "dev.tsv", wnli)
    return root


# (task, split, text_a, text_b, labels) as each fixture file should parse.
EXPECTED = [
    (
        "cola",
        "train",
        ["Our friends won't buy this analysis.", 'They drank the pub "dry.'],
        None,
        [1, 0],
    ),
    ("cola", "validation", ["The sailors rode the breeze."], None, [1]),
    ("sst-2", "train", ["hide new secretions", "a patient viewer"], None, [0, 1]),
    (
        "MRPC",
        "dev",
        ['He said " the witness " .', "Yucaipa owned it ."],
        ["Referring to him .", "Yucaipa bought it ."],
        [1, 0],
    ),
    (
        "sts-b",
        "train",
        ["A plane.", "A man."],
        ["An air plane.", "A woman."],
        [5.0, 0.5],
    ),
    (
        "qqp",
        "validation",
        ["How is life?", "What is AI?"],
        ["How's life?", "Who is Bob?"],
        [1, 0],
    ),
    ("mnli", "train", ["Conceptually cream."], ["Cream is."], [2]),
    (
        "mnli",
        "validation_matched",
        ["The new rights.", "It is dark."],
        ["Rights are new.", "It is bright."],
        [1, 0],
    ),
    ("mnli", "validation_mismatched", ["Your gift."], ["You gave."], [2]),
    ("qnli", "train", ["When?", "Who?"], ["In 1990.", "Nobody knows."], [0, 1]),
    (
        "rte",
        "dev",
        ["No weapons found.", 'A "place" of sorrow.'],
        ["Weapons found.", "A place."],
        [1, 0],
    ),
    (
        "wnli",
        "train",
        ["I stuck a pin.", "John is short."],
        ["The pin had a hole.", "John is so short."],
        [0, 1],
    ),
]


@pytest.mark.parametrize(("task", "split", "text_a", "text_b", "labels"), EXPECTED)
def test_each_task_layout_parses(glue_root, task, split, text_a, text_b, labels):
    ex = load_glue_split(task, split, glue_root)
    assert ex.text_a == text_a
    assert ex.text_b == text_b
    assert ex.labels == labels
    assert all(type(y) is type(labels[0]) for y in ex.labels)  # int ids vs float scores


def test_task_registry():
    assert set(GLUE_TASKS) == {
        "cola",
        "sst2",
        "mrpc",
        "stsb",
        "qqp",
        "mnli",
        "qnli",
        "rte",
        "wnli",
    }
    assert get_task("STS-B") is get_task("stsb") is GLUE_TASKS["stsb"]
    assert get_task("SST-2") is get_task("sst2")
    stsb, mnli, rte = get_task("stsb"), get_task("mnli"), get_task("rte")
    assert (stsb.is_regression, stsb.num_labels, stsb.label_list) == (True, 1, None)
    assert stsb.metrics == ("pearson", "spearman")
    assert mnli.num_labels == 3
    assert mnli.eval_splits == ("validation_matched", "validation_mismatched")
    assert rte.label_list == ("entailment", "not_entailment") and rte.eval_splits == ("validation",)
    assert get_task("cola").metrics == ("mcc",) and get_task("qqp").metrics == (
        "accuracy",
        "f1",
    )


def test_examples_subset():
    ex = Examples(["a", "b", "c"], ["x", "y", "z"], [0, 1, 0])
    sub = ex.subset([2, 0])
    assert (sub.text_a, sub.text_b, sub.labels, len(sub)) == (
        ["c", "a"],
        ["z", "x"],
        [0, 0],
        2,
    )
    assert Examples(["a"], None, [1.5]).subset([0]).text_b is None
    with pytest.raises(ValueError):
        Examples(["a", "b"], None, [1])


def test_qqp_skips_few_malformed_rows_but_not_many(tmp_path):
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    good = [[str(i), "1", "2", f"q{i}?", f"p{i}?", str(i % 2)] for i in range(199)]
    write_tsv(
        tmp_path / "QQP" / "train.tsv",
        [header, *good[:50], ["7", "broken row"], *good[50:]],
    )
    ex = load_glue_split("qqp", "train", tmp_path)
    assert len(ex) == 199 and ex.text_a[50] == "q50?" and ex.labels[:3] == [0, 1, 0]

    bad = [["x", "short"]] * 3  # 3 of 100 rows = 3% > 1%
    write_tsv(tmp_path / "QQP" / "dev.tsv", [header, *good[:97], *bad])
    with pytest.raises(DataError, match=r"3 of 100 rows do not have 6 columns"):
        load_glue_split("qqp", "dev", tmp_path)


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_synthetic_glue_has_every_layout_and_split(tmp_path, task):
    """The tests' own GLUE (tests/glue_data.py) parses like the real files, every split."""
    root = write_glue(tmp_path, n_train=20, n_dev=6)
    assert sorted(p.name for p in root.iterdir()) == sorted(TASK_DIRS)
    t = get_task(task)
    train = load_glue_split(task, "train", root)
    assert len(train) == 20
    for split in t.eval_splits:
        assert len(load_glue_split(task, split, root)) == 6
    if t.is_regression:
        assert all(0.0 <= y <= 5.0 for y in train.labels)
    else:  # both classes (all three for MNLI) occur, so a classifier has something to learn
        assert set(train.labels) == set(range(t.num_labels))


# --- real data (read-only shared copy) ----------------------------------------

# MRPC train: the shared README (and GLUE) say 3,668 rows, but the shared train.tsv
# has only 3,667 data lines (3,668 lines including the header, every line with 5 columns).
REAL_COUNTS = [
    ("rte", 2490, 277),
    ("mrpc", 3667, 408),
    ("sst2", 67349, 872),
    ("wnli", 635, 71),
]


@pytest.mark.slow  # reads ../shared: not in the unit set, which runs in a plain clone
@pytest.mark.parametrize(("task", "n_train", "n_dev"), REAL_COUNTS)
def test_real_glue_row_counts(real_glue_dir, task, n_train, n_dev):
    assert len(load_glue_split(task, "train", real_glue_dir)) == n_train
    assert len(load_glue_split(task, "validation", real_glue_dir)) == n_dev


@pytest.mark.slow  # reads ../shared
def test_real_glue_contents(real_glue_dir):
    rte = load_glue_split("rte", "dev", real_glue_dir)
    assert rte.text_b[0] == "Christopher Reeve had an accident."
    assert rte.labels[0] == 1  # not_entailment
    assert rte.labels.count(0) == 146  # entailment rows in RTE dev
    mrpc = load_glue_split("mrpc", "dev", real_glue_dir)  # header starts with a BOM
    assert mrpc.labels.count(1) == 279
    assert mrpc.text_b[0].startswith('" The foodservice pie business')  # quote kept verbatim
    sst = load_glue_split("sst2", "dev", real_glue_dir)
    assert sst.text_a[0] == "it 's a charming and often affecting journey ."
    assert sst.text_b is None and sst.labels.count(1) == 444


# --- bad inputs ------------------------------------------------------------


def test_unknown_task_lists_valid_ones():
    with pytest.raises(DataError, match=r"unknown GLUE task 'squad'.*cola, sst2, mrpc, stsb"):
        get_task("squad")


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match=r"does not exist"):
        load_glue_split("rte", "train", tmp_path / "nope")


def test_missing_task_directory(glue_root):
    (glue_root / "RTE" / "train.tsv").unlink()
    (glue_root / "RTE" / "dev.tsv").unlink()
    (glue_root / "RTE").rmdir()
    with pytest.raises(DataError, match=r"no RTE/ directory .*found: CoLA"):
        load_glue_split("rte", "train", glue_root)


def test_missing_split_file(glue_root):
    (glue_root / "WNLI" / "dev.tsv").unlink()
    with pytest.raises(DataError, match=r"dev\.tsv not found.*train\.tsv"):
        load_glue_split("wnli", "validation", glue_root)


def test_unknown_split(glue_root):
    with pytest.raises(DataError, match=r"unknown split 'test'.*train, validation"):
        load_glue_split("rte", "test", glue_root)
    # MNLI has two dev sets, so plain "validation" is ambiguous.
    with pytest.raises(DataError, match=r"validation_matched, validation_mismatched"):
        load_glue_split("mnli", "validation", glue_root)


def test_wrong_columns(glue_root):
    # An SST-2 file put where RTE belongs: no sentence1 column.
    write_tsv(glue_root / "RTE" / "train.tsv", [["sentence", "label"], ["good", "1"]])
    with pytest.raises(DataError, match=r"no column 'sentence1' \(header: sentence, label\)"):
        load_glue_split("rte", "train", glue_root)


def test_empty_file_and_header_only(glue_root):
    (glue_root / "RTE" / "train.tsv").write_text("")
    with pytest.raises(DataError, match=r"train\.tsv is empty"):
        load_glue_split("rte", "train", glue_root)
    write_tsv(glue_root / "RTE" / "dev.tsv", [["index", "sentence1", "sentence2", "label"]])
    with pytest.raises(DataError, match=r"header but no data rows"):
        load_glue_split("rte", "dev", glue_root)


def test_unknown_label(glue_root):
    rows = [
        ["index", "sentence1", "sentence2", "label"],
        ["0", "a", "b", "contradiction"],
    ]
    write_tsv(glue_root / "RTE" / "train.tsv", rows)
    with pytest.raises(DataError, match=r"line 2: label 'contradiction' is not one of rte's"):
        load_glue_split("rte", "train", glue_root)


def test_bad_regression_score(glue_root):
    row = ["0", "g", "f", "2012", "1", "none", "none", "a", "b", "7.5"]
    write_tsv(glue_root / "STS-B" / "dev.tsv", [STSB_HEADER, row])
    with pytest.raises(DataError, match=r"score '7.5' is not a number in \[0, 5\]"):
        load_glue_split("stsb", "dev", glue_root)


def test_cola_with_a_header_is_rejected(glue_root):
    write_tsv(glue_root / "CoLA" / "dev.tsv", [["source", "label", "mark", "sentence"]])
    with pytest.raises(DataError, match=r"line 1: label 'label'"):
        load_glue_split("cola", "dev", glue_root)


def test_default_glue_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CTSCALE_GLUE_DIR", str(tmp_path))
    assert default_glue_dir() == tmp_path.resolve()
    # A missing $CTSCALE_GLUE_DIR falls through to the paths next to cwd and the repo.
    monkeypatch.setenv("CTSCALE_GLUE_DIR", str(tmp_path / "missing"))
    monkeypatch.chdir(tmp_path)
    beside_repo = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "glue"
    expected = beside_repo.resolve() if beside_repo.is_dir() else None
    assert default_glue_dir() == expected


# --- tokenization ----------------------------------------------------------

VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "a",
]


@pytest.fixture
def bert_tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast.from_pretrained(str(tmp_path))


def test_tokenize_pairs_pads_to_longest(bert_tokenizer):
    ex = Examples(["the cat", "a cat sat"], ["sat", "on the mat"], [1, 0])
    batch = tokenize(ex, bert_tokenizer, max_length=32)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    # [CLS] a cat sat [SEP] on the mat [SEP] = 9; the short row is padded with [PAD]=0.
    assert batch["input_ids"].tolist() == [
        [2, 5, 6, 3, 7, 3, 0, 0, 0],
        [2, 10, 6, 7, 3, 8, 5, 9, 3],
    ]
    assert batch["attention_mask"].tolist()[0] == [1] * 6 + [0] * 3
    assert batch["token_type_ids"].tolist()[1] == [0] * 5 + [1] * 4
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]


def test_tokenize_truncates_and_regression_labels(bert_tokenizer):
    ex = Examples(["the cat sat on the mat", "a"], None, [4.5, 0.25])
    batch = tokenize(ex, bert_tokenizer, max_length=4)
    assert batch["input_ids"].tolist() == [[2, 5, 6, 3], [2, 10, 3, 0]]
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [4.5, 0.25]


def test_tokenize_decoder_without_pad_token_uses_eos():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": 0, "<unk>": 1, "the": 2, "cat": 3, "sat": 4}
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
    assert tok.pad_token is None
    batch = tokenize(Examples(["the cat sat", "cat"], None, [0, 1]), tok, max_length=8)
    assert tok.pad_token == "<eos>"
    assert batch["input_ids"].tolist() == [[2, 3, 4], [3, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "token_type_ids" not in batch


def test_tokenize_rejects_empty(bert_tokenizer):
    with pytest.raises(DataError, match="empty"):
        tokenize(Examples([], None, []), bert_tokenizer, max_length=8)


def test_pad_collate():
    rows = [
        {
            "input_ids": torch.tensor([5, 6, 7]),
            "attention_mask": torch.ones(3, dtype=torch.long),
            "labels": torch.tensor(1),
        },
        {
            "input_ids": torch.tensor([8]),
            "attention_mask": torch.ones(1, dtype=torch.long),
            "labels": torch.tensor(0),
        },
    ]
    batch = pad_collate(rows, pad_id=9)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]


# --- hub path (load_dataset replaced by an in-memory dataset) ----------------------------------


def test_hub_labels_are_mapped_to_tsv_label_order(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        names = ["entailment", "neutral", "contradiction"]  # the hub's MNLI order
        features = datasets.Features(
            {
                "premise": datasets.Value("string"),
                "hypothesis": datasets.Value("string"),
                "label": datasets.ClassLabel(names=names),
            }
        )
        data = {"premise": ["p0 ", "p1", "p2"], "hypothesis": ["h0", "h1", "h2"], "label": [0, 1, 2]}
        return datasets.Dataset.from_dict(data, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ex = load_glue_split("mnli", "validation_mismatched", None)
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert ex.text_a == ["p0", "p1", "p2"] and ex.text_b == ["h0", "h1", "h2"]
    # label_list is (contradiction, entailment, neutral)
    assert ex.labels == [1, 2, 0]


def test_hub_failure_is_a_data_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not load GLUE rte/validation.*no internet"):
        load_glue_split("rte", "dev", None)
