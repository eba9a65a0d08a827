"""Every distributed backend against the single-process run, on the same global batches.

One row per backend (DDP, DeepSpeed ZeRO-1/2/3, FSDP2); each row runs worlds of 2 and 3
processes (3 gives uneven shards and ZeRO padding), each world running vanilla, CT-F, CT-D and
CT-R (the fixed random child network) in one process group. Checked for every row, world and method:
- final weights equal the single-process weights within ATOL;
- the CT-D child network equals the single-process one exactly;
- with weight decay 0, every non-child entry of a candidate tensor is bit-identical to the
  pretrained value, and child entries moved;
- collectives per training step are the same with masking as without;
- a mask written by the 2-process world trains the same at world size 3 and 1.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ctscale.storage import mask_file

from conftest import METHODS, NEEDS, ROWS
from dist_harness import run_world
from dist_workers import logged_run, tiny_overrides, train_runs

pytestmark = pytest.mark.slow

# Adam normalises steps, so a gradient that differs by reduction-order rounding moves a weight
# by at most ~lr * rounding; 4 steps at lr 1e-3 stay far below this.
ATOL = 5e-6


def _available(row: str) -> bool:
    module = NEEDS.get(row)
    return module is None or importlib.util.find_spec(f"ctscale.backends.{module}") is not None


def _mask_bits(path) -> dict[str, torch.Tensor]:
    info = mask_file.read_info(path)
    wanted = [(n, s, 0, math.prod(s)) for n, s in info.shapes.items()]
    return {name: bits for (name, _), bits in mask_file.load_mask(path, wanted).items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("row", list(ROWS))
def test_matches_single_process(row, size, world, reference, tiny_bert):
    if not _available(row):
        pytest.skip(f"backend for {row} not built yet")
    got = world(row, size)
    for method in METHODS:
        diff = _max_diff(got[method]["state"], reference[method]["state"])
        assert diff <= ATOL, f"{row} x{size} {method}: max |w - w_1proc| = {diff:.3g} > {ATOL}"

    # one global child network, whatever the world size or backend
    ref_mask = _mask_bits(reference["root"] / "ct-d" / "mask.safetensors")
    mask = _mask_bits(got["root"] / "ct-d" / "mask")
    assert mask.keys() == ref_mask.keys()
    assert all(torch.equal(mask[n], ref_mask[n]) for n in mask)

    # weight decay 0: non-child entries of candidate tensors never move; child entries do
    pretrained = load_file(tiny_bert / "model.safetensors")
    final = got["ct-d"]["state"]
    moved = 0
    for name, keep in mask.items():
        before, after = pretrained[name].float().reshape(-1), final[name].reshape(-1)
        assert torch.equal(after[~keep], before[~keep]), f"{name}: a non-child entry changed"
        moved += int((after[keep] != before[keep]).sum())
    assert moved > 0.9 * sum(int(m.sum()) for m in mask.values())

    # masking adds no collective: steady-state step (the first ones may rebuild buckets)
    plain = got["vanilla"]["collectives_per_step"][-1]
    for method in METHODS[1:]:
        assert got[method]["collectives_per_step"][-1] == plain, (row, size, method)

    if size == 3:  # the 2-rank mask, resharded to 3 ranks, trains like the 1-rank Fisher run
        diff = _max_diff(got["ct-d-file"]["state"], reference["ct-d"]["state"])
        assert diff <= ATOL


@pytest.mark.parametrize("row", list(ROWS))
def test_world2_mask_loads_at_world1(row, world, reference, tiny_bert, glue_dir, tmp_path):
    if not _available(row):
        pytest.skip(f"backend for {row} not built yet")
    mask_dir = world(row, 2)["root"] / "ct-d" / "mask"
    overrides = tiny_overrides(tiny_bert, glue_dir, tmp_path) + [
        "method.name=ct-d",
        f"method.mask_file={mask_dir}",
    ]
    result = run_world(train_runs, 1, [overrides])[0][0]
    assert _max_diff(result["state"], reference["ct-d"]["state"]) <= ATOL


def _export_overrides(tiny_bert, glue_dir, out) -> list[str]:
    return tiny_overrides(tiny_bert, glue_dir, out) + ["train.save_model=true", "train.log_every=1"]


def _logged(out) -> tuple[list[float], list[str], list[float]]:
    """(train loss per step from metrics.jsonl, key names of the exported model.safetensors,
    the pre-clip gradient norm per step)."""
    from safetensors import safe_open

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as fh:
        keys = sorted(fh.keys())
    train = [r for r in records if r["event"] == "train"]
    return [r["loss"] for r in train], keys, [r["grad_norm"] for r in train]


@pytest.fixture(scope="module")
def one_process_export(tiny_bert, glue_dir, tmp_path_factory):
    from ctscale.config import load_config
    from ctscale.trainer import Trainer

    out = tmp_path_factory.mktemp("export1")
    Trainer(load_config(None, _export_overrides(tiny_bert, glue_dir, out))).run()
    return _logged(out)


@pytest.mark.parametrize("row", list(ROWS))
def test_logged_loss_and_export_keys_match_single_process(
    row, tiny_bert, glue_dir, tmp_path, one_process_export
):
    """Logged train loss is the global batch's mean (not rank 0's share), the logged gradient
    norm is the global pre-clip norm (not rank 0's shard's), and the exported safetensors have
    the 1-process key names (ZeRO-3 once wrote LayerNorm gamma/beta)."""
    if not _available(row):
        pytest.skip(f"backend for {row} not built yet")
    run_world(logged_run, 2, _export_overrides(tiny_bert, glue_dir, tmp_path) + ROWS[row])
    losses, keys, norms = _logged(tmp_path)
    want_losses, want_keys, want_norms = one_process_export
    assert keys == want_keys, f"{row}: {sorted(set(keys) ^ set(want_keys))[:6]}"
    assert len(losses) == len(want_losses) == 4
    diff = max(abs(a - b) for a, b in zip(losses, want_losses))
    assert diff <= 1e-5, f"{row}: logged losses {losses} vs 1 process {want_losses}"
    assert all(n > 0.1 for n in want_norms)  # above train.max_grad_norm: the norm before clipping
    assert norms == pytest.approx(want_norms, rel=1e-4), f"{row}: grad norms {norms} vs {want_norms}"
