"""``train.sparse_grad_comm``: the DDP hook that all-reduces only the entries the mask keeps.

Distributed (slow): worlds of 2 and 3 processes, CT-F and CT-D with gradient accumulation 2,
each trained with DDP's own all-reduce and with the hook in one process group. The hook's final
weights equal DDP's bit for bit at 2 ranks (a + b sums in either order alike) and within the
distributed tests' tolerance at 3; both equal the single-process run within that tolerance;
the hook adds no collective and all-reduces exactly the surviving entries.

Unit: every strategy's ``survivors`` is what its ``apply`` keeps; the config errors.
"""

from __future__ import annotations

import pytest
import torch

from ctscale.config import load_config
from ctscale.errors import ConfigError
from ctscale.methods.base import GradView
from ctscale.methods.child_optim import ChildMask
from ctscale.methods.ct_f import RandomChildMask
from ctscale.methods.fixed_mask import FixedChildMask

from dist_harness import run_world
from dist_workers import sparse_comm_runs, tiny_overrides

ATOL = 5e-6  # as tests/test_distributed.py: reduction-order rounding through 4 Adam steps
CANDIDATE = "bert.encoder.layer"  # the default fisher.candidates pattern ("layer") on the tiny BERT


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("size", [2, 3])
def test_hook_equals_ddp_and_single_process(size, tiny_bert, glue_dir, tmp_path, reference):
    runs, labels = [], []
    for method in ("ct-f", "ct-d"):
        for sparse in (False, True):
            out = tmp_path / f"{method}-{sparse}"
            extra = ["distributed.backend=ddp", f"method.name={method}", f"train.sparse_grad_comm={sparse}"]
            runs.append(tiny_overrides(tiny_bert, glue_dir, out) + extra)
            labels.append((method, sparse))
    per_rank = run_world(sparse_comm_runs, size, runs)
    got = dict(zip(labels, per_rank[0]))
    for method in ("ct-f", "ct-d"):
        dense, sparse = got[(method, False)], got[(method, True)]
        diff = _max_diff(sparse["state"], dense["state"])
        if size == 2:
            assert diff == 0.0, f"{method}: hook differs from DDP's all-reduce by {diff}"
        assert diff <= ATOL, f"{method}: hook differs from DDP's all-reduce by {diff}"
        ref = _max_diff(sparse["state"], reference[method]["state"])
        assert ref <= ATOL, f"{method}: hook differs from the single-process run by {ref}"
        assert sparse["collectives_per_step"] == dense["collectives_per_step"], "the hook added a collective"
        assert sparse["steps_seen"] == list(range(4)), "the hook drew another step's mask"
        assert dense["comm"] is None
    for ranks in per_rank:  # every rank packed the same survivors (the all-reduce would hang otherwise)
        assert [r["comm"] for r in ranks] == [r["comm"] for r in per_rank[0]]
    p = 0.3  # tiny_overrides' method.reserve_p
    ctd, ctf = got[("ct-d", True)]["comm"], got[("ct-f", True)]["comm"]
    # CT-D: the top-p of the candidates (ties aside), the non-candidates (embeddings, head) whole
    assert ctd["candidate_sent"] == pytest.approx(p * ctd["candidate_dense"], rel=0.01)
    assert ctd["sent"] - ctd["candidate_sent"] == ctd["dense"] - ctd["candidate_dense"]
    # CT-F masks every tensor: about p of all entries, a binomial draw over 4 steps x ~1M entries
    assert ctf["candidate_dense"] == ctf["dense"]
    assert ctf["sent"] == pytest.approx(p * ctf["dense"], rel=0.01)


def _views():
    torch.manual_seed(0)
    return [
        GradView(f"{CANDIDATE}.0.w", (6, 5), 0, 30, torch.randn(30)),
        GradView("bert.embeddings.w", (4, 3), 0, 12, torch.randn(12)),
    ]


def _kept_by_apply(strategy, view: GradView, step: int) -> torch.Tensor:
    probe = GradView(view.name, view.shape, view.start, view.end, torch.ones(view.numel))
    strategy.apply(probe, step)
    return probe.grad != 0


def _fixed() -> FixedChildMask:
    keep = torch.rand(30, generator=torch.Generator().manual_seed(1)) < 0.3
    return FixedChildMask({(f"{CANDIDATE}.0.w", 0): keep}, lambda n: n.startswith(CANDIDATE))


@pytest.mark.parametrize(
    "make", [lambda: RandomChildMask(0.3, seed=7), _fixed, lambda: ChildMask.from_fixed(_fixed())]
)
def test_survivors_are_what_apply_keeps(make):
    strategy = make()
    for view in _views():
        for step in (0, 1, 5):
            survivors = strategy.survivors(view, step)
            kept = _kept_by_apply(strategy, view, step)
            if survivors is None:  # a non-candidate: apply keeps it whole
                assert bool(kept.all()), view.name
            else:
                assert torch.equal(survivors, kept), (view.name, step)
    if isinstance(strategy, RandomChildMask):  # a fresh child every step
        view = _views()[0]
        assert strategy.survivors_fixed is False
        assert not torch.equal(strategy.survivors(view, 0), strategy.survivors(view, 1))
    else:
        assert strategy.survivors_fixed is True


def test_survivors_of_a_shard_the_mask_was_not_built_for():
    with pytest.raises(Exception, match="rebuild"):
        ChildMask.from_fixed(_fixed()).survivors(GradView(f"{CANDIDATE}.0.w", (6, 5), 10, 30), 0)
    with pytest.raises(Exception, match="Rebuild"):
        _fixed().survivors(GradView(f"{CANDIDATE}.0.w", (6, 5), 10, 30), 0)


def test_sparse_comm_needs_a_child_network():
    with pytest.raises(ConfigError, match=r"train.sparse_grad_comm.*'vanilla'.*ct-d or ct-f"):
        load_config(None, ["distributed.backend=ddp", "train.sparse_grad_comm=true"])


@pytest.mark.parametrize("backend", ["local", "fsdp"])
def test_sparse_comm_needs_ddp(backend):
    from ctscale.backends import check_config

    cfg = load_config(
        None, [f"distributed.backend={backend}", "method.name=ct-f", "train.sparse_grad_comm=true"]
    )
    with pytest.raises(ConfigError, match=rf"sparse_grad_comm.*'ddp'.*got '{backend}'"):
        check_config(cfg)


def test_strategy_without_survivors_is_refused():
    from ctscale.backends.sparse_comm import SparseCommState
    from ctscale.methods.vanilla import NoMask

    state = SparseCommState(names={}, world_size=2)
    with pytest.raises(ConfigError, match="NoMask"):
        state.use(NoMask(), 0)
