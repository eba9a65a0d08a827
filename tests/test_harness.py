"""The multi-process harness names a crashed rank as the cause, and crashes alone are rerun
(from a fresh ``tmp_path``: a half-written checkpoint of the crashed try must not leak in)."""

from __future__ import annotations

import os
import signal
import textwrap
import time

import pytest

from dist_harness import WorkerCrashed, run_world

pytest_plugins = ["pytester"]


def _segfault_rank0(rank: int, world_size: int) -> int:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if rank == 0:
        os.kill(os.getpid(), signal.SIGSEGV)
    dist.barrier()  # rank 1 fails (peer reset) or waits here
    return rank


def _raise_on_rank1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("a Python error")
    return rank


def test_a_rank_killed_by_a_signal_is_named_as_the_cause():
    start = time.monotonic()
    with pytest.raises(WorkerCrashed, match="rank 0 was killed by SIGSEGV"):
        run_world(_segfault_rank0, 2, timeout=120)
    assert time.monotonic() - start < 60, "the dead rank was found only at the timeout"


def test_a_python_error_is_a_plain_failure_with_its_traceback():
    with pytest.raises(AssertionError, match="ValueError: a Python error") as failure:
        run_world(_raise_on_rank1, 2)
    assert not isinstance(failure.value, WorkerCrashed)


def test_only_a_crash_is_rerun(pytester):
    pytester.makeconftest(
        f"""
        import sys
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from dist_harness import rerun_once_on_crash

        def pytest_collection_modifyitems(items):
            rerun_once_on_crash(items)
        """
    )
    pytester.makepyfile(
        textwrap.dedent(
            """
            from dist_harness import WorkerCrashed

            calls = {"crash": 0, "wrong": 0}

            def test_crash_then_pass(tmp_path):
                assert not any(tmp_path.iterdir()), "the rerun must start from a fresh tmp_path"
                (tmp_path / "checkpoint").touch()
                calls["crash"] += 1
                if calls["crash"] == 1:
                    raise WorkerCrashed("rank 0 was killed by SIGSEGV")

            def test_wrong_number():
                calls["wrong"] += 1
                assert calls["wrong"] == 0, "a wrong number"
            """
        )
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert (outcomes["passed"], outcomes["failed"], outcomes["rerun"]) == (1, 1, 1)
