"""Output folders of commands (``--out``): refuse a file there, and leave nothing behind on failure.

    check_out_folder(path)         a UserError when `path` exists and is no folder
    with created_folder(path):     makes `path` (and missing parents); if the block fails,
        ...                        removes the folders it made, with what the block put there

A command that fails therefore leaves no empty (or half-filled) ``--out`` folder it created
itself; a folder that existed before is never removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator, Optional


def check_out_folder(path: str, option: str = "--out") -> None:
    """Raise `UserError` ``<option> <path>: is a file; give a folder`` when `path` exists and is
    not a folder (a file, a dangling link, a device)."""
    from mobilenet_embed.errors import UserError

    if os.path.lexists(path) and not os.path.isdir(path):
        what = "is a file" if os.path.isfile(path) else "exists and is not a folder"
        raise UserError(f"{option} {path}: {what}; give a folder")


def _first_missing(path: str) -> Optional[str]:
    """The outermost folder of `path` that does not exist yet (None when `path` exists)."""
    missing = None
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        missing = current
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return missing


@contextlib.contextmanager
def created_folder(path: str, option: str = "--out") -> Iterator[str]:
    """Make the folder `path` for the block (`check_out_folder` first); when the block raises,
    remove the folders this call created, so a failed command leaves no ``--out`` folder behind."""
    check_out_folder(path, option)
    made = _first_missing(path)
    os.makedirs(path, exist_ok=True)
    try:
        yield path
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
