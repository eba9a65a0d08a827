"""Nothing a user might receive from someone else is unpickled.

Masks and exported models are safetensors; every ``torch.load`` in ctscale passes
``weights_only=True``; no module imports pickle; ``trust_remote_code`` is off unless the config
turns it on and is passed through, never hard-coded on.
"""

from __future__ import annotations

import ast
from pathlib import Path

from ctscale.config import Config

PACKAGE = Path(__file__).resolve().parents[1] / "ctscale"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.expr) -> str:
    return ast.unparse(func)


def test_every_torch_load_is_weights_only_and_nothing_imports_pickle():
    loads = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names), path
        for call in _calls(tree):
            if _name(call.func) in ("torch.load", "load") and "torch" in _name(call.func):
                loads += 1
                flags = {k.arg: ast.unparse(k.value) for k in call.keywords}
                assert flags.get("weights_only") == "True", (
                    f"{path}:{call.lineno} torch.load without weights_only=True"
                )
            for keyword in call.keywords:
                if keyword.arg == "trust_remote_code":
                    assert ast.unparse(keyword.value) != "True", (
                        f"{path}:{call.lineno} hard-codes trust_remote_code"
                    )
    assert loads >= 2  # the scan really sees the checkpoint loaders


def test_remote_code_is_off_by_default():
    assert Config().model.trust_remote_code is False


def test_mask_store_reads_safetensors_only():
    source = (PACKAGE / "storage" / "mask_file.py").read_text()
    assert "safe_open" in source and "torch.load" not in source and "pickle" not in source
