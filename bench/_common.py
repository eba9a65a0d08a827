"""Helpers shared by the bench/ scripts: the machine line, medians, tables, process spawning."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/dist_harness.run_world: N gloo processes

from dist_harness import run_world  # noqa: E402

__all__ = ["REPO", "RssPeak", "load", "machine_line", "median", "run_world", "table"]


def load() -> str:
    """The 1/5/15-minute load averages, e.g. '5.9/5.7/5.4'."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def machine_line() -> str:
    """CPU model, cores, RAM, load average, Python/torch versions: printed above every table."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory()
    return (
        f"{model}, {os.cpu_count()} cores, {mem.total / 2**30:.0f} GiB RAM "
        f"({mem.available / 2**30:.0f} GiB available), load {load()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class RssPeak:
    """Peak resident set size of this process while the ``with`` block runs.

    A daemon thread samples ``psutil.Process().memory_info().rss`` every ``interval`` seconds
    (torch ops release the GIL, so it keeps sampling during long kernels). An allocation that
    lives shorter than the interval can be missed; the sample at exit is always taken.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> RssPeak:
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
