"""One process per run directory: a lock file holding the owner's pid, host and start time.

    with run_lock("runs/x", log=print):
        ...   # train; a second process on runs/x stops with a UserError naming this one

The file (``RUN_DIR/.lock``, JSON) is created with O_CREAT | O_EXCL, so of two processes that
start together exactly one gets it. A lock left by a process that died (same host, pid no longer
running) is taken over, and said so; a lock of another host cannot be checked and is refused.
The lock is removed on exit, on exceptions too, and with it the folder when the lock created it
and nothing else was written there (a command that failed early leaves no empty folder). `train`
locks its run directory, `export` and `export embeddings` their --out folder.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import time
from typing import Callable, Iterator, Optional

from mobilenet_embed import atomic
from mobilenet_embed.errors import UserError

LOCK_NAME = ".lock"


def pid_running(pid: int) -> bool:
    """Whether a process with this pid exists on this host (another user's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def _read(path: str) -> Optional[dict]:
    """The holder recorded in a lock file; None when the file is gone; {} when unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _holder(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} "
            f"since {info.get('started', '?')}")


class RunLock:
    """The lock of one run directory; `acquire` / `release`, or use it as a context manager."""

    def __init__(self, run_dir: str, log: Optional[Callable[[str], None]] = None):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.log = log or (lambda _text: None)
        self.info: Optional[dict] = None
        self.created_dir = False  # whether acquire made `run_dir` (removed on release when left empty)

    def _try_create(self) -> bool:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        with atomic.writing(self.path):  # a read-only or full folder: one line naming the lock file
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(info, fh)
                    fh.write("\n")
            except OSError:
                os.unlink(self.path)
                raise
        self.info = info
        return True

    def _take_over(self, stale: dict) -> bool:
        """Move a stale lock aside (atomic rename: one process wins), checking it is still the
        stale one, then create ours. False when another process got there first."""
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return self._try_create()
        moved = _read(aside)
        if moved != stale:  # a live lock was created in between: put it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
        return self._try_create()

    def acquire(self) -> "RunLock":
        """Take the lock or raise `UserError` naming its holder."""
        if os.path.lexists(self.run_dir) and not os.path.isdir(self.run_dir):
            raise UserError(f"{self.run_dir}: exists and is not a folder")
        if not os.path.isdir(self.run_dir):
            with atomic.writing(self.run_dir), contextlib.suppress(FileExistsError):
                os.makedirs(self.run_dir)
                self.created_dir = True
        for attempt in range(5):
            if self._try_create():
                return self
            info = _read(self.path)
            if info is None:
                continue  # released meanwhile
            if not info and attempt < 4:
                time.sleep(0.2)  # empty: its owner is writing it (create, then write)
                continue
            same_host = info.get("host") == socket.gethostname()
            pid = info.get("pid")
            if same_host and isinstance(pid, int) and not pid_running(pid):
                if self._take_over(info):
                    self.log(f"note: {self.run_dir}: took over the lock of {_holder(info)} "
                             "(that process is no longer running)")
                    return self
                continue
            if not info:
                raise UserError(f"{self.run_dir}: the lock file {self.path} is unreadable: remove it if "
                                "no run is using it")
            hint = "" if same_host else f"; if that process is gone, remove {self.path}"
            raise UserError(f"{self.run_dir} is in use by {_holder(info)}{hint}")
        raise UserError(f"{self.run_dir}: cannot take the lock {self.path} (it keeps changing)")

    def release(self) -> None:
        """Remove the lock file if it is still ours (and the folder, if the lock made it and it is
        empty now)."""
        if self.info is None:
            return
        if _read(self.path) == self.info:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.info = None
        if self.created_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.run_dir)  # only when empty

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def run_lock(run_dir: str, log: Optional[Callable[[str], None]] = None) -> Iterator[RunLock]:
    """Hold `run_dir`'s lock for the duration of the block (see `RunLock`)."""
    with RunLock(run_dir, log=log) as lock:
        yield lock
