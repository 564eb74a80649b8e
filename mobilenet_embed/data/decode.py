"""Decoding image files, and the decode check that gates what training may read.

Two decoders:

- TensorFlow (`tf.io.decode_image`): JPEG, PNG, BMP, GIF (first frame) and, on TF >= 2.18,
  WebP. Pure graph ops: no Python in the per-image path of the tf.data pipelines.
- Pillow, through one `tf.py_function`, for what TensorFlow cannot decode (PGM/PPM/PBM, TIFF,
  1-bit BMP, ...). Used only for files the check routed there (or, without a check, by file
  extension).

Both give uint8 ``[H, W, 3]``: greyscale is replicated to RGB; the alpha channel of RGBA/LA
images is dropped (not composited), as `tf.io.decode_png(channels=3)` does.

`check_files` decodes every file once (a parallel tf.data pass, then Pillow for the files
TensorFlow refused) and sorts them into ``tf`` / ``pillow`` / bad with a one-line reason:
``empty file (0 bytes)``, ``file not found``, ``truncated JPEG``, ``corrupt JPEG (...)``,
``not an image (unrecognised content)``, ... Results are cached by (path, size, mtime) in a
JSON file under `data.check_cache` (one file per folder), so an unchanged folder checks
instantly the second time; a file whose size or mtime changed is decoded again.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import tensorflow as tf

from mobilenet_embed import atomic
from mobilenet_embed.image_files import IMAGE_EXTENSIONS, PILLOW_EXTENSIONS, TF_EXTENSIONS  # noqa: F401


ROUTE_TF, ROUTE_PILLOW, ROUTE_BAD = "tf", "pillow", "bad"
CACHE_VERSION = 1


def decode_image_bytes(contents: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG/BMP/GIF(/WebP) bytes -> uint8 ``[H, W, 3]`` (graph op, no Python)."""
    image = tf.io.decode_image(contents, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image


def pillow_decode_file(path) -> np.ndarray:
    """Decode any file Pillow reads to uint8 ``[H, W, 3]`` (first frame; alpha dropped)."""
    from PIL import Image

    if isinstance(path, (bytes, np.bytes_)):
        path = path.decode("utf-8")
    with Image.open(path) as im:
        im.seek(0)
        return _pil_to_rgb(im)


def _pil_to_rgb(im) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = arr.max() if arr.size else 0
        arr = (arr * (255.0 / top) if top > 255 else arr).clip(0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64).clip(0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA").convert("RGB")  # drop alpha, like decode_png(channels=3)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def pillow_decode_tf(path: tf.Tensor) -> tf.Tensor:
    """Graph wrapper of `pillow_decode_file` (one py_function call per image)."""
    image = tf.py_function(lambda p: pillow_decode_file(p.numpy()), [path], tf.uint8)
    image.set_shape([None, None, 3])
    return image


def route_by_extension(path: str) -> str:
    """Decoder to use for a file that was not checked: TF for TF_EXTENSIONS, else Pillow."""
    return ROUTE_TF if os.path.splitext(path)[1].lower() in TF_EXTENSIONS else ROUTE_PILLOW


# --------------------------------------------------------------------------- the check


@dataclass
class FileCheck:
    """Outcome of decoding one file: route ('tf', 'pillow' or 'bad'), size, reason if bad."""

    route: str
    height: int = 0
    width: int = 0
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.route != ROUTE_BAD


@dataclass
class CheckStats:
    files: int = 0
    cached: int = 0
    seconds: float = 0.0
    results: dict = field(default_factory=dict)  # path -> FileCheck


def _magic(head: bytes) -> str:
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"GIF87a") or head.startswith(b"GIF89a"):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if len(head) >= 2 and head[0:1] == b"P" and head[1:2] in b"123456":
        return "PNM"
    return ""


def _diagnose(path: str) -> FileCheck:
    """Why TensorFlow could not decode `path`; or the Pillow route when Pillow can."""
    from PIL import Image, UnidentifiedImageError

    try:
        size = os.path.getsize(path)
    except OSError:
        return FileCheck(ROUTE_BAD, reason="file not found" if not os.path.lexists(path) else "cannot read")
    if size == 0:
        return FileCheck(ROUTE_BAD, reason="empty file (0 bytes)")
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
            if size > 2:
                fh.seek(-2, os.SEEK_END)
            tail = fh.read(2)
    except OSError as exc:
        return FileCheck(ROUTE_BAD, reason=f"cannot read ({exc.strerror or exc})")
    kind = _magic(head)
    try:
        with Image.open(path) as im:
            im.seek(0)
            arr = _pil_to_rgb(im)
        return FileCheck(ROUTE_PILLOW, int(arr.shape[0]), int(arr.shape[1]))
    except UnidentifiedImageError:
        pil_error = "unrecognised content"
    except Exception as exc:  # noqa: BLE001 - any Pillow failure makes the file unreadable
        pil_error = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    if kind == "JPEG":
        if tail != b"\xff\xd9" or "truncated" in pil_error:
            return FileCheck(ROUTE_BAD, reason="truncated JPEG")
        return FileCheck(ROUTE_BAD, reason=f"corrupt JPEG ({pil_error})")
    if kind:
        why = pil_error if "truncated" not in pil_error else "truncated"
        return FileCheck(ROUTE_BAD, reason=f"corrupt {kind} ({why})")
    return FileCheck(ROUTE_BAD, reason="not an image (unrecognised content)")


def _tf_pass(paths: list[str]) -> dict[int, tuple[int, int]]:
    """Decode `paths` with TensorFlow in parallel; {position: (height, width)} of the good ones."""
    if not paths:
        return {}

    def decode(i, p):
        shape = tf.shape(decode_image_bytes(tf.io.read_file(p)))
        return i, shape[0], shape[1]

    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths), dtype=np.int64), paths))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.ignore_errors().batch(4096)
    good: dict[int, tuple[int, int]] = {}
    for i, h, w in ds.as_numpy_iterator():
        for a, b, c in zip(i.tolist(), h.tolist(), w.tolist()):
            good[a] = (b, c)
    return good


def _stat(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


class CheckCache:
    """Check results of the files under one folder, keyed by (relative path, size, mtime_ns).

    Stored as JSON at ``<cache_dir>/check-<sha1 of the folder's absolute path>.json``; written
    atomically (temporary file, then rename), so concurrent runs cannot leave it half-written.
    """

    def __init__(self, cache_dir: Optional[str], root: str):
        self.root = os.path.abspath(root)
        self.file = None
        self.entries: dict[str, list] = {}
        self.dirty = False
        if cache_dir:
            digest = hashlib.sha1(self.root.encode("utf-8")).hexdigest()[:20]
            self.file = os.path.join(os.path.expanduser(cache_dir), f"check-{digest}.json")
            try:
                with open(self.file, encoding="utf-8") as fh:
                    data = json.load(fh)
                if data.get("version") == CACHE_VERSION and data.get("root") == self.root:
                    self.entries = data.get("entries", {})
            except (OSError, ValueError, AttributeError):
                self.entries = {}

    def _key(self, path: str) -> str:
        return os.path.relpath(os.path.abspath(path), self.root)

    def get(self, path: str, stat: tuple[int, int]) -> Optional[FileCheck]:
        entry = self.entries.get(self._key(path))
        if entry and entry[0] == stat[0] and entry[1] == stat[1]:
            return FileCheck(entry[2], entry[3], entry[4], entry[5])
        return None

    def put(self, path: str, stat: tuple[int, int], result: FileCheck) -> None:
        self.entries[self._key(path)] = [stat[0], stat[1], result.route, result.height, result.width,
                                         result.reason]
        self.dirty = True

    def save(self) -> None:
        if not self.file or not self.dirty:
            return
        try:
            atomic.write_json(self.file, {"version": CACHE_VERSION, "root": self.root, "entries": self.entries})
        except OSError:
            pass  # a cache that cannot be written only costs time


def _utf8_name(path: str) -> bool:
    """Whether `path` is valid UTF-8 (a name of other bytes reaches Python with surrogate escapes,
    which TensorFlow's string tensors refuse)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_files(paths: Iterable[str], cache_dir: Optional[str] = None, root: Optional[str] = None,
                stats: Optional[dict] = None) -> CheckStats:
    """Decode every file once and classify it (see the module doc). Returns `CheckStats`.

    `root`: the folder the cache file belongs to (default: the common folder of `paths`);
    `stats`: optional {path: (size, mtime_ns)} already known from a directory scan.
    """
    t0 = time.perf_counter()
    paths = list(paths)
    out = CheckStats(files=len(paths))
    if not paths:
        return out
    if root is None:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    cache = CheckCache(cache_dir, root)
    todo: list[str] = []
    todo_stat: list[tuple[int, int]] = []
    for p in paths:
        if not _utf8_name(p):
            out.results[p] = FileCheck(ROUTE_BAD, reason="file name is not valid UTF-8 (TensorFlow cannot "
                                                         "open it; rename the file)")
            continue
        st = (stats or {}).get(p) or _stat(p)
        if st is None:
            out.results[p] = FileCheck(ROUTE_BAD, reason="file not found" if not os.path.lexists(p)
                                       else "cannot read")
            continue
        hit = cache.get(p, st)
        if hit is not None:
            out.results[p] = hit
            out.cached += 1
        elif st[0] == 0:
            out.results[p] = FileCheck(ROUTE_BAD, reason="empty file (0 bytes)")
            cache.put(p, st, out.results[p])
        else:
            todo.append(p)
            todo_stat.append(st)
    good = _tf_pass(todo)
    failed = [i for i in range(len(todo)) if i not in good]
    for i, (h, w) in good.items():
        out.results[todo[i]] = FileCheck(ROUTE_TF, h, w)
        cache.put(todo[i], todo_stat[i], out.results[todo[i]])
    if failed:
        workers = max(1, min(8, os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            diagnosed = list(pool.map(lambda i: _diagnose(todo[i]), failed))
        for i, result in zip(failed, diagnosed):
            out.results[todo[i]] = result
            cache.put(todo[i], todo_stat[i], result)
    cache.save()
    out.seconds = time.perf_counter() - t0
    return out
