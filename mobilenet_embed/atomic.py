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
    with writing(path): ...        any other writer (a TF checkpoint, a SavedModel)

A write that fails for a reason the user can fix (no space left, read-only or forbidden folder,
quota; `write_failure`) becomes one `UserError`: ``<path>: cannot write: No space left on device``,
the temporary file removed and the old `path` intact. This is the one place that translation
happens: every writer above goes through it.

Local paths only; `mobilenet_embed.data.tfrecord` writes shards through `tf.io.gfile`, which
may be remote.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Iterator, Optional

import numpy as np

from mobilenet_embed.errors import UserError

TMP_PREFIX = ".tmp-"

# What the OS says when a write cannot be done; TensorFlow's file errors carry the same words.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO)


def write_failure(exc: BaseException) -> Optional[str]:
    """Why a write failed, in the OS's words (``No space left on device``), or None when `exc` is
    not a failed write. Any `OSError` is one; a TensorFlow error is one when its message carries
    one of the OS reasons above (TF reports ENOSPC as ``ResourceExhaustedError: ...; No space left
    on device``)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc).strip() or exc.__class__.__name__
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(exc, tf.errors.OpError):
        text = str(exc)
        for code in _WRITE_ERRNOS:
            if os.strerror(code) in text:
                return os.strerror(code)
    return None


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turn a failed write inside the block (`write_failure`) into ``UserError('<path>: cannot
    write: <reason>')``; other exceptions pass unchanged. Clean-up of partial output is the caller's."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - filtered by write_failure, re-raised otherwise
        reason = write_failure(exc)
        if reason is None:
            raise
        raise UserError(f"{path}: cannot write: {reason}") from None


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
    left as it was; a failed write (disk full, read-only folder) raises `UserError` naming `path`
    (`writing`). Returns `path`.
    """
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    tmp = None
    with writing(path):
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{name}-", suffix=os.path.splitext(name)[1],
                                       dir=folder)
            os.close(fd)
            write(tmp)
            _fsync_file(tmp)
            os.replace(tmp, path)
        finally:
            if tmp is not None and os.path.lexists(tmp):
                remove(tmp)
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
    complete directory or, for an instant, nothing. A failed rename raises `UserError` naming
    `final` (`writing`); `tmp` is then the caller's to remove.
    """
    with writing(final):
        _replace_dir(tmp, final)


def _replace_dir(tmp: str, final: str) -> None:
    if os.path.isdir(final) and not os.path.islink(final) or (
            os.path.lexists(final) and os.path.isdir(tmp) != os.path.isdir(final)):
        aside = os.path.join(os.path.dirname(final), f".old-{os.path.basename(final)}-{os.getpid()}")
        remove(aside)
        os.replace(final, aside)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(aside, final)  # the old one back: `final` is never left missing
            raise
        remove(aside)
    else:
        os.replace(tmp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))
