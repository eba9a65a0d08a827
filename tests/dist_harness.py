"""One process-spawning helper for every multi-process test (gloo on CPU).

``run_world(fn, world_size, *args)`` starts ``world_size`` processes with the environment a
launcher would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), calls
``fn(rank, world_size, *args)`` in each, and returns each rank's return value (must be
picklable: plain Python values or CPU tensors). A failing rank fails the test with its
traceback; a rank killed by a signal fails it with ``WorkerCrashed`` (faulthandler prints its
Python stack to stderr); a hung world is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import queue as queue_module
import signal
import socket
import time
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    # a crash in native code (gloo, a kernel) prints every thread's Python stack to stderr
    faulthandler.enable(all_threads=True)
    import torch

    torch.set_num_threads(1)
    try:
        # plain pickle: torch's queue reducers share tensors by file descriptor, which dies
        # with the worker process
        queue.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # report, then let the process die
        queue.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def rerun_once_on_crash(items) -> None:
    """A test whose worker process was killed by a signal runs once more, and only then.

    Seen once in CI: rank 0 of an FSDP2 world died of SIGSEGV inside gloo while gathering the
    state dict, a crash in native code that about 50 local repeats never showed. Every other
    failure, a wrong number included, fails at once; a rerun shows in pytest's summary.
    """
    import pytest

    for item in items:
        item.add_marker(pytest.mark.flaky(reruns=1, only_rerun=[WorkerCrashed]))


class WorkerCrashed(AssertionError):
    """A rank was killed by a signal (a crash in native code: gloo, torch), not by a Python error.

    The other ranks' errors follow from it (a peer's "Connection reset"), so the crash is what
    the message leads with. conftest reruns a test once on this error and only on this one.
    """


def run_world(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, ...)]`` run in separate processes."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    try:
        _collect(procs, queue, results, errors, deadline=time.monotonic() + timeout)
    finally:
        hung = set()
        for r, p in enumerate(procs):
            p.join(timeout=30 if not errors else 5)
            if p.is_alive():
                p.kill()
                hung.add(r)
    crashed = [
        f"rank {r} was killed by {signal.Signals(-p.exitcode).name}"
        for r, p in enumerate(procs)
        if r not in hung and p.exitcode is not None and p.exitcode < 0
    ]
    if crashed:
        raise WorkerCrashed("\n".join(["worker crashed (stderr shows its stack)", *crashed, *errors]))
    if errors:
        raise AssertionError("worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def _collect(procs, queue, results: dict, errors: list, deadline: float) -> None:
    """Fill ``results`` (or ``errors``, at the first failure) from the ranks' reports, checking
    every second for a rank that died without reporting (killed by a signal)."""
    seen_dead: set[int] = set()
    while len(results) < len(procs):
        try:
            rank, status, value = queue.get(timeout=1.0)
        except queue_module.Empty:
            dead = {r for r, p in enumerate(procs) if r not in results and p.exitcode is not None}
            # dead at two checks in a row: a report it sent just before exiting has arrived by now
            if silent := dead & seen_dead:
                errors.extend(
                    f"rank {r} exited ({procs[r].exitcode}) without a result" for r in sorted(silent)
                )
                return
            seen_dead = dead
            if time.monotonic() > deadline:
                errors.append("timed out: the world hung")
                return
            continue
        if status == "error":
            errors.append(f"rank {rank}:\n{value}")
            return
        results[rank] = pickle.loads(value)
