"""Keep TensorFlow's and TFLite's native chatter off the user's terminal, without hiding errors.

The TFLite converter and interpreter print from C++ straight to file descriptor 2
(``fully_quantize: 0, inference_type: 6 ...``, ``INFO: Created TensorFlow Lite XNNPACK delegate
for CPU.``), where neither Python's `sys.stderr` nor ``TF_CPP_MIN_LOG_LEVEL`` reaches, and
TensorFlow's Python side logs ``WARNING:tensorflow:`` lines. `quiet_native` mutes both for the
duration of a block: fd 2 goes to a temporary file and the ``tensorflow`` / ``absl`` loggers are
raised to ERROR. When the block raises, the captured text is written to the real stderr before
the exception goes on, so a failed conversion still shows everything the converter said.

    with quiet_native():
        flatbuffer = converter.convert()
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Iterator


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    """The ``tensorflow`` and ``absl`` Python loggers at ERROR for the block, restored after."""
    loggers = [logging.getLogger(name) for name in ("tensorflow", "absl")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def captured_fd2() -> Iterator[list[str]]:
    """Redirect file descriptor 2 (C++ and Python stderr alike) to a temporary file for the block.

    Yields a list that holds the captured text (one string) once the block is over. If the block
    raises, the text is first copied to the real stderr, then the exception propagates.
    """
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        except BaseException:
            failed = True
            raise
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
            captured.append(text)
            if failed and text.strip():
                sys.stderr.write(text if text.endswith("\n") else text + "\n")
                sys.stderr.flush()


@contextlib.contextmanager
def quiet_native() -> Iterator[list[str]]:
    """`captured_fd2` and TensorFlow's Python loggers at ERROR, together (see the module doc)."""
    with _quiet_loggers(), captured_fd2() as captured:
        yield captured
