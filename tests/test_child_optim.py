"""Child-only AdamW (``method.child_only_optimizer``): dense CT-D's trajectory, state ~ p.

Single process: ``ChildAdamW`` + ``ChildMask`` against ``torch.optim.AdamW`` on gradients masked
by ``FixedChildMask`` (weight decay on, so non-child entries move by decay alone), the packed
state sizes, mixed-precision master copies, and a ``state_dict`` round trip.
Two ranks (slow): the trainer with the flag against dense CT-D in the same process group, for
FSDP2 and DDP, straight through and stopped-then-resumed from its checkpoint.
"""

from __future__ import annotations

import pytest
import torch

from ctscale.config import load_config
from ctscale.errors import ConfigError, CtscaleError
from ctscale.methods.base import GradView
from ctscale.methods.child_optim import ChildAdamW, ChildMask, optimizer_state_bytes
from ctscale.methods.fixed_mask import FixedChildMask
from ctscale.storage.child_optim_state import load_child_state, save_child_state

from dist_harness import run_world
from dist_workers import train_attempt

ATOL = 5e-6  # as tests/test_distributed.py: far below one step of lr 1e-3


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("embed", torch.nn.Linear(6, 16))  # names without "layer": fully trained
    model.add_module("layer0", torch.nn.Linear(16, 16))
    model.add_module("layer1", torch.nn.Linear(16, 3))
    return model.to(dtype)


def _fixed(model: torch.nn.Module, p: float = 0.3) -> FixedChildMask:
    g = torch.Generator().manual_seed(1)
    masks = {
        (n, 0): torch.rand(w.numel(), generator=g) < p for n, w in model.named_parameters() if "layer" in n
    }
    return FixedChildMask(masks, is_candidate=lambda n: "layer" in n)


def _groups(model: torch.nn.Module, named: bool) -> list[dict]:
    pairs = list(model.named_parameters())
    pick = lambda keep: [(n, w) if named else w for n, w in pairs if keep(n)]  # noqa: E731
    return [
        {"params": pick(lambda n: not n.endswith("bias")), "weight_decay": 0.01},
        {"params": pick(lambda n: n.endswith("bias")), "weight_decay": 0.0},
    ]


def _train(model, optimizer, strategy, steps: range, grads: list | None = None) -> None:
    """Steps of random-input loss (or the given gradients), masked by ``strategy``."""
    for step in steps:
        if grads is None:
            x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step), dtype=model[0].weight.dtype)
            model(x).float().pow(2).mean().backward()
        else:
            for w, g in zip(model.parameters(), grads[step]):
                w.grad = g.to(w.dtype)
        for n, w in model.named_parameters():
            strategy.apply(GradView(n, tuple(w.shape), 0, w.numel(), w.grad.view(-1)), step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _child_setup(model, p: float = 0.3):
    child = ChildMask.from_fixed(_fixed(model, p))
    return ChildAdamW(_groups(model, named=True), child, lr=1e-2), child


def test_trajectory_equals_dense_ctd_with_weight_decay():
    model, ref = _model(), _model()
    fixed = _fixed(ref)
    optimizer, child = _child_setup(model)
    dense = torch.optim.AdamW(_groups(ref, named=False), lr=1e-2, eps=1e-8)
    before = {n: w.detach().clone() for n, w in model.named_parameters()}
    _train(model, optimizer, child, range(4))
    _train(ref, dense, fixed, range(4))
    for (name, got), want in zip(model.named_parameters(), ref.parameters()):
        assert (got - want).abs().max().item() <= 1e-6, name
    # non-child entries moved by decay only: w0 * (1 - lr*wd)^4
    keep = fixed.local_masks[("layer0.weight", 0)]
    decayed = before["layer0.weight"].view(-1)[~keep]
    for _ in range(4):
        decayed = decayed * (1 - 1e-2 * 0.01)
    torch.testing.assert_close(model.layer0.weight.view(-1)[~keep], decayed, rtol=0, atol=1e-7)


def test_state_holds_child_entries_only():
    model = _model()
    optimizer, child = _child_setup(model)
    _train(model, optimizer, child, range(1))
    fixed = _fixed(model)
    expected = 0
    for name, w in model.named_parameters():
        state = optimizer.state[w]
        n = int(fixed.local_masks[(name, 0)].sum()) if "layer" in name else w.numel()
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (n,), name
        assert state["exp_avg"].dtype == torch.float32 and "master" not in state
        expected += 2 * 4 * n + 4  # two fp32 moments + the fp32 step counter
    assert optimizer_state_bytes(optimizer) == expected
    assert child.child_entries() == sum(int(m.sum()) for m in fixed.local_masks.values())
    assert child.state_bytes() == 4 * child.child_entries()  # int32 positions


def test_bf16_parameters_keep_fp32_master_of_child_entries():
    """Same gradients (bf16-representable) into an fp32 and a bf16 model: the bf16 run's master
    copy follows the fp32 run exactly; its parameters are the master rounded to bf16."""
    fp32, bf16 = _model(), _model(torch.bfloat16)
    with torch.no_grad():
        for a, b in zip(fp32.parameters(), bf16.parameters()):
            a.copy_(b.float())
    g = torch.Generator().manual_seed(2)
    grads = [
        [torch.randn(w.shape, generator=g).bfloat16().float() for w in fp32.parameters()] for _ in range(3)
    ]
    opt32, child32 = _child_setup(fp32)
    opt16, child16 = _child_setup(bf16)
    _train(fp32, opt32, child32, range(3), grads)
    _train(bf16, opt16, child16, range(3), grads)
    for (name, a), b in zip(fp32.named_parameters(), bf16.parameters()):
        master, idx = opt16.state[b]["master"], child16.index(name)
        want = a.detach().view(-1) if idx is None else a.detach().view(-1)[idx]
        assert torch.equal(master, want), name
        got = b.detach().view(-1) if idx is None else b.detach().view(-1)[idx]
        assert torch.equal(got, master.bfloat16()), name


def test_state_dict_round_trip_continues_exactly(tmp_path):
    model = _model()
    optimizer, child = _child_setup(model)
    _train(model, optimizer, child, range(2))
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    _train(model, optimizer, child, range(2, 4))

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # tensors and plain containers only
    resumed = _model()
    resumed.load_state_dict(saved["model"])
    optimizer2, child2 = _child_setup(resumed)
    optimizer2.load_state_dict(saved["optimizer"])
    _train(resumed, optimizer2, child2, range(2, 4))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)

    other, _ = _child_setup(_model(), p=0.5)  # another child network: refused, not misapplied
    with pytest.raises(CtscaleError, match="another mask or sharding"):
        other.load_state_dict(saved["optimizer"])


def test_config_allows_it_for_ctd_only_and_not_with_deepspeed():
    assert load_config(
        None, ["method.name=ct-d", "method.child_only_optimizer=true"]
    ).method.child_only_optimizer
    with pytest.raises(ConfigError, match="method.child_only_optimizer needs"):
        load_config(None, ["method.name=vanilla", "method.child_only_optimizer=true"])
    with pytest.raises(ConfigError, match="not supported with distributed.backend 'deepspeed'"):
        load_config(
            None,
            ["method.name=ct-d", "method.child_only_optimizer=true", "distributed.backend=deepspeed"]
            + ["distributed.zero_stage=3"],
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_child_state_files_round_trip_exactly(dtype, tmp_path):
    """``ctscale.storage.child_optim_state`` (the FSDP2 checkpoint format) at world size 1: the reloaded
    state continues bit for bit, masters included; another child network is refused."""
    model = _model(dtype)
    optimizer, child = _child_setup(model)
    _train(model, optimizer, child, range(2))
    save_child_state(optimizer, tmp_path)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, optimizer, child, range(2, 4))

    resumed = _model(dtype)
    resumed.load_state_dict(weights)
    optimizer2, child2 = _child_setup(resumed)
    load_child_state(optimizer2, tmp_path)
    assert optimizer2.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    _train(resumed, optimizer2, child2, range(2, 4))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert all(
        torch.equal(optimizer.state[a]["exp_avg_sq"], optimizer2.state[b]["exp_avg_sq"])
        for a, b in zip(model.parameters(), resumed.parameters())
    )

    other, _ = _child_setup(_model(dtype), p=0.5)
    with pytest.raises(CtscaleError, match="another mask"):
        load_child_state(other, tmp_path)
    (tmp_path / "child-optim-00000.safetensors").unlink()
    with pytest.raises(CtscaleError, match="incomplete"):
        load_child_state(optimizer2, tmp_path)


# -- two ranks, through the trainer ---------------------------------------------------------------
def _run(rank: int, world_size: int, overrides: list[str]) -> dict:
    """``Trainer.run`` (Fisher pass, mask, training, checkpoints); final weights and state size."""
    from ctscale.config import load_config
    from ctscale.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    trainer.run()
    state = trainer.backend.consolidated_state_dict()
    optimizer = trainer.backend.optimizer
    child = getattr(optimizer, "child", None)
    return {
        "state": {k: v.float().clone() for k, v in state.items()} if state is not None else None,
        "optimizer": type(optimizer).__name__,
        "state_bytes": optimizer_state_bytes(optimizer),
        "candidates": child and sum(numel for _, numel, _ in child.pieces.values()),
        "children": child and child.child_entries(),
    }


def child_vs_dense(rank: int, world_size: int, dense: list[str], child: list[str], resume: list[str]):
    """Dense CT-D, child-only CT-D, and child-only stopped before step 2 then resumed."""
    return [
        _run(rank, world_size, dense),
        _run(rank, world_size, child),
        train_attempt(rank, world_size, resume, stop_at=2),
        train_attempt(rank, world_size, [*resume, "train.resume=true"], None),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "ddp"])
def test_two_ranks_match_dense_ctd(backend, tiny_bert, glue_dir, tmp_path):
    from dist_workers import tiny_overrides

    def overrides(name: str, *extra: str) -> list[str]:
        return tiny_overrides(tiny_bert, glue_dir, tmp_path / name) + [
            f"distributed.backend={backend}",
            "method.name=ct-d",
            "train.weight_decay=0.01",  # non-child entries move, by decay only
            *extra,
        ]

    flag = "method.child_only_optimizer=true"
    dense, child, stopped, resumed = run_world(
        child_vs_dense, 2, overrides("dense"), overrides("child", flag), overrides("resume", flag)
    )[0]
    assert (dense["optimizer"], child["optimizer"]) == ("AdamW", "ChildAdamW")
    # rank 0: two fp32 moments fewer for each local non-child entry, nothing else changed
    saved = 8 * (child["candidates"] - child["children"])
    assert 0 < child["children"] < 0.4 * child["candidates"]
    assert dense["state_bytes"] - child["state_bytes"] == saved
    assert stopped["steps"] == [0, 1] and resumed["steps"] == [2, 3]
    for what, got in (("straight", child["state"]), ("resumed", resumed["state"])):
        assert got.keys() == dense["state"].keys()
        diff = max((got[k] - dense["state"][k]).abs().max().item() for k in got)
        assert diff <= ATOL, f"{backend} {what}: max |w_child - w_dense| = {diff:.3g}"
