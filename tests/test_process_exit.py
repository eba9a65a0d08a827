"""How a ``ctscale`` process ends: a process that joined a process group leaves through
``dist.exit_process`` (exit handlers, flushed streams, ``os._exit``), any other exits as usual."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as tdist

from ctscale import cli, dist


def _python(script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_a_process_that_left_a_group_exits_with_its_code_after_its_exit_handlers(tmp_path):
    """A real one-rank gloo group, held past destroy_process_group the way FSDP2 holds it."""
    done = _python(
        f"""
        import atexit, pathlib, torch.distributed as d
        from ctscale import dist
        atexit.register(lambda: pathlib.Path({str(tmp_path / "handler_ran")!r}).write_text("yes"))
        d.init_process_group("gloo", store=d.HashStore(), rank=0, world_size=1)
        held = d.group.WORLD
        print("buffered, not flushed")  # stdout is a pipe here: block-buffered
        dist.shutdown()
        dist.exit_process(7)
        print("unreachable")
        """,
        tmp_path,
    )
    assert done.returncode == 7, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["buffered, not flushed"]
    assert (tmp_path / "handler_ran").read_text() == "yes"


def test_a_rank_that_lost_its_peers_exits_with_the_code_main_returned(tmp_path):
    """main returns 3 without leaving the group (a peer is gone): still the os._exit path."""
    done = _python(
        """
        import torch.distributed as d
        from ctscale import dist
        d.init_process_group("gloo", store=d.HashStore(), rank=0, world_size=1)
        dist.exit_process(3)
        """,
        tmp_path,
    )
    assert done.returncode == 3, done.stderr[-2000:]


def test_fsdp2_keeps_gloos_threads_running_past_destroy_process_group(tmp_path):
    """Why exit_process exists (torch 2.13). Should this fail after a torch upgrade, the
    interpreter's teardown may be safe again; the exit path is harmless either way."""
    done = _python(
        """
        import gc, os, sys, torch, torch.distributed as d
        from torch.distributed.fsdp import fully_shard

        def threads():
            return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))

        d.init_process_group("gloo", store=d.HashStore(), rank=0, world_size=1)
        if sys.argv[1:] == ["fsdp"]:
            model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
            fully_shard(model)
            model(torch.randn(4, 8)).sum().backward()
            del model
        d.barrier()
        d.destroy_process_group()
        gc.collect()
        print(" ".join(threads()))
        """,
        tmp_path,
        "fsdp",
    )
    assert "pt_gloo_runloop" in done.stdout.split(), done.stdout + done.stderr[-2000:]
    plain = _python(
        "import torch.distributed as d; d.init_process_group('gloo', store=d.HashStore(), rank=0, "
        "world_size=1); d.destroy_process_group(); import os; print(len(os.listdir('/proc/self/task')))",
        tmp_path,
    )
    assert plain.stdout.split() == ["1"], plain.stdout + plain.stderr[-2000:]  # no FSDP2: all stopped


def test_without_a_process_group_exit_process_returns_and_run_exits_as_usual(monkeypatch):
    assert not tdist.is_initialized()
    monkeypatch.setattr(dist, "_left_group", False)
    assert dist.exit_process(5) is None  # returned: the interpreter's own exit follows
    monkeypatch.setattr(cli, "main", lambda: 4)
    with pytest.raises(SystemExit) as leaving:
        cli.run()
    assert leaving.value.code == 4


def test_python_dash_m_ctscale_and_the_console_script_go_through_run():
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ctscale"] == "ctscale.cli:run"
    assert "run()" in (repo / "ctscale" / "__main__.py").read_text()
