"""bench/paper_effect.py's held-out selection rows: outside the training subset, fixed, and the
training subset itself unchanged by them (the earlier studies' runs stay comparable)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ctscale.errors import ConfigError
from ctscale.tasks.glue import load_glue_split

from glue_data import write_glue

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def paper_effect(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import paper_effect

    return paper_effect


def test_heldout_rows_are_outside_the_subset_and_fixed(paper_effect):
    train = paper_effect.train_indices(5000, 256, 0)
    heldout = paper_effect.heldout_indices(5000, 256, 0, 500)
    assert len(set(heldout)) == 500 and not set(heldout) & set(train)
    assert heldout == paper_effect.heldout_indices(5000, 256, 0, 500)  # same rows every call
    assert heldout != paper_effect.heldout_indices(5000, 256, 1, 500)  # the data seed draws them
    # the subset is the one the earlier studies drew (random.Random(data_seed).sample, file order)
    assert train == sorted(random.Random(0).sample(range(5000), 256))


def test_heldout_dir_holds_the_other_training_lines(paper_effect, monkeypatch, tmp_path):
    glue = write_glue(tmp_path / "glue", n_train=200)
    monkeypatch.setattr(paper_effect, "GLUE", glue)
    subset = paper_effect.subset_dir(tmp_path / "work", "sst2", 60, 0)
    held = paper_effect.heldout_dir(tmp_path / "work", "sst2", 60, 0, 50)
    lines = {root: (root / "SST-2" / "train.tsv").read_text().splitlines() for root in (subset, held)}
    full = (glue / "SST-2" / "train.tsv").read_text().splitlines()
    assert lines[subset][0] == lines[held][0] == full[0]  # header kept
    assert len(lines[subset]) == 61 and len(lines[held]) == 51
    assert not set(lines[subset][1:]) & set(lines[held][1:])
    assert set(lines[held][1:]) <= set(full[1:])
    # ctscale reads it as a split, as the study's trainer does
    assert len(load_glue_split("sst2", "train", held).labels) == 50


def test_asking_for_more_heldout_rows_than_remain_names_the_limit(paper_effect):
    with pytest.raises(ConfigError, match="only 44 training rows are outside the 256-row subset"):
        paper_effect.heldout_indices(300, 256, 0, 45)
