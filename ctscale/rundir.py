"""When a new run may use ``train.output_dir``: never over a finished run or another config.

A run directory belongs to one run. Checked before any model is loaded, on every rank (one
verdict, so no rank is left waiting in a collective):

* a file, or a directory nobody can write in (permissions, read-only filesystem): error;
* no ``config.yaml``: not a run directory (it may hold a mask from ``ctscale fisher``): use it;
* ``train.overwrite: true``: the old run's files are removed when the new run starts;
* a different resolved config (``train.resume`` / ``overwrite`` / ``output_dir`` aside, and on
  resume the bookkeeping keys: checkpoint, log, eval and profile frequency): error;
* ``train.resume: true``: continue from the newest checkpoint (error if the run is finished and
  has none: resuming would only start it again);
* a finished run (``finished.json``), or an interrupted one with checkpoints: error, naming
  ``train.overwrite`` and ``train.resume``;
* the same config, interrupted before its first checkpoint: start it again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ctscale import dist
from ctscale.config import Config, config_to_dict, load_config
from ctscale.errors import ConfigError, CtscaleError
from ctscale.storage import atomic

CONFIG_FILE = "config.yaml"
FINISHED_FILE = "finished.json"  # written last by a run that completed; holds its final metrics
# Everything a run writes into its directory; removed before another run starts there.
RUN_FILES = (
    CONFIG_FILE,
    FINISHED_FILE,
    "metrics.jsonl",
    "model",
    "checkpoints",
    "tensorboard",
    "wandb",  # train.report_to trackers' local files
    "mlruns",
    "profile",
    "mask.safetensors",
    "mask",
)
# Keys that may differ between the run in a directory and the one continuing or replacing it.
_SAME_RUN_ANYWAY = {"train.resume", "train.overwrite", "train.output_dir"}
# Bookkeeping a restart may change without changing what is trained: how often to checkpoint,
# log and evaluate, how many checkpoints to keep, what to profile.
_BOOKKEEPING = {
    *("train.save_every", "train.keep_checkpoints", "train.log_every", "train.tensorboard"),
    *("train.eval_every_epoch", "train.eval_batch_size", "train.profile_from", "train.profile_steps"),
    *("train.eval_every", "train.report_to"),
}


def check_writable(path: Path, what: str = "train.output_dir") -> None:
    """ConfigError unless ``path`` is (or can become) a directory this process can write in.

    Probes by creating and removing a temp file in ``path`` or its nearest existing parent:
    permission bits alone say nothing for root or a read-only mount."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}={str(path)!r} is a file, not a directory; choose another {what}")
    base = path
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise ConfigError(
            f"{what}={str(path)!r} cannot be created: {str(base)!r} is a file; choose another {what}"
        )
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".ctscale-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(
            f"{what}={str(path)!r} is not writable ({err.strerror} in {str(base)!r}); choose a "
            f"writable {what} or fix its permissions"
        ) from None


def _flat(cfg: Config) -> dict[str, object]:
    return {f"{s}.{k}": v for s, keys in config_to_dict(cfg).items() for k, v in keys.items()}


def _differences(old: Config, new: Config) -> list[str]:
    before, now = _flat(old), _flat(new)
    ignored = _SAME_RUN_ANYWAY | (_BOOKKEEPING if new.train.resume else set())
    keys = sorted(k for k in now if k not in ignored and before.get(k) != now[k])
    return [f"{k}: {before.get(k)!r} there, {now[k]!r} now" for k in keys]


def check_reuse(out: Path, cfg: Config) -> bool:
    """ConfigError if this run may not use ``out`` (see the module docstring); True when ``out``
    holds an earlier run (whose files go when this one starts, unless it resumes)."""
    previous = out / CONFIG_FILE
    if not previous.is_file():
        return False
    if cfg.train.overwrite:
        return True
    where = f"train.output_dir={str(out)!r}"
    replace = "set train.overwrite=true to replace it, or choose a new train.output_dir"
    try:
        old = load_config(previous)
    except CtscaleError as err:
        raise ConfigError(
            f"{where} holds a run whose {CONFIG_FILE} cannot be read ({err}); {replace}"
        ) from None
    if diffs := _differences(old, cfg):
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise ConfigError(f"{where} holds another run ({'; '.join(diffs[:3])}{more}); {replace}")
    finished = (out / FINISHED_FILE).is_file()
    checkpoint = (out / "checkpoints" / "latest").is_file()
    if cfg.train.resume:
        if finished and not checkpoint:
            raise ConfigError(f"{where} holds a finished run without a checkpoint to resume from; {replace}")
        return True
    if finished:
        raise ConfigError(f"{where} holds a finished run of this config; {replace}")
    if checkpoint:
        raise ConfigError(
            f"{where} holds an interrupted run with checkpoints; set train.resume=true to continue "
            "it, train.overwrite=true to start it again, or choose a new train.output_dir"
        )
    return True


def check_mask_out(out: Path, mask_out: Path, cfg: Config) -> None:
    """``ctscale fisher``: ``mask_out`` (a ``.safetensors`` file or a sharded directory) must be
    writable, and must not replace the mask of a run in ``out`` unless ``train.overwrite``."""
    single = mask_out.suffix == ".safetensors" and not mask_out.is_dir()
    check_writable(mask_out.parent if single else mask_out, "--out")
    inside = mask_out.resolve().is_relative_to(out.resolve())
    if inside and (out / CONFIG_FILE).is_file() and not cfg.train.overwrite:
        raise ConfigError(
            f"--out {str(mask_out)!r} is inside train.output_dir={str(out)!r}, which holds a run: "
            "the new mask would replace that run's; pass --out elsewhere, or set "
            "train.overwrite=true"
        )


def verdict(check) -> None:
    """Run ``check()`` on every rank; if it fails on any, raise the first rank's error on all.

    Collective (one small all-gather), so every rank stops, none waits for the others."""
    error = None
    try:
        check()
    except ConfigError as err:
        error = str(err)
    errors = [e for e in dist.all_gather_objects(error) if e]
    if errors:
        raise ConfigError(errors[0])


def clear_previous(out: Path, keep: set[Path]) -> None:
    """Remove the earlier run's files from ``out`` (rank 0), except the paths in ``keep`` (this
    run's mask: written by its Fisher pass, or the ``method.mask_file`` it trains with)."""
    keep = {p.resolve() for p in keep}
    for name in RUN_FILES:
        path = out / name
        if path.resolve() in keep or not (path.exists() or path.is_symlink()):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def mark_finished(out: Path, record: dict) -> None:
    """Write ``finished.json`` atomically (rank 0): the last file of a completed run."""
    atomic.write_text(out / FINISHED_FILE, json.dumps(record, indent=1) + "\n")


def unmark_finished(out: Path) -> None:
    """A resumed run is running again until it completes."""
    (out / FINISHED_FILE).unlink(missing_ok=True)
