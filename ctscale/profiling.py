"""A torch.profiler window over a few optimizer steps (``train.profile_from``/``profile_steps``).

Each step's three phases run under ``record_function`` ranges (``ctscale/forward_backward``,
``ctscale/mask``, ``ctscale/optimizer_step``; ~1 us each when no profiler listens). Inside the
window every rank records CPU and, on CUDA, GPU activity and writes to ``output_dir/profile/``:

- ``trace-rank00000.json``: the Chrome trace (chrome://tracing, Perfetto);
- ``ops-rank00000.txt``: the operators with the most self time (GPU time on CUDA, else CPU);
- per phase and step, host milliseconds and the GPU milliseconds of the kernels it launched,
  returned to the trainer, which logs rank 0's as a ``profile`` event in ``metrics.jsonl``.

Host time of the mask phase includes waits: ZeRO-3 synchronises its reduce stream when a
gradient partition is first read there, for vanilla's (empty) loop as well.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from ctscale.storage import atomic

PHASES = ("forward_backward", "mask", "optimizer_step")


def phase(name: str) -> record_function:
    """The profiler range of one step phase (one of ``PHASES``)."""
    return record_function(f"ctscale/{name}")


class StepProfiler:
    """Profiles optimizer steps ``[first, first + count)``; does nothing when ``first`` is None."""

    def __init__(self, first: int | None, count: int, out_dir: Path, rank: int) -> None:
        self.first, self.count = first, count
        self.out_dir, self.rank = out_dir, rank
        self._prof: profile | None = None

    def step_begins(self, step: int) -> None:
        if step != self.first:
            return
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(activities=activities)
        self._prof.__enter__()

    def step_ends(self, step: int) -> dict | None:
        """After the window's last step: write this rank's files, return the phase summary."""
        if self._prof is None or self.first is None or step + 1 != self.first + self.count:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the window's kernels are in the trace
        prof, self._prof, first = self._prof, None, self.first
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"trace-rank{self.rank:05d}.json"
        with atomic.replacing(trace) as tmp:
            prof.export_chrome_trace(str(tmp))
        sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40)
        atomic.write_text(self.out_dir / f"ops-rank{self.rank:05d}.txt", table)
        return {
            "steps": [first, first + self.count],
            "trace": str(trace),
            "phases_ms_per_step": _phase_ms(prof, self.count),
        }


def _phase_ms(prof: profile, steps: int) -> dict[str, dict[str, float]]:
    """Host and GPU milliseconds per step of each ctscale phase range."""
    # the CPU-side ranges: on CUDA the GPU timeline has same-named annotation events of its own
    found = {
        e.key: e
        for e in prof.key_averages()
        if e.key.startswith("ctscale/") and e.device_type == DeviceType.CPU
    }
    out = {}
    for name in PHASES:
        event = found.get(f"ctscale/{name}")
        if event is None:
            continue
        device_us = getattr(event, "device_time_total", 0.0)  # the kernels launched inside the range
        out[name] = {
            "host_ms": round(event.cpu_time_total / 1e3 / steps, 3),
            "gpu_ms": round(device_us / 1e3 / steps, 3),
        }
    return out
