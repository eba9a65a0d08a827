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


def _requirements(group: list[str]) -> list:
    from packaging.requirements import Requirement

    return [Requirement(r) for r in group]


def test_lock_file_is_a_resolution_of_every_declared_requirement():
    """constraints.txt holds every dependency and extra at a version its specifier admits, so
    installing with it cannot conflict with pyproject.toml."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            (req,) = _requirements([line])
            (spec,) = req.specifier
            assert spec.operator == "==", line
            lock[canonicalize_name(req.name)] = spec.version
    groups = [project["dependencies"], *project["optional-dependencies"].values()]
    for req in (r for group in groups for r in _requirements(group)):
        name = canonicalize_name(req.name)
        if name == "ctscale" or (req.marker and not req.marker.evaluate()):
            continue  # an extra naming other extras; tomli on Python < 3.11
        assert name in lock, f"{req.name} is declared but not in constraints.txt; run bash .ci/lock"
        assert req.specifier.contains(lock[name], prereleases=True), (str(req), lock[name])


def test_ci_makes_a_fresh_environment_and_installs_with_the_lock_file():
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"python -m venv \"\$\w+/venv\"", ci) and "mktemp -d" in ci
    assert ci.rstrip().splitlines()[-1] == readme_setup_commands()[1]  # its status is CI's status
    for command in readme_setup_commands():
        for install in re.split(r"&&", command):
            if "pip install" in install:
                assert "-c constraints.txt" in install, install
