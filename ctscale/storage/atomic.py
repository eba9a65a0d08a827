"""Files on disk are whole or absent: every write goes to a temporary file beside its target,
is flushed to disk, then renamed onto it (``os.replace`` is atomic within a directory).

A writer killed half way leaves only ``.NAME.tmp-PID-XXXX``, which no reader opens and the next
run removes (``CheckpointManager.remove_stale``). The file gets the mode a plain ``open()``
would give it (0666 less the umask), like every other file of a run, so that a group can read
it on a shared cluster filesystem.
"""

from __future__ import annotations

import contextlib
import os
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
