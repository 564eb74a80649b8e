"""Which files are images, and the images of an identity folder: one answer for every command.

`IMAGE_EXTENSIONS` (matched case-insensitively) are those `mobilenet_embed.data.decode` reads:
`TF_EXTENSIONS` through TensorFlow's decoders, `PILLOW_EXTENSIONS` through Pillow. `scan_folder`
lists an identity folder for training (`data.index`), `mbembed eval --make-pairs`
(`pairs.identity_folders`) and `mbembed export embeddings` alike. No TensorFlow here, so the
pairs tools stay light.
"""

from __future__ import annotations

import os
from typing import Optional

TF_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
PILLOW_EXTENSIONS = (".pgm", ".ppm", ".pbm", ".pnm", ".tif", ".tiff")
IMAGE_EXTENSIONS = TF_EXTENSIONS + PILLOW_EXTENSIONS


def display_path(path: str) -> str:
    """`path` printable whatever its bytes: a name that is not UTF-8 (read by `os.scandir` as
    surrogate escapes) is shown with ``\\xNN`` escapes, e.g. ``faces/id1/\\xff.jpg``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_utf8_name(path: str) -> bool:
    """True when `path` is valid UTF-8 (TensorFlow's file ops accept it)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _dir_key(entry: os.DirEntry):
    """(device, inode) of the folder `entry` leads to (links followed); None if it cannot be read."""
    try:
        st = entry.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def scan_folder(root: str, problems: Optional[list] = None
                ) -> tuple[dict[str, list[str]], dict[str, tuple[int, int]], int]:
    """(identity -> [paths], {path: (size, mtime_ns)}, ignored file count) of an identity folder.

    Each sub-folder of `root` is an identity; its images are found at any depth below it,
    following symbolic links to folders, except one that leads to a folder already scanned for
    this identity (a symlink loop such as ``x -> ..``: skipped, so the scan always ends).
    Hidden entries are skipped; files of other extensions and files at the top level counted
    as ignored. `problems`: when a list, gets ``(path, reason)`` for every folder skipped (a
    symlink loop, a folder that cannot be listed)."""
    files: dict[str, list[str]] = {}
    stats: dict[str, tuple[int, int]] = {}
    ignored = 0
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            ignored += 1
            continue
        found: list[str] = []
        stack = [entry.path]
        seen = {_dir_key(entry)}
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    children = list(it)
            except OSError as exc:
                if problems is not None:
                    problems.append((folder, f"cannot list folder ({exc.strerror or exc}); skipped"))
                continue
            for child in children:
                if child.name.startswith("."):
                    continue
                if child.is_dir():
                    key = _dir_key(child)
                    if key is not None and key in seen:
                        if problems is not None:
                            problems.append((child.path, "symlink loop (leads to a folder already scanned); skipped"))
                        continue
                    seen.add(key)
                    stack.append(child.path)
                elif os.path.splitext(child.name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(child.path)
                    try:
                        st = child.stat()
                        stats[child.path] = (int(st.st_size), int(st.st_mtime_ns))
                    except OSError:
                        pass
                else:
                    ignored += 1
        if found:
            files[entry.name] = sorted(found)
    return files, stats, ignored
