"""Files on disk are whole or absent: every write goes to a temporary file beside its target,
is flushed to disk, then renamed onto it (``os.replace`` is atomic within a directory).
Directories (an exported model, a checkpoint) are filled under a temporary name and swapped in
by ``replace_dir``. The one home of these writes: nothing else in ctscale renames files.

A writer killed half way leaves only ``.NAME.tmp-PID-XXXX``, which no reader opens and the next
run removes (``CheckpointManager.remove_stale``). The file gets the mode a plain ``open()``
would give it (0666 less the umask), like every other file of a run, so that a group can read
it on a shared cluster filesystem.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; set it straight back
    os.umask(mask)
    return mask


def temp_file(path: Path) -> Path:
    """A new empty file beside ``path`` for its next content (the caller renames or removes it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
    os.close(fd)
    return Path(tmp)


def commit(tmp: Path, path: Path) -> None:
    """Flush ``tmp`` to disk, give it the umask's mode and rename it onto ``path``."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    # mkstemp makes 0600, and a writer may have replaced the file with one of its own modes
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """``with replacing(path) as tmp: <write tmp>``: afterwards ``path`` holds all of what was
    written, or, if the block raised, its old content (and no temporary file is left)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path``'s content with ``text`` (UTF-8), atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete directory ``tmp`` onto ``final``; an old ``final`` is set aside first
    and removed only after the swap, so a crash leaves the old or the new one in place."""
    old = final.with_name(f".{final.name}.tmp-old-{os.getpid()}")  # stale ones: remove_stale
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def replacing_dir(path: str | Path) -> Iterator[Path]:
    """``with replacing_dir(path) as tmp: <fill directory tmp>``: afterwards ``path`` is the
    new directory, or, if the block raised, the old one (and the temporary one is gone)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
