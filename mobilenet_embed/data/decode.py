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
``not an image (unrecognised content)``, ``file name is not valid UTF-8``, ``too large: ...``.

Pixel limit (`data.max_pixels`): the width and height are read from the file's header first
(JPEG through `tf.image.extract_jpeg_shape`, PNG, GIF, BMP and WebP from their first bytes;
Pillow's `Image.open` for the rest), and an image above the limit is never decoded: it is bad
(``too large: 20000x20000 = 400,000,000 pixels > data.max_pixels (40,000,000)``).

The check cache (`data.check_cache`): one JSON file per data folder *name* in that folder,
``check2-<sha1 of the folder's base name>.json``, entries keyed by the file's path relative to
the data folder, with its size and mtime_ns. So the same data mounted at another path (another
machine, shared storage) hits the cache when the cache folder is shared too (point
`data.check_cache` beside the data), and a file whose size or mtime changed is decoded again.
Entries of other files are kept (a subset checked by `eval` does not evict the rest).
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
from mobilenet_embed.image_files import is_utf8_name


ROUTE_TF, ROUTE_PILLOW, ROUTE_BAD = "tf", "pillow", "bad"
CACHE_VERSION = 2
DEFAULT_MAX_PIXELS = 40_000_000
NOT_UTF8 = "file name is not valid UTF-8 (TensorFlow cannot open it; rename the file)"
_TOO_LARGE = "too large: "


def too_large_reason(height: int, width: int, max_pixels: int) -> str:
    """The reason a file above the pixel limit is bad (one line)."""
    return (f"{_TOO_LARGE}{width}x{height} = {width * height:,} pixels > data.max_pixels ({max_pixels:,})")


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


def _diagnose(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> FileCheck:
    """Why TensorFlow could not decode `path`; or the Pillow route when Pillow can (the pixel
    limit read from the header by `Image.open`, before decoding)."""
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
            width, height = im.size
            if width * height > max_pixels:
                return FileCheck(ROUTE_BAD, height, width, too_large_reason(height, width, max_pixels))
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


_ZEROS = b"\0" * 32


def header_size(contents: tf.Tensor) -> tf.Tensor:
    """(height, width) int64 ``[2]`` from an encoded image's header, without decoding it;
    ``[0, 0]`` when the format is not JPEG, PNG, GIF, BMP or WebP (graph ops only; a JPEG costs
    one comparison and `tf.image.extract_jpeg_shape`)."""
    is_jpeg = tf.equal(tf.strings.substr(contents, 0, 3), b"\xff\xd8\xff")
    return tf.cond(is_jpeg, lambda: tf.cast(tf.image.extract_jpeg_shape(contents)[:2], tf.int64),
                   lambda: _other_header_size(contents))


def _other_header_size(contents: tf.Tensor) -> tf.Tensor:
    """`header_size` of PNG, GIF, BMP and WebP (fixed byte positions of the first 32 bytes)."""
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(contents, 0, 32), _ZEROS]), 0, 32)
    b = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)

    def le(i, n):
        return sum(b[i + j] * (256 ** j) for j in range(n))

    def be(i, n):
        return sum(b[i + j] * (256 ** (n - 1 - j)) for j in range(n))

    fourcc = tf.strings.substr(head, 12, 4)
    webp = tf.logical_and(tf.equal(tf.strings.substr(head, 0, 4), b"RIFF"),
                          tf.equal(tf.strings.substr(head, 8, 4), b"WEBP"))
    vp8l_bits = le(21, 4)
    candidates = [
        (tf.equal(tf.strings.substr(head, 0, 8), b"\x89PNG\r\n\x1a\n"), tf.stack([be(20, 4), be(16, 4)])),
        (tf.equal(tf.strings.substr(head, 0, 3), b"GIF"), tf.stack([le(8, 2), le(6, 2)])),
        (tf.equal(tf.strings.substr(head, 0, 2), b"BM"),
         tf.stack([tf.abs(le(22, 4) - tf.cast(b[25] >= 128, tf.int64) * 2 ** 32), le(18, 4)])),
        (tf.logical_and(webp, tf.equal(fourcc, b"VP8X")), tf.stack([le(27, 3) + 1, le(24, 3) + 1])),
        (tf.logical_and(webp, tf.equal(fourcc, b"VP8 ")), tf.stack([le(28, 2) % 16384, le(26, 2) % 16384])),
        (tf.logical_and(webp, tf.equal(fourcc, b"VP8L")),
         tf.stack([(vp8l_bits // 16384) % 16384 + 1, vp8l_bits % 16384 + 1])),
    ]
    size = tf.zeros([2], tf.int64)
    for match, hw in reversed(candidates):
        size = tf.where(match, hw, size)
    return size


# a 1x1 PNG, decoded instead of an image above the pixel limit (no tf.cond per image: measured,
# a cond in the map doubled the check's CPU time on small JPEGs)
_TINY_PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS"
             b"\xde\x00\x00\x00\x0cIDATx\x9cc```\x00\x00\x00\x04\x00\x01\xf6\x178U\x00\x00\x00\x00IEND\xaeB`\x82")


def _tf_pass(paths: list[str], max_pixels: int) -> dict[int, tuple[int, int, bool]]:
    """Decode `paths` with TensorFlow in parallel; {position: (height, width, too large)} of the
    good ones (a file above `max_pixels` by its header is not decoded). Files named .jpg/.jpeg
    take the JPEG header reader alone (a JPEG that is not one fails it and goes to `_diagnose`)."""
    if not paths:
        return {}
    jpeg = np.array([os.path.splitext(p)[1].lower() in (".jpg", ".jpeg") for p in paths], bool)
    good: dict[int, tuple[int, int, bool]] = {}
    for group, is_jpeg in ((np.flatnonzero(jpeg), True), (np.flatnonzero(~jpeg), False)):
        if len(group):
            ds = tf.data.Dataset.from_tensor_slices((group.astype(np.int64), [paths[i] for i in group.tolist()]))
            good.update(shapes_of(ds, max_pixels, is_jpeg, load=tf.io.read_file))
    return good


def shapes_of(items: tf.data.Dataset, max_pixels: int, jpeg: bool = False, load=None
              ) -> dict[int, tuple[int, int, bool]]:
    """{i: (height, width, too large)} of the ``(i, encoded bytes)`` of `items` that TensorFlow
    decodes (in parallel); one above `max_pixels` by its header is not decoded. `jpeg`: every
    item is read as JPEG (`tf.image.extract_jpeg_shape`, which fails on anything else).
    `load`: items are ``(i, x)`` and ``load(x)`` the bytes (read inside the parallel map)."""

    def decode(i, contents):
        if load is not None:
            contents = load(contents)
        hw = (tf.cast(tf.image.extract_jpeg_shape(contents)[:2], tf.int64) if jpeg else header_size(contents))
        big = hw[0] * hw[1] > max_pixels
        shape = tf.cast(tf.shape(decode_image_bytes(tf.where(big, _TINY_PNG, contents)))[:2], tf.int64)
        shape = tf.where(big, hw, shape)
        return i, shape[0], shape[1], big

    ds = items.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.ignore_errors().batch(4096)
    good: dict[int, tuple[int, int, bool]] = {}
    for i, h, w, big in ds.as_numpy_iterator():
        for a, b, c, d in zip(i.tolist(), h.tolist(), w.tolist(), big.tolist()):
            good[a] = (b, c, d)
    return good


def _stat(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


class CheckCache:
    """Check results of the files under one folder (see the module doc for the file and keys).

    Written atomically (temporary file, then rename), so concurrent runs cannot leave it
    half-written."""

    def __init__(self, cache_dir: Optional[str], root: str):
        self.root = os.path.abspath(root)
        self._prefixes = (os.path.join(str(root), ""), os.path.join(self.root, ""))
        self.file = None
        self.entries: dict[str, list] = {}
        self.dirty = False
        if cache_dir:
            name = os.path.basename(self.root) or "root"
            digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:20]
            self.file = os.path.join(os.path.expanduser(cache_dir), f"check2-{digest}.json")
            try:
                with open(self.file, encoding="utf-8") as fh:
                    data = json.load(fh)
                if data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict):
                    self.entries = data["entries"]
            except (OSError, ValueError, AttributeError):
                self.entries = {}

    def _key(self, path: str) -> str:
        for prefix in self._prefixes:  # the scan's paths start with the folder as given: no relpath
            if path.startswith(prefix):
                return path[len(prefix):]
        return os.path.relpath(os.path.abspath(path), self.root)

    def get(self, path: str, stat: tuple[int, int], max_pixels: int) -> Optional[FileCheck]:
        """The cached result of `path` if its size and mtime match, under the pixel limit now set
        (an entry refused by a lower limit is checked again)."""
        entry = self.entries.get(self._key(path))
        if not entry or entry[0] != stat[0] or entry[1] != stat[1]:
            return None
        result = FileCheck(entry[2], entry[3], entry[4], entry[5])
        pixels = result.height * result.width
        if result.reason.startswith(_TOO_LARGE):
            return None if pixels <= max_pixels else FileCheck(
                ROUTE_BAD, result.height, result.width, too_large_reason(result.height, result.width, max_pixels))
        if result.ok and pixels > max_pixels:
            return FileCheck(ROUTE_BAD, result.height, result.width,
                             too_large_reason(result.height, result.width, max_pixels))
        return result

    def put(self, path: str, stat: tuple[int, int], result: FileCheck) -> None:
        self.entries[self._key(path)] = [stat[0], stat[1], result.route, result.height, result.width,
                                         result.reason]
        self.dirty = True

    def save(self) -> None:
        if not self.file or not self.dirty:
            return
        try:
            atomic.write_json(self.file, {"version": CACHE_VERSION, "folder": os.path.basename(self.root),
                                          "entries": self.entries})
        except OSError:
            pass  # a cache that cannot be written only costs time


def check_files(paths: Iterable[str], cache_dir: Optional[str] = None, root: Optional[str] = None,
                stats: Optional[dict] = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                use_cache: bool = True) -> CheckStats:
    """Decode every file once and classify it (see the module doc). Returns `CheckStats`.

    `root`: the data folder the cache keys are relative to (default: the common folder of
    `paths`); `stats`: optional {path: (size, mtime_ns)} already known from a directory scan;
    `max_pixels`: larger images are bad (read from the header, not decoded); ``use_cache=False``
    decodes every file again (and refreshes the cache).
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
        if not is_utf8_name(p):
            out.results[p] = FileCheck(ROUTE_BAD, reason=NOT_UTF8)
            continue
        st = (stats or {}).get(p) or _stat(p)
        if st is None:
            out.results[p] = FileCheck(ROUTE_BAD, reason="file not found" if not os.path.lexists(p)
                                       else "cannot read")
            continue
        hit = cache.get(p, st, max_pixels) if use_cache else None
        if hit is not None:
            out.results[p] = hit
            out.cached += 1
        elif st[0] == 0:
            out.results[p] = FileCheck(ROUTE_BAD, reason="empty file (0 bytes)")
            cache.put(p, st, out.results[p])
        else:
            todo.append(p)
            todo_stat.append(st)
    good = _tf_pass(todo, max_pixels)
    failed = [i for i in range(len(todo)) if i not in good]
    for i, (h, w, big) in good.items():
        out.results[todo[i]] = (FileCheck(ROUTE_BAD, h, w, too_large_reason(h, w, max_pixels)) if big
                                else FileCheck(ROUTE_TF, h, w))
        cache.put(todo[i], todo_stat[i], out.results[todo[i]])
    if failed:
        workers = max(1, min(8, os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            diagnosed = list(pool.map(lambda i: _diagnose(todo[i], max_pixels), failed))
        for i, result in zip(failed, diagnosed):
            out.results[todo[i]] = result
            cache.put(todo[i], todo_stat[i], result)
    cache.save()
    out.seconds = time.perf_counter() - t0
    return out
