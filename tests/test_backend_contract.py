"""The engine contract cannot drift: every backend class has every member of the ``Backend``
Protocol with the protocol's parameters, the Trainer adapters give ``ShardViews``, and no engine
module names a method class (house rule 10, CONTRIBUTING.md). mypy checks the same statically
(``build_backend`` returns ``Backend``); this test also runs where mypy does not."""

from __future__ import annotations

import ast
import inspect
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from ctscale.backends.base import Backend, ShardedStateOptimizer, ShardViews  # noqa: E402
from ctscale.backends.deepspeed import DeepSpeedBackend  # noqa: E402
from ctscale.backends.fsdp import FSDPBackend  # noqa: E402
from ctscale.backends.hf_views import LocalShards, ZeroShards  # noqa: E402
from ctscale.backends.local import LocalBackend  # noqa: E402
from ctscale.methods.child_optim import ChildAdamW  # noqa: E402

BACKENDS = [LocalBackend, FSDPBackend, DeepSpeedBackend]
BACKEND_DIR = Path(__file__).resolve().parents[1] / "ctscale" / "backends"


def protocol_methods(protocol: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(value)
        for name, value in vars(protocol).items()
        if callable(value) and not name.startswith("_")
    }


def shape_of(sig: inspect.Signature) -> list[tuple[str, inspect._ParameterKind, bool]]:
    """Parameter names, kinds and whether each has a default (annotations are spelled per module)."""
    return [(p.name, p.kind, p.default is not inspect.Parameter.empty) for p in sig.parameters.values()]


def attributes_set(cls: type) -> set[str]:
    """``self.X`` names that the class's methods assign (instance attributes)."""
    tree = ast.parse(inspect.getsource(cls).lstrip())
    names = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            for t in ast.walk(target) if target is not None else ():
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    names.add(t.attr)
    return names


def test_the_protocol_declares_what_the_trainer_calls() -> None:
    methods = protocol_methods(Backend)
    assert {"replace_optimizer", "save_checkpoint", "load_checkpoint", "grad_views"} <= methods.keys()
    trainer = (BACKEND_DIR.parent / "trainer.py").read_text()
    called = {node.attr for node in ast.walk(ast.parse(trainer)) if _is_backend_attribute(node)}
    assert called, "trainer.py no longer calls self.backend.X: update this test"
    assert called <= methods.keys() | set(Backend.__annotations__), called - methods.keys()


def _is_backend_attribute(node: ast.AST) -> bool:
    """``self.backend.X`` in the trainer."""
    if not isinstance(node, ast.Attribute) or not isinstance(node.value, ast.Attribute):
        return False
    owner = node.value
    return owner.attr == "backend" and isinstance(owner.value, ast.Name) and owner.value.id == "self"


@pytest.mark.parametrize("cls", BACKENDS, ids=lambda c: c.__name__)
def test_every_backend_has_every_protocol_method_with_its_parameters(cls: type) -> None:
    for name, sig in protocol_methods(Backend).items():
        member = inspect.getattr_static(cls, name, None)
        assert member is not None, f"{cls.__name__} lacks {name}"
        assert shape_of(inspect.signature(getattr(cls, name))) == shape_of(sig), f"{cls.__name__}.{name}"


@pytest.mark.parametrize("cls", BACKENDS, ids=lambda c: c.__name__)
def test_every_backend_sets_the_protocol_attributes(cls: type) -> None:
    assert set(Backend.__annotations__) <= attributes_set(cls)


@pytest.mark.parametrize("cls", [LocalShards, ZeroShards, *BACKENDS], ids=lambda c: c.__name__)
def test_trainer_adapters_and_backends_give_shard_views(cls: type) -> None:
    for name, sig in protocol_methods(ShardViews).items():
        assert shape_of(inspect.signature(getattr(cls, name))) == shape_of(sig), f"{cls.__name__}.{name}"


def test_optimizer_state_hooks_are_duck_typed() -> None:
    assert issubclass(ChildAdamW, ShardedStateOptimizer)
    assert not issubclass(torch.optim.AdamW, ShardedStateOptimizer)  # DCP saves its state


# the method (every module under ctscale/methods/); engines see only GradView and protocols.
METHOD_PACKAGE = "ctscale.methods"
ALLOWED = "ctscale.methods.base"  # GradView: the seam's one shared type


def test_no_engine_module_imports_a_method_module() -> None:
    for path in sorted(BACKEND_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                method = name == METHOD_PACKAGE or name.startswith(METHOD_PACKAGE + ".")
                assert not method or name == ALLOWED, f"{path.name} imports {name}"
