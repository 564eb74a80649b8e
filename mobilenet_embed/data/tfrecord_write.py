"""`mbembed prepare`: an identity folder written as TFRecord shards and a manifest.

The layout is `mobilenet_embed.data.tfrecord`'s. `prepare_tfrecords` decodes every image first
(the same check as `mbembed data check`); unreadable files are skipped, counted and listed in the
manifest. Identities with fewer than `data.min_images_per_identity` readable images (default 2:
no triplet without a positive) are not written (``--set data.min_images_per_identity=1`` keeps
them); identity lists (`data.identities_file`, ...) are not applied here but when training reads
the shards. Bytes TensorFlow decodes (JPEG, PNG, BMP, GIF, WebP) are stored as they are; other
formats (PGM, TIFF, ...) are re-encoded as PNG, so reading shards never needs Pillow. Shards and
manifest are written under temporary names and renamed when complete (through `tf.io.gfile`, so
the prefix may be remote); existing outputs are only replaced with ``force``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import heapq
import io
import json
import os
import time
from typing import Optional

import numpy as np
import tensorflow as tf

from mobilenet_embed.data import decode
from mobilenet_embed.data.example_encode import encode_example
from mobilenet_embed.data.index import ImageIndex, inspect_data
from mobilenet_embed.data.tfrecord import (FORMAT, INDEX_SUFFIX, MANIFEST_SUFFIX, SHARD_RE, VERSION,
                                           manifest_checksum, shard_name)
from mobilenet_embed.errors import UserError
from mobilenet_embed.image_files import display_path


def _encoded_bytes(path: str, pillow: bool) -> bytes:
    if not pillow:
        with open(path, "rb") as fh:
            return fh.read()
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(decode.pillow_decode_file(path)).save(buf, "PNG")
    return buf.getvalue()


def assign_shards(counts: np.ndarray, n_shards: int, seed: int) -> list[list[int]]:
    """Identities (labels) per shard: largest first onto the least-filled shard; each shard's
    identities then in a seeded random order."""
    rng = np.random.default_rng([int(seed), 0x5A2D])
    shuffled = rng.permutation(len(counts))
    order = sorted(shuffled.tolist(), key=lambda i: -int(counts[i]))
    heap = [(0, s) for s in range(n_shards)]
    shards: list[list[int]] = [[] for _ in range(n_shards)]
    for i in order:
        filled, s = heapq.heappop(heap)
        shards[s].append(i)
        heapq.heappush(heap, (filled + int(counts[i]), s))
    rank = {int(i): r for r, i in enumerate(shuffled.tolist())}
    return [sorted(ids, key=lambda i: rank[i]) for ids in shards]


def _outputs(out_prefix: str, shards: int, force: bool) -> tuple[list[str], list[str]]:
    """The shard names of `out_prefix`, and stale shards of an earlier run with another count;
    existing outputs need `force`."""
    names = [shard_name(out_prefix, i, shards) for i in range(shards)]
    existing = [p for p in names + [out_prefix + MANIFEST_SUFFIX] if tf.io.gfile.exists(p)]
    stale = [p for p in tf.io.gfile.glob(f"{out_prefix}-*-of-*.tfrecord") if SHARD_RE.match(p) and p not in names]
    if (existing or stale) and not force:
        first = (existing or stale)[0]
        raise UserError(f"--out {out_prefix}: {first} exists (and {len(existing) + len(stale) - 1} more "
                        f"outputs); pass --force to overwrite")
    return names, stale


_READ_CHUNK = 256  # files read ahead per shard being written
_BAR_CHUNK = 256  # records per progress-bar update


def _relative(path: str, prefix: str, root: str) -> str:
    """`path` relative to the data folder (`prefix`: the folder as given, with a trailing separator)."""
    return path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)


def _write_shard(readers, index: ImageIndex, rows: list[int], pillow: np.ndarray, data_dir: str, tmp: str,
                 tmp_index: str, bar) -> int:
    """Write the records of `rows` to `tmp` and their byte offsets to `tmp_index`; image bytes.

    The files are read through the `readers` thread pool (in order); the records depend only on
    `rows`, so a shard is the same bytes whichever thread writes it and when."""
    n_bytes, at, where = 0, 0, []
    prefix, root = os.path.join(data_dir, ""), os.path.abspath(data_dir)
    def read(r: int) -> bytes:
        return _encoded_bytes(index.paths[r], bool(pillow[r]))

    def blobs():  # bounded read-ahead: the next chunk is read while this one is written
        chunks = [rows[i:i + _READ_CHUNK] for i in range(0, len(rows), _READ_CHUNK)]
        pending = [readers.submit(read, r) for r in chunks[0]] if chunks else []
        for c in range(len(chunks)):
            current = pending
            pending = [readers.submit(read, r) for r in chunks[c + 1]] if c + 1 < len(chunks) else []
            for job in current:
                yield job.result()

    done = 0
    with tf.io.TFRecordWriter(tmp) as writer:
        for r, blob in zip(rows, blobs()):
            label = int(index.labels[r])
            record, image_at = encode_example(blob, label, index.identities[label],
                                              _relative(index.paths[r], prefix, root))
            writer.write(record)
            # a record is: length (8 bytes), its CRC (4), the data, the data's CRC (4)
            where.append((at + 12 + image_at, len(blob)))
            at += 16 + len(record)
            n_bytes += len(blob)
            done += 1
            if done == _BAR_CHUNK:  # the bar takes a lock per update: one per chunk
                bar.update(done)
                done = 0
        bar.update(done)
    with tf.io.gfile.GFile(tmp_index, "wb") as fh:
        fh.write(np.asarray(where, dtype="<i8").reshape(-1, 2).tobytes())
    return n_bytes, at


def default_workers() -> int:
    """Shards written at once by `prepare` unless told: one per CPU core, at least 2."""
    return max(2, os.cpu_count() or 1)


def _write_shards(index: ImageIndex, per_shard: list[list[int]], names: list[str], data_dir: str,
                  progress: bool, workers: int) -> tuple[list[dict], int]:
    """Every shard and its ``.index`` under temporary names, then renamed; (shard infos, bytes).

    `workers` shards are written at once by a thread pool (measured on 100k images: a process
    pool spends longer importing TensorFlow in each worker than the whole write takes; reading
    files and writing records release the GIL, building the records is ~20 us each), their
    files read through a second pool of 2 x `workers` threads, so slow storage sees many reads
    in flight."""
    from tqdm import tqdm

    counts = index.counts()
    offsets = np.concatenate([[0], np.cumsum(counts)])
    pillow = index.pillow_flags()
    rows = [[r for i in ids for r in range(int(offsets[i]), int(offsets[i + 1]))] for ids in per_shard]
    tmps = [(f"{n}.tmp-{os.getpid()}", f"{n}{INDEX_SUFFIX}.tmp-{os.getpid()}") for n in names]
    bar = tqdm(total=index.num_images, unit="img", desc="prepare", disable=None if progress else True, dynamic_ncols=True)
    try:
        with concurrent.futures.ThreadPoolExecutor(2 * workers) as readers, \
                concurrent.futures.ThreadPoolExecutor(workers) as writers:
            jobs = [writers.submit(_write_shard, readers, index, rows[s], pillow, data_dir, *tmps[s], bar)
                    for s in range(len(names))]
            sizes = [job.result() for job in jobs]
    except BaseException:
        for tmp in (t for pair in tmps for t in pair):
            if tf.io.gfile.exists(tmp):
                tf.io.gfile.remove(tmp)
        raise
    finally:
        bar.close()
    shard_info = [{"file": os.path.basename(names[s]), "images": len(rows[s]), "bytes": int(sizes[s][1]),
                   "index": os.path.basename(names[s]) + INDEX_SUFFIX,
                   "runs": [[int(i), int(counts[i])] for i in per_shard[s]]} for s in range(len(names))]
    for s, final in enumerate(names):
        tf.io.gfile.rename(tmps[s][0], final, overwrite=True)
        tf.io.gfile.rename(tmps[s][1], final + INDEX_SUFFIX, overwrite=True)
    return shard_info, sum(n for n, _ in sizes)


def _remove_shards(paths: list[str]) -> None:
    for p in paths:
        for f in (p, p + INDEX_SUFFIX):
            if tf.io.gfile.exists(f):
                tf.io.gfile.remove(f)


def _write_manifest(path: str, manifest: dict) -> None:
    manifest = {**manifest, "checksum": manifest_checksum(manifest)}
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "w") as fh:
        fh.write(json.dumps(manifest, indent=1))
    tf.io.gfile.rename(tmp, path, overwrite=True)


def prepare_tfrecords(data_cfg, data_dir: str, out_prefix: str, shards: int, force: bool = False, seed: int = 0,
                      progress: bool = True, log=print, workers: Optional[int] = None) -> dict:
    """Write the shards and manifest for the identity folder `data_dir` (see the module doc).

    `workers`: shards written at once (default `default_workers()`); the output is the same for
    any number.

    Returns a summary: images, identities, shards, bad files skipped, bytes, seconds, files.
    """
    if shards < 1:
        raise UserError(f"--shards: expected an integer >= 1, received {shards}")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers: expected an integer >= 1, received {workers}")
    t0 = time.perf_counter()
    out_prefix = str(out_prefix)
    if out_prefix.endswith(MANIFEST_SUFFIX):
        out_prefix = out_prefix[: -len(MANIFEST_SUFFIX)]
    names, stale = _outputs(out_prefix, shards, force)

    folder_cfg = dataclasses.replace(data_cfg, source="folder", path=str(data_dir), identities_file=None,
                                     exclude_identities_file=None, identities_folds=None)
    index, report = inspect_data(folder_cfg, check=True)
    for line in report.summary_lines(max_bad=20):
        log(line)
    if index.num_images == 0:
        raise UserError(f"--data {data_dir}: no readable images")
    counts = index.counts()
    parent = os.path.dirname(out_prefix)
    if parent:
        tf.io.gfile.makedirs(parent)
    root = os.path.abspath(str(data_dir))
    reencoded = int(index.pillow_flags().sum())
    shard_info, total_bytes = _write_shards(index, assign_shards(counts, shards, seed), names, str(data_dir),
                                            progress, min(workers, shards))
    _remove_shards(stale)
    manifest_path = out_prefix + MANIFEST_SUFFIX
    _write_manifest(manifest_path, {
        "format": FORMAT, "version": VERSION, "source": root,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "images": int(index.num_images), "identities": list(index.identities),
        "counts": [int(c) for c in counts], "shards": shard_info,
        "image_sizes": report.image_sizes, "reencoded_png": reencoded,
        "min_images_per_identity": int(data_cfg.min_images_per_identity),
        "bad_files": [[display_path(p), r] for p, r in report.bad_files],
    })
    return {"images": int(index.num_images), "identities": int(index.num_identities), "shards": shards,
            "small_identities_skipped": int(report.identities - index.num_identities),
            "min_images_per_identity": int(data_cfg.min_images_per_identity),
            "bad_files": len(report.bad_files), "reencoded_png": reencoded, "bytes": int(total_bytes),
            "seconds": time.perf_counter() - t0, "check_seconds": report.check_seconds,
            "manifest": manifest_path, "files": names, "workers": min(workers, shards)}
