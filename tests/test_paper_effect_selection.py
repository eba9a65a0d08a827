"""bench/plot_paper_effect.py's per-method selection: held-out accuracy chooses, dev never does, and
only the seeds every configuration finished count."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ppe(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import plot_paper_effect

    return plot_paper_effect


def run(method, p, lr, seed, heldout, dev, share=0.5):
    return {
        "tag": "lr-grid", "task": "sst2", "train_samples": 256, "method": method, "p": p, "lr": lr,
        "seed": seed, "heldout": {"accuracy": heldout},
        "dev": {"accuracy": dev, "pred_share": [share, 1 - share]},
    }  # fmt: skip


def test_selection_uses_heldout_and_complete_seeds(ppe):
    rows = [
        # vanilla: lr 2e-4 is better on held-out, lr 1e-4 on dev
        *(run("vanilla", None, 1e-4, s, 0.70, 0.80) for s in (0, 1)),
        *(run("vanilla", None, 2e-4, s, 0.75, 0.70) for s in (0, 1)),
        # CT-D p 0.1 wins on held-out only through seed 2, which p 0.3 never finished
        *(run("ct-d", 0.3, 4e-4, s, 0.74, 0.74) for s in (0, 1)),
        *(run("ct-d", 0.1, 4e-4, s, h, 0.60) for s, h in ((0, 0.70), (1, 0.70), (2, 0.99))),
    ]
    grid = ppe.cells(rows, {"lr-grid"}, 256)
    seeds = ppe.complete_seeds(grid)
    assert seeds == [0, 1]
    assert ppe.select(grid, seeds) == {"vanilla": ("vanilla", None, 2e-4), "ct-d": ("ct-d", 0.3, 4e-4)}


def test_collapse_is_one_class_for_95_percent_of_dev(ppe):
    assert ppe.collapsed(run("ct-f", 0.1, 1e-4, 0, 0.5, 0.51, share=0.96))
    assert ppe.collapsed(run("ct-f", 0.1, 1e-4, 0, 0.5, 0.51, share=0.04))
    assert not ppe.collapsed(run("ct-f", 0.1, 1e-4, 0, 0.5, 0.51, share=0.9))
