"""Crash-safe writes: every file mbembed writes goes to a temporary name, then is renamed.

A reader (or a rerun after SIGKILL) sees the old file or the complete new one, never half a
file. The temporary name is unique (`tempfile.mkstemp` in the destination folder, hidden:
``.tmp-<name>-XXXXXXXX<ext>``, the extension kept for writers that go by it, such as
matplotlib and `np.save`), so two processes never share one. The file is fsynced before the
rename and its folder after, so the rename itself survives a power cut.

    write_text(path, text)         write_json(path, data, indent=1)
    write_bytes(path, data)        write_npy(path, array)
    atomic_write(path, write)      write(tmp) fills the temporary file (any writer)
    replace_dir(tmp_dir, final)    put a finished directory in place of `final`

Local paths only; `mobilenet_embed.data.tfrecord` writes shards through `tf.io.gfile`, which
may be remote.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable

import numpy as np

TMP_PREFIX = ".tmp-"


def fsync_dir(folder: str) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Write `path` through ``write(tmp)`` on a unique temporary file beside it, fsync, rename.

    Creates the folder when missing. On any error the temporary file is removed and `path` is
    left as it was. Returns `path`.
    """
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{name}-", suffix=os.path.splitext(name)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    fsync_dir(folder)
    return path


def write_bytes(path: str, data: bytes) -> str:
    """`data` written to `path` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, write)


def write_text(path: str, text: str, newline: str | None = None) -> str:
    """`text` (UTF-8) written to `path` atomically; `newline` as `open` takes it."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline=newline) as fh:
            fh.write(text)

    return atomic_write(path, write)


def write_json(path: str, data: Any, **dumps_kwargs: Any) -> str:
    """``json.dumps(data, **dumps_kwargs)`` written to `path` atomically (no trailing newline)."""
    return write_text(path, json.dumps(data, **dumps_kwargs))


def write_npy(path: str, array: np.ndarray) -> str:
    """`array` saved as ``.npy`` at `path` atomically (`path` should end in ``.npy``)."""
    return atomic_write(path, lambda tmp: np.save(tmp, array))


def remove(path: str) -> None:
    """Remove a file, a link or a directory tree; nothing when `path` does not exist."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def replace_dir(tmp: str, final: str) -> None:
    """Move the finished file or directory `tmp` to `final`, replacing what is there.

    Files: one atomic `os.replace`. Directories (which `os.replace` cannot put over a non-empty
    one): the old one is renamed aside first and removed after, so `final` always names a
    complete directory or, for an instant, nothing.
    """
    if os.path.isdir(final) and not os.path.islink(final) or (
            os.path.lexists(final) and os.path.isdir(tmp) != os.path.isdir(final)):
        aside = os.path.join(os.path.dirname(final), f".old-{os.path.basename(final)}-{os.getpid()}")
        remove(aside)
        os.replace(final, aside)
        os.replace(tmp, final)
        remove(aside)
    else:
        os.replace(tmp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))
