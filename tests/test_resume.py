"""Exact resume: 2 steps, preempted, resumed for 2 more == 4 uninterrupted steps.

For every backend and each masking method the resumed run must continue the data order, the
learning-rate schedule, Adam's moments and the CT-F mask sequence exactly: bit for bit against
the uninterrupted run of the same world size (the distributed matrix's run). Checkpoints come
from ``train.save_every=2`` in the shared tiny config.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from conftest import NEEDS, ROWS
from dist_harness import run_world
from dist_workers import stop_then_resume, tiny_overrides, train_attempts

pytestmark = pytest.mark.slow
METHODS = ("ct-f", "ct-d", "ct-r")  # ct-r: its child network is redrawn on resume, no file


def _supported(row: str) -> bool:
    module = NEEDS.get(row)
    if module is None:
        return True
    if importlib.util.find_spec(f"ctscale.backends.{module}") is None:
        return False
    backend = importlib.import_module(f"ctscale.backends.{module}")
    return any(hasattr(c, "save_checkpoint") for c in vars(backend).values() if isinstance(c, type))


def _overrides(row_overrides, root, tiny_bert, glue_dir, method):
    return tiny_overrides(tiny_bert, glue_dir, root / method) + row_overrides + [f"method.name={method}"]


def _assert_bit_identical(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{what}: {name} differs after resume"


@pytest.mark.parametrize("row", ["local", *ROWS])
def test_stop_and_resume_equals_uninterrupted(row, tiny_bert, glue_dir, tmp_path, world, reference):
    if row != "local" and not _supported(row):
        pytest.skip(f"{row}: no checkpoint support yet")
    size, extra = (1, []) if row == "local" else (2, ROWS[row])
    runs = [_overrides(extra, tmp_path, tiny_bert, glue_dir, m) for m in METHODS]
    attempts = dict(zip(METHODS, run_world(stop_then_resume, size, runs)[0]))
    straight = reference if row == "local" else world(row, 2)
    for method, (first, second) in attempts.items():
        assert first["steps"] == [0, 1] and second["steps"] == [2, 3]
        _assert_bit_identical(second["state"], straight[method]["state"], f"{row} x{size} {method}")


@pytest.mark.parametrize("row", ["ddp", "fsdp"])
def test_resume_at_another_world_size(row, tiny_bert, glue_dir, tmp_path, reference):
    """DDP checkpoints hold whole tensors and FSDP2's (torch.distributed.checkpoint) reshard on
    load: stopped with 2 ranks, resumed with 3 (CT-D's mask resharded too); equal to the
    1-process run up to reduction-order rounding. Child-only AdamW too: under FSDP2 its packed
    state is resharded by ``ctscale.storage.child_optim_state``; it must follow dense CT-D's 1-process run."""
    if not _supported(row):
        pytest.skip(f"{row}: no checkpoint support yet")
    runs = {m: _overrides(ROWS[row], tmp_path, tiny_bert, glue_dir, m) for m in METHODS}
    child_only = tiny_overrides(tiny_bert, glue_dir, tmp_path / "ct-d-child-only") + ROWS[row]
    runs["ct-d-child-only"] = [*child_only, "method.name=ct-d", "method.child_only_optimizer=true"]
    first = run_world(train_attempts, 2, list(runs.values()), 2)[0]
    second = run_world(train_attempts, 3, [[*o, "train.resume=true"] for o in runs.values()], None)[0]
    for label, a, b in zip(runs, first, second):
        assert a["steps"] == [0, 1] and b["steps"] == [2, 3]
        want = reference["ct-d" if label == "ct-d-child-only" else label]["state"]
        diff = max((b["state"][k] - v).abs().max().item() for k, v in want.items())
        assert diff <= 5e-6, f"{row} {label}: max |w - w_1proc| = {diff:.3g}"
