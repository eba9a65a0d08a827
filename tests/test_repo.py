"""The repository keeps its promises: README commands, shipped configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ctscale.config import load_config

REPO = Path(__file__).resolve().parents[1]


def readme_setup_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_two_setup_commands_and_ci_runs_the_test_one():
    demo, test = readme_setup_commands()
    assert "ctscale train --config configs/" in demo and "torch==2.13.0" in demo
    assert "pytest" in test and "torch==2.13.0" in test
    assert test in (REPO / ".ci" / "run").read_text().splitlines()
    config = demo.split("--config ")[1].split()[0]
    assert (REPO / config).is_file()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.method.name in ("vanilla", "ct-f", "ct-d")
