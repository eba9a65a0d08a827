"""CT-F draws: deterministic, shard-invariant, Bernoulli(p), unbiased after rescaling."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from ctscale.methods import counter_rng as hashing
from ctscale.methods.base import GradView
from ctscale.methods.counter_rng import bernoulli_mask, keep_and_rescale_
from ctscale.methods.ct_f import RandomChildMask
from ctscale.methods.fixed_mask import FixedChildMask


def test_same_coordinates_same_mask_and_new_step_new_mask():
    a = bernoulli_mask(7, 3, "layer.0.w", 0, 50_000, 0.3)
    assert torch.equal(a, bernoulli_mask(7, 3, "layer.0.w", 0, 50_000, 0.3))
    for other in (
        bernoulli_mask(7, 4, "layer.0.w", 0, 50_000, 0.3),
        bernoulli_mask(8, 3, "layer.0.w", 0, 50_000, 0.3),
        bernoulli_mask(7, 3, "layer.1.w", 0, 50_000, 0.3),
    ):
        agree = (a == other).float().mean().item()
        # independent Bernoulli(0.3) draws agree with probability 0.3^2 + 0.7^2 = 0.58
        assert abs(agree - 0.58) < 0.01


@pytest.mark.parametrize("cuts", [[0, 1, 9, 4096, 10_007, 30_000], [0, 15_000, 30_000], [0, 29_999, 30_000]])
def test_mask_of_a_slice_is_the_slice_of_the_mask(cuts):
    whole = bernoulli_mask(1, 5, "w", 0, 30_000, 0.2)
    pieces = [bernoulli_mask(1, 5, "w", lo, hi, 0.2) for lo, hi in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(pieces), whole)


def test_indices_beyond_int32_are_fine_and_shard_invariant():
    start = (1 << 31) - 100
    whole = bernoulli_mask(0, 0, "emb", start, start + 200, 0.5)
    assert torch.equal(
        torch.cat(
            [
                bernoulli_mask(0, 0, "emb", start, start + 100, 0.5),
                bernoulli_mask(0, 0, "emb", start + 100, start + 200, 0.5),
            ]
        ),
        whole,
    )


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.9])
def test_kept_fraction_is_binomial(p):
    n = 400_000
    kept = int(bernoulli_mask(3, 0, "w", 0, n, p).sum())
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * p) < 5 * sigma


def test_rescaled_gradient_is_unbiased():
    torch.manual_seed(0)
    grad = torch.randn(20_000)
    strategy = RandomChildMask(reserve_p=0.25, seed=11)
    steps = 400
    total = torch.zeros_like(grad)
    for step in range(steps):
        view = GradView("w", (20_000,), 0, 20_000, grad.clone())
        strategy.apply(view, step)
        total += view.grad
    mean = total / steps
    # per entry: mean of g*M/p has std |g| * sqrt((1-p)/(p*steps))
    sigma = grad.abs() * math.sqrt(0.75 / (0.25 * steps))
    assert ((mean - grad).abs() <= 5 * sigma + 1e-6).all()
    assert abs(((mean - grad) / grad.abs().clamp_min(1e-3)).mean().item()) < 0.01


# (numel, start, p): chunk edges (eager CPU chunk 2**18), the 2**31 block edge, p = 1, tiny p
FUSED_CASES = [
    (10, 0, 0.3),
    (3 * 2**18 + 17, 123, 0.1),
    (5000, (1 << 31) - 2000, 0.3),
    (777, 0, 1.0),
    (777, 0, 1e-9),
    (999, 3, 0.999999),
]


def _expected(grad, start, p):
    return grad * bernoulli_mask(7, 3, "x.w", start, start + grad.numel(), p) * (1.0 / p)


@pytest.mark.parametrize("numel,start,p", FUSED_CASES)
def test_fused_eager_kernel_gives_bernoulli_mask_bits(numel, start, p):
    grad = torch.randn(numel, dtype=torch.float64)
    out = keep_and_rescale_(grad.clone(), 7, 3, "x.w", start, p, compiled=False)
    assert torch.equal(out, _expected(grad, start, p))


@pytest.mark.slow  # one torch.compile (C++ codegen) per process: ~20 s the first time
@pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on CPU needs a C++ compiler"
)
def test_compiled_kernel_gives_bernoulli_mask_bits(monkeypatch):
    monkeypatch.setattr(hashing, "_COMPILED_CHUNK", 2**18)  # several chunks, as on a big tensor
    for numel, start, p in FUSED_CASES:
        grad = torch.randn(numel)
        out = keep_and_rescale_(grad.clone(), 7, 3, "x.w", start, p, compiled=True)
        assert torch.equal(out, _expected(grad, start, p)), (numel, start, p)
    view = GradView("w", (4, 5), 0, 20, torch.ones(20, dtype=torch.bfloat16))
    RandomChildMask(0.5, seed=1, kernel="compiled").apply(view, step=0)
    assert torch.equal(view.grad.float(), 2 * bernoulli_mask(1, 0, "w", 0, 20, 0.5).float())


def test_auto_kernel_does_not_compile_on_cpu(monkeypatch):
    def no_compile(*args):
        raise AssertionError("auto compiled on the CPU")

    monkeypatch.setattr(hashing, "_compiled_call", no_compile)
    view = GradView("w", (10,), 0, 10, torch.ones(10))
    RandomChildMask(0.5, seed=1).apply(view, step=0)  # kernel="auto"
    assert torch.equal(view.grad, 2 * bernoulli_mask(1, 0, "w", 0, 10, 0.5).float())


def test_unknown_ctf_kernel_is_refused():
    with pytest.raises(ValueError, match="CT-F kernel must be one of"):
        RandomChildMask(0.3, seed=0, kernel="triton")


def test_ctf_keeps_p_fraction_and_scales_by_inverse_p():
    view = GradView("w", (100, 100), 0, 10_000, torch.ones(10_000))
    RandomChildMask(0.4, seed=1).apply(view, step=2)
    values = set(view.grad.unique().tolist())
    assert values == {0.0, 2.5}
    assert abs((view.grad > 0).float().mean().item() - 0.4) < 0.03


def test_ctd_masks_candidates_only_and_rejects_foreign_ranges():
    keep = torch.tensor([True, False, True, False])
    strategy = FixedChildMask({("layer.w", 0): keep}, is_candidate=lambda n: n.startswith("layer"))
    view = GradView("layer.w", (4,), 0, 4, torch.ones(4))
    strategy.apply(view, 0)
    assert view.grad.tolist() == [1.0, 0.0, 1.0, 0.0]
    head = GradView("classifier.w", (3,), 0, 3, torch.ones(3))
    strategy.apply(head, 0)
    assert head.grad.tolist() == [1.0, 1.0, 1.0]
    from ctscale.errors import MaskError

    with pytest.raises(MaskError, match=r"layer.w\[2:4\]"):
        strategy.apply(GradView("layer.w", (4,), 2, 4, torch.ones(2)), 0)
    assert strategy.state_bytes() == 4
