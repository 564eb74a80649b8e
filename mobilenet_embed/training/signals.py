"""SIGINT / SIGTERM during training: finish the current step (and its logging), checkpoint, return.

A second signal aborts at once (`KeyboardInterrupt`); checkpoints are atomic either way. Handlers
are installed only in the main thread (Python's rule) and restored on exit.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional


class StopSignals:
    """Context manager; ``bool(stop)`` says whether a stop was asked, ``stop.name`` by which signal."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.name: Optional[str] = None
        self._previous: dict = {}

    def __bool__(self) -> bool:
        return self.name is not None

    def _on_signal(self, signum, frame) -> None:
        if self.name is not None:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
