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
import json
import multiprocessing
import os
import time
from typing import Optional

import numpy as np
import tensorflow as tf

from mobilenet_embed.data.index import ImageIndex, inspect_data
from mobilenet_embed.data.tfrecord import (FORMAT, INDEX_SUFFIX, MANIFEST_SUFFIX, SHARD_RE, VERSION,
                                           manifest_checksum, shard_name)
from mobilenet_embed.errors import UserError
from mobilenet_embed.image_files import display_path
from mobilenet_embed.record_worker import RecordJob, encode_files


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


_CHUNK = 256  # records per task of a worker process (and per progress-bar update)


def _relative(path: str, prefix: str, root: str) -> str:
    """`path` relative to the data folder (`prefix`: the folder as given, with a trailing separator)."""
    return path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)


def _write_shard(encoders, index: ImageIndex, rows: list[int], pillow: np.ndarray, data_dir: str, tmp: str,
                 tmp_index: str, bar) -> tuple[int, int]:
    """Write the records of `rows` to `tmp` and their image bytes' offsets to `tmp_index`;
    (image bytes, shard bytes).

    The files are read and encoded by the `encoders` process pool, a chunk of `_CHUNK` rows a
    task, the next chunk while this one is written; the records depend only on `rows`, so a
    shard is the same bytes whichever process encodes it and when."""
    n_bytes, at, where = 0, 0, []
    prefix, root = os.path.join(data_dir, ""), os.path.abspath(data_dir)

    def job(r: int) -> RecordJob:
        label = int(index.labels[r])
        return RecordJob(index.paths[r], bool(pillow[r]), label, index.identities[label],
                         _relative(index.paths[r], prefix, root))

    def encoded():  # bounded read-ahead: one chunk in flight beyond the one being written
        chunks = [rows[i:i + _CHUNK] for i in range(0, len(rows), _CHUNK)]
        pending = encoders.submit(encode_files, [job(r) for r in chunks[0]]) if chunks else None
        for c in range(len(chunks)):
            current = pending
            if c + 1 < len(chunks):
                pending = encoders.submit(encode_files, [job(r) for r in chunks[c + 1]])
            yield current.result()

    with tf.io.TFRecordWriter(tmp) as writer:
        for records in encoded():
            for record, image_at, n in records:
                writer.write(record)
                # a record is: length (8 bytes), its CRC (4), the data, the data's CRC (4)
                where.append((at + 12 + image_at, n))
                at += 16 + len(record)
                n_bytes += n
            bar.update(len(records))
    with tf.io.gfile.GFile(tmp_index, "wb") as fh:
        fh.write(np.asarray(where, dtype="<i8").reshape(-1, 2).tobytes())
    return n_bytes, at


def default_workers() -> int:
    """Shards written at once (and worker processes encoding them) by `prepare` unless told: one
    per CPU core, at least 2."""
    return max(2, os.cpu_count() or 1)


def _write_shards(index: ImageIndex, per_shard: list[list[int]], names: list[str], data_dir: str,
                  progress: bool, workers: int) -> tuple[list[dict], int]:
    """Every shard and its ``.index`` under temporary names, then renamed; (shard infos, bytes).

    `workers` shards are written at once by threads (the TFRecord writes, remote ones included,
    overlap), their files read and encoded into records by `workers` processes started with
    'spawn' that import `record_worker` and not TensorFlow. Threads alone kept CPU / wall at ~1.0:
    reading a file, building its record and the future per file are Python holding the GIL
    (write phase of 100k 32x32 JPEGs, 16 shards, page cache warm, 2-core x86: 4.6 to 7.6 s in
    one thread, 5.9 to 9.7 s with 2; 3.9 and 5.3 s with the hand-encoded records; with these
    processes 1.7 to 2.0 s with 1, 1.35 to 1.7 s with 2, CPU / wall 1.55; README, Benchmarks,
    Scale). A process pool that imported TensorFlow in each worker spent longer importing than
    the whole write takes. Callers running this from a script need the
    ``if __name__ == "__main__":`` guard, as for any 'spawn' pool (each worker imports the main
    module: `mbembed`'s is the CLI, without TensorFlow)."""
    from tqdm import tqdm

    counts = index.counts()
    offsets = np.concatenate([[0], np.cumsum(counts)])
    pillow = index.pillow_flags()
    rows = [[r for i in ids for r in range(int(offsets[i]), int(offsets[i + 1]))] for ids in per_shard]
    tmps = [(f"{n}.tmp-{os.getpid()}", f"{n}{INDEX_SUFFIX}.tmp-{os.getpid()}") for n in names]
    bar = tqdm(total=index.num_images, unit="img", desc="prepare", disable=None if progress else True, dynamic_ncols=True)
    try:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) \
                as encoders, concurrent.futures.ThreadPoolExecutor(workers) as writers:
            jobs = [writers.submit(_write_shard, encoders, index, rows[s], pillow, data_dir, *tmps[s], bar)
                    for s in range(len(names))]
            try:
                sizes = [job.result() for job in jobs]
            except BaseException as exc:
                encoders.shutdown(wait=False, cancel_futures=True)
                if isinstance(exc, OSError):  # a file changed after the check (deleted, replaced, unreadable)
                    where = display_path(exc.filename) if exc.filename else f"--data {data_dir}"
                    raise UserError(f"{where}: cannot read: {exc.strerror or exc} (it changed after the "
                                    f"check); no shard was written") from exc
                raise
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

    `workers`: shards written at once, and processes reading and encoding their records
    (default `default_workers()`); the output is the same for any number.

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
