"""The method registry: config validation, the trainer, the plan and the HF callback read it and
name no method; CT-R (the fixed random child network) is registered by its own module alone and
runs through all of them. The distributed matrix (tests/conftest.py METHODS) runs CT-R on every
backend against the single-process run."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import ctscale
from ctscale.config import load_config
from ctscale.errors import ConfigError, MaskError
from ctscale.methods import get_method, method_names, registry
from ctscale.methods.base import GradView
from ctscale.methods.counter_rng import bernoulli_mask
from ctscale.methods.ct_r import DRAW_STEP
from ctscale.methods.fixed_mask import FixedChildMask
from ctscale.methods.registry import MethodSpec, build_strategy

from dist_workers import tiny_overrides

PACKAGE = Path(ctscale.__file__).parent
# the modules that must work for any registered method without naming one
CONSUMERS = [
    *sorted((PACKAGE / "config").glob("*.py")),
    PACKAGE / "trainer.py",
    PACKAGE / "plan.py",
    PACKAGE / "hf.py",
    *sorted((PACKAGE / "backends").glob("*.py")),
]


def _method_literals(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every string constant equal to a registered method's name, except a
    default (the HF callback's ``method="ct-f"``, MethodConfig's ``name = "vanilla"``): a
    default chooses a method, a branch on one would have to be edited for the next."""
    tree = ast.parse(path.read_text())
    defaults = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defaults |= {id(d) for d in node.args.defaults + node.args.kw_defaults if d is not None}
        if isinstance(node, ast.ClassDef):  # dataclass field defaults
            defaults |= {id(a.value) for a in node.body if isinstance(a, ast.AnnAssign) and a.value}
    names = set(method_names())
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in names and id(node) not in defaults
    ]


def test_registry_lists_every_method_with_its_traits():
    assert method_names()[:4] == ("vanilla", "ct-f", "ct-d", "ct-r")
    ctr, ctd = get_method("ct-r"), get_method("ct-d")
    assert ctr.fixed_child and not ctr.reads_mask_file and ctr.mask_path is None and not ctr.fisher_pass
    assert ctd.fixed_child and ctd.reads_mask_file and ctd.fisher_pass
    with pytest.raises(ConfigError, match="unknown method 'ct-x'.*vanilla, ct-f, ct-d, ct-r"):
        get_method("ct-x")


def test_ct_r_is_registered_by_its_one_module():
    others = [
        p.relative_to(PACKAGE)
        for p in PACKAGE.rglob("*.py")
        if p.name != "ct_r.py" and "ct-r" in p.read_text()
    ]
    assert others == []  # no other module of the package knows its name
    assert get_method("ct-r").build.__module__ == "ctscale.methods.ct_r"


@pytest.mark.parametrize("path", CONSUMERS, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_consumers_name_no_method(path):
    assert _method_literals(path) == [], f"{path.name} branches on a method name; read the registry"


def test_config_rules_come_from_the_registry():
    assert load_config(None, ["method.name=ct-r"]).method.name == "ct-r"
    assert load_config(
        None, ["method.name=ct-r", "method.child_only_optimizer=true"]
    ).method.child_only_optimizer
    with pytest.raises(ConfigError, match="needs a fixed child network \\(method.name 'ct-d' or 'ct-r'\\)"):
        load_config(None, ["method.name=ct-f", "method.child_only_optimizer=true"])
    with pytest.raises(ConfigError, match="method.mask_file is read only by method.name 'ct-d'"):
        load_config(None, ["method.name=ct-r", "method.mask_file=mask.safetensors"])
    with pytest.raises(ConfigError, match="unknown value 'ct-x'.*vanilla, ct-f, ct-d, ct-r"):
        load_config(None, ["method.name=ct-x"])


class _Shards:
    """A ShardViews: global shapes and this rank's flat ranges."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], ranges: list[tuple[str, int, int]]) -> None:
        self.shapes, self.ranges = shapes, ranges

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.shapes

    def shard_ranges(self) -> list[GradView]:
        return [GradView(n, self.shapes[n], s, e) for n, s, e in self.ranges]


SHAPES = {"encoder.layer.0.w": (300, 40), "encoder.layer.1.b": (77,), "classifier.w": (2, 40)}


def _ctr(ranges: list[tuple[str, int, int]], *overrides: str) -> FixedChildMask:
    cfg = load_config(None, ["method.name=ct-r", "method.reserve_p=0.25", *overrides])
    strategy = build_strategy(cfg, _Shards(SHAPES, ranges), None)
    assert isinstance(strategy, FixedChildMask)
    return strategy


def test_ct_r_draws_one_child_network_whatever_the_sharding():
    whole = _ctr([(n, 0, torch.Size(s).numel()) for n, s in SHAPES.items()], "method.mask_seed=5")
    assert set(whole.local_masks) == {("encoder.layer.0.w", 0), ("encoder.layer.1.b", 0)}  # candidates only
    w = whole.local_masks[("encoder.layer.0.w", 0)]
    assert torch.equal(w, bernoulli_mask(5, DRAW_STEP, "encoder.layer.0.w", 0, 12000, 0.25))
    assert abs(w.float().mean().item() - 0.25) < 0.02
    # two "ranks" holding uneven pieces build the same bits, with no file and no collective
    rank0 = _ctr([("encoder.layer.0.w", 0, 5001), ("encoder.layer.1.b", 0, 77)], "method.mask_seed=5")
    rank1 = _ctr([("encoder.layer.0.w", 5001, 12000)], "method.mask_seed=5")
    joined = torch.cat(
        [rank0.local_masks[("encoder.layer.0.w", 0)], rank1.local_masks[("encoder.layer.0.w", 5001)]]
    )
    assert torch.equal(joined, w)
    # seed: method.mask_seed, else train.seed
    other = _ctr([("encoder.layer.0.w", 0, 12000)], "train.seed=5")
    assert torch.equal(other.local_masks[("encoder.layer.0.w", 0)], w)
    assert not torch.equal(_ctr([("encoder.layer.0.w", 0, 12000)]).local_masks[("encoder.layer.0.w", 0)], w)


def test_ct_r_masks_without_rescale_and_leaves_non_candidates_alone():
    strategy = _ctr([("encoder.layer.1.b", 0, 77), ("classifier.w", 0, 80)])
    keep = strategy.local_masks[("encoder.layer.1.b", 0)]
    grad = torch.randn(77)
    view = GradView("encoder.layer.1.b", (77,), 0, 77, grad.clone())
    strategy.apply(view, step=3)
    assert torch.equal(view.grad, grad * keep)  # no 1/p: a fixed child, as CT-D
    head = torch.randn(80)
    view = GradView("classifier.w", (2, 40), 0, 80, head.clone())
    strategy.apply(view, step=3)
    assert torch.equal(view.grad, head)


def test_ct_r_refuses_candidates_matching_nothing():
    with pytest.raises(MaskError, match="no parameter matches fisher.candidates"):
        _ctr([("classifier.w", 0, 80)], "fisher.candidates=[nothing]")


def test_a_method_registered_elsewhere_runs_through_config_and_build(monkeypatch):
    """Adding a method: one registration, no edit to config or trainer."""

    class Halve:
        def apply(self, view: GradView, step: int) -> None:
            view.grad.mul_(0.5)

        def state_bytes(self) -> int:
            return 0

    spec = MethodSpec(
        name="halve", summary="half every gradient", build=lambda ctx: Halve(), plan=lambda c, n: ""
    )
    monkeypatch.setitem(registry._METHODS, "halve", spec)
    cfg = load_config(None, ["method.name=halve"])
    assert isinstance(build_strategy(cfg, _Shards(SHAPES, []), None), Halve)


def test_trainer_runs_ct_r_and_child_only_adamw_serves_it(tiny_bert, glue_dir, tmp_path, capsys):
    from ctscale.trainer import Trainer

    def run(out: Path, *extra: str) -> dict[str, torch.Tensor]:
        overrides = tiny_overrides(tiny_bert, glue_dir, out) + ["train.save_model=true", "train.report_to=[]"]
        Trainer(load_config(None, [*overrides, "method.name=ct-r", *extra])).run()
        return load_file(out / "model" / "model.safetensors")

    dense = run(tmp_path / "dense")
    assert "mask: ct-r, a fixed random child network, p=0.3, seed 42" in capsys.readouterr().out
    child_only = run(tmp_path / "child", "method.child_only_optimizer=true")
    assert dense.keys() == child_only.keys()
    assert all(torch.equal(dense[k], child_only[k]) for k in dense)
    # weight decay 0: outside the random child no candidate entry moves; inside, they do
    start = load_file(tiny_bert / "model.safetensors")
    moved = kept = 0
    for name in (n for n in start if "layer" in n):
        before, after = start[name].reshape(-1), dense[name].reshape(-1)
        keep = bernoulli_mask(42, DRAW_STEP, name, 0, before.numel(), 0.3)
        assert torch.equal(after[~keep], before[~keep]), name
        moved, kept = moved + int((after[keep] != before[keep]).sum()), kept + int(keep.sum())
    assert moved > 0.9 * kept


def test_hf_callback_runs_ct_r(tiny_bert, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from ctscale.hf import ChildTuningCallback

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    callback = ChildTuningCallback("ct-r", reserve_p=0.3, mask_seed=9)
    args = SimpleNamespace(seed=0, output_dir=str(tmp_path), gradient_accumulation_steps=1)
    callback.on_train_begin(
        args, SimpleNamespace(global_step=0), None, model=model, optimizer=None, train_dataloader=[]
    )
    assert "child-tuning: ct-r, a fixed random child network, p=0.3, seed 9" in capsys.readouterr().out
    masks = callback.strategy.local_masks
    candidates = [n for n, _ in model.named_parameters() if "layer" in n]
    assert sorted(n for n, _ in masks) == sorted(candidates)
    for (name, start), keep in masks.items():
        assert torch.equal(keep, bernoulli_mask(9, DRAW_STEP, name, start, start + keep.numel(), 0.3))
    assert not list(tmp_path.iterdir())  # no mask file: the draw is its own record
    with pytest.raises(ConfigError, match="CT-D options"):
        ChildTuningCallback("ct-r", mask_file=tmp_path / "mask.safetensors")
