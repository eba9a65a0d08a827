"""Checkpoints that are complete or absent: written under a temporary name, renamed into place,
and only then pointed to by ``latest``.

Layout under ``output_dir/checkpoints``::

    step-00000040/            one complete checkpoint
        trainer_state.json    step, world size, model fingerprint, mask path (rank 0)
        ...                   the backend's own files (model, optimizer, scheduler, RNG)
    latest                    the name of the newest complete checkpoint

A writer killed half way leaves a ``.tmp-*`` directory that nothing reads and the next save
removes; ``latest`` moves only after the rename. The mask (CT-D) lives in the run directory and
the data order and CT-F masks are functions of the step, so the step restores them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ctscale import dist
from ctscale.backends.base import Backend
from ctscale.errors import CtscaleError

STATE_FILE = "trainer_state.json"


def replace_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temp)`` next to ``path``, then ``os.replace``: readers never see a torn file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    replace_atomic(path, lambda tmp: tmp.write_text(text))


class CheckpointManager:
    """Saves and finds checkpoints of one run. ``save`` and ``load`` are collective."""

    def __init__(self, output_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    def save(self, backend: Backend, step: int, state: dict) -> Path:
        """Checkpoint after optimizer step ``step``; returns the final directory."""
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if dist.is_main():
            for stale in self.root.glob(".tmp-*"):  # left by a writer that died
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        backend.save_checkpoint(tmp)
        dist.barrier()  # every rank's files are complete
        if dist.is_main():
            _write_atomic(tmp / STATE_FILE, json.dumps({"step": step, **state}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _write_atomic(self.root / "latest", final.name)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step-*") if (p / STATE_FILE).is_file())
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when the run has none."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / STATE_FILE).is_file():
            raise CtscaleError(
                f"{pointer} points to {path.name}, which is missing or incomplete; delete "
                f"{pointer} to resume from an older checkpoint, or start a new output_dir"
            )
        return path

    def load(self, backend: Backend, path: Path, expected: dict) -> dict:
        """Restore ``backend`` from ``path``; ``expected`` keys must match the saved state."""
        state = json.loads((path / STATE_FILE).read_text())
        for key, value in expected.items():
            if state.get(key) != value:
                raise CtscaleError(
                    f"checkpoint {path} was written with {key}={state.get(key)!r}, this run has "
                    f"{key}={value!r}; resume with the same setting or start a new output_dir"
                )
        backend.load_checkpoint(path)
        return state
