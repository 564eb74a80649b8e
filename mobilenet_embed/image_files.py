"""Which files are images, and the images of an identity folder: one answer for every command.

`IMAGE_EXTENSIONS` (matched case-insensitively) are those `mobilenet_embed.data.decode` reads:
`TF_EXTENSIONS` through TensorFlow's decoders, `PILLOW_EXTENSIONS` through Pillow. `scan_folder`
lists an identity folder for training (`data.index`), `mbembed eval --make-pairs`
(`pairs.identity_folders`) and `mbembed export embeddings` alike. No TensorFlow here, so the
pairs tools stay light.
"""

from __future__ import annotations

import os

TF_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
PILLOW_EXTENSIONS = (".pgm", ".ppm", ".pbm", ".pnm", ".tif", ".tiff")
IMAGE_EXTENSIONS = TF_EXTENSIONS + PILLOW_EXTENSIONS


def scan_folder(root: str) -> tuple[dict[str, list[str]], dict[str, tuple[int, int]], int]:
    """(identity -> [paths], {path: (size, mtime_ns)}, ignored file count) of an identity folder.

    Each sub-folder of `root` is an identity; its images are found at any depth below it.
    Hidden entries are skipped; files of other extensions and files at the top level counted
    as ignored."""
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
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    children = list(it)
            except OSError:
                continue
            for child in children:
                if child.name.startswith("."):
                    continue
                if child.is_dir():
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
