"""Exact global top-k: exactly k entries, ties broken by (name, flat index), any split."""

from __future__ import annotations

import pytest
import torch

from ctscale.methods.base import GradView
from ctscale.methods.ct_d.fisher import FisherAccumulator, candidate_filter, select_child
from ctscale.methods.ct_d.topk import select_top_k


def brute_force(pieces: dict, k: int) -> torch.Tensor:
    """Sort every score by (-value, position in (name, index) order); the first k win."""
    values = torch.cat([pieces[key] for key in sorted(pieces)])
    order = sorted(range(values.numel()), key=lambda i: (-values[i].item(), i))
    chosen = torch.zeros(values.numel(), dtype=torch.bool)
    chosen[order[:k]] = True
    return chosen


def flat(masks: dict) -> torch.Tensor:
    return torch.cat([masks[key] for key in sorted(masks)])


def make_pieces(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        ("a.weight", 0): torch.rand(700, generator=gen) ** 3,
        ("b.weight", 0): torch.zeros(300),  # many exact ties at 0
        ("b.weight", 300): torch.randint(0, 4, (400,), generator=gen).float() / 4,  # ties at every level
        ("c.bias", 0): torch.full((50,), 0.25),
    }


@pytest.mark.parametrize("k", [1, 2, 49, 333, 700, 1000, 1200, 1449, 1450])
def test_exactly_k_with_deterministic_ties(k):
    pieces = make_pieces(0)
    got = flat(select_top_k(pieces, k))
    assert int(got.sum()) == k
    assert torch.equal(got, brute_force(pieces, k))


@pytest.mark.parametrize("k", [49, 333, 1000, 1449])
def test_ties_spanning_many_chunks(k, monkeypatch):
    """Histograms and the tie break run a chunk at a time; chunks of 7 entries cut every run of
    ties, so counts and cumulative sums must carry across chunk boundaries."""
    import ctscale.methods.ct_d.topk

    pieces = make_pieces(0)
    want = brute_force(pieces, k)
    monkeypatch.setattr(ctscale.methods.ct_d.topk, "_CHUNK", 7)
    assert torch.equal(flat(select_top_k(pieces, k)), want)


def test_selection_does_not_depend_on_how_tensors_are_split():
    pieces = make_pieces(1)
    whole = flat(select_top_k(pieces, 600))
    resplit = {}
    for (name, start), scores in pieces.items():
        for lo in range(0, scores.numel(), 97):  # ranges as uneven shards would hold them
            resplit[(name, start + lo)] = scores[lo : lo + 97]
    assert torch.equal(flat(select_top_k(resplit, 600)), whole)


def test_all_equal_scores_take_the_first_entries_in_name_order():
    pieces = {("z", 0): torch.ones(10), ("a", 0): torch.ones(10)}
    masks = select_top_k(pieces, 12)
    assert masks[("a", 0)].all() and int(masks[("z", 0)].sum()) == 2 and masks[("z", 0)][:2].all()


def test_fisher_accumulator_clips_per_tensor_and_averages():
    shapes = {"layer.w": (4,), "layer.b": (2,)}
    fisher = FisherAccumulator(shapes, max_grad_norm=1.0)
    g1 = {"layer.w": torch.tensor([3.0, 4.0, 0.0, 0.0]), "layer.b": torch.tensor([0.3, 0.4])}
    g2 = {"layer.w": torch.tensor([0.0, 0.0, 0.6, 0.8]), "layer.b": torch.tensor([0.0, 0.0])}
    for grads in (g1, g2):
        fisher.add(GradView(n, shapes[n], 0, g.numel(), g) for n, g in grads.items())
    scores = fisher.scores()
    # batch 1: w has norm 5 -> scaled by 1/5 (up to the 1e-6 of torch's clip formula)
    expected_w = (torch.tensor([0.6, 0.8, 0.0, 0.0]) ** 2 + torch.tensor([0.0, 0.0, 0.6, 0.8]) ** 2) / 2
    assert torch.allclose(scores[("layer.w", 0)], expected_w, atol=1e-6)
    assert torch.allclose(scores[("layer.b", 0)], torch.tensor([0.09, 0.16]) / 2, atol=1e-7)
    assert fisher.total_entries() == 6
    masks = select_child(scores, fisher.total_entries(), reserve_p=0.5)
    assert sum(int(m.sum()) for m in masks.values()) == 3


def test_candidate_filter_is_regex_search_with_excludes():
    is_candidate = candidate_filter(["layer"], exclude=[r"LayerNorm|\.bias$"])
    assert is_candidate("bert.encoder.layer.0.attention.self.query.weight")
    assert not is_candidate("bert.encoder.layer.0.attention.self.query.bias")
    assert not is_candidate("bert.embeddings.word_embeddings.weight")
    assert not is_candidate("bert.encoder.layer.0.output.LayerNorm.weight")


def test_scores_across_the_whole_float_range_match_brute_force():
    """The 16-bit high histogram spans exponents from subnormals to 1e38; ties sit inside a bin."""
    gen = torch.Generator().manual_seed(3)
    exponents = torch.randint(-149, 127, (3000,), generator=gen).float()
    values = torch.pow(2.0, exponents) * (1 + torch.randint(0, 3, (3000,), generator=gen).float() / 4)
    values[::11] = 0.0
    pieces = {("a", 0): values[:1700], ("b", 0): values[1700:]}
    for k in (1, 17, 1500, 2999, 3000):
        assert torch.equal(flat(select_top_k(pieces, k)), brute_force(pieces, k)), k


def _sum_cpu_tensor_as_on_nccl(rank: int, world_size: int) -> tuple[list[int], list[bool]]:
    import torch.distributed as tdist

    from ctscale import dist

    dist.init_from_env()
    # NCCL reduces device tensors only: a CPU tensor must make the round trip through
    # default_device() (the CPU here, standing in for the GPU) and land back in place
    hist = torch.tensor([rank + 1, 10 * rank], dtype=torch.int64)
    reduced_in_place, all_reduce = [], tdist.all_reduce
    tdist.get_backend = lambda group=None: "nccl"
    tdist.all_reduce = lambda t, **kw: reduced_in_place.append(t is hist) or all_reduce(t, **kw)
    assert dist.all_reduce_sum_(hist) is hist
    return hist.tolist(), reduced_in_place


@pytest.mark.slow
def test_histogram_all_reduce_round_trips_cpu_tensors_under_nccl():
    from dist_harness import run_world

    assert run_world(_sum_cpu_tensor_as_on_nccl, 2) == [([3, 10], [False])] * 2
