"""`mbembed export embeddings`: every image of a folder or TFRecord source embedded into one array.

`export_embeddings` writes ``embeddings.npy`` (float32 [N, D], row i = image i) and ``index.csv``
(row, path, identity), in chunks that a rerun after a crash reuses (``<out>/.chunks/``).
Images are preprocessed as the model records (`preprocessing_metadata.model_data_config`), and
with ``align=True`` raw photos are aligned on the fly first (`align.inference.aligned_batches`).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np

from mobilenet_embed import atomic
from mobilenet_embed.embedders import Embedder, is_saved_model, load_embedder
from mobilenet_embed.errors import UserError
from mobilenet_embed.out_folder import check_out_folder

if TYPE_CHECKING:
    from mobilenet_embed.config import Config, DataConfig

EMBEDDINGS_NAME = "embeddings.npy"
INDEX_NAME = "index.csv"
CHUNKS_DIR = ".chunks"
MANIFEST_NAME = "manifest.json"


@dataclass
class EmbeddingsExport:
    """What `export_embeddings` wrote."""

    embeddings_path: str
    index_path: str
    n_images: int
    embedding_size: int
    chunks: int
    reused_chunks: int
    seconds: float
    skipped: list = field(default_factory=list)  # unreadable files left out
    align: Optional[dict] = None  # on-the-fly alignment: counts of the images embedded by this run


def data_config_for(data: str, base: "DataConfig", image_size: int) -> "DataConfig":
    """`base` pointed at `data`: ``synthetic`` (the synthetic source, as `base` configures it);
    TFRecord data written by `mbembed prepare` (a shard glob, a shard, a ``.manifest.json``, its
    PREFIX, or a folder holding one manifest and no sub-folders); else an identity folder.
    Augmentation off, every identity kept (even with one image), images preprocessed to
    `image_size` with `base`'s crop fraction."""
    from mobilenet_embed.data.tfrecord import MANIFEST_SUFFIX, SHARD_RE

    if data == "synthetic":
        source, path = "synthetic", None
    elif (any(c in data for c in "*?[") or data.endswith(MANIFEST_SUFFIX)
          or SHARD_RE.match(data) or os.path.isfile(data + MANIFEST_SUFFIX)):
        source, path = "tfrecord", data
    elif os.path.isdir(data):
        manifests = glob.glob(os.path.join(data, "*" + MANIFEST_SUFFIX))
        subdirs = [e for e in os.listdir(data) if os.path.isdir(os.path.join(data, e))
                   and not e.startswith(".")]
        if len(manifests) == 1 and not subdirs:
            source, path = "tfrecord", manifests[0]
        else:
            source, path = "folder", data
    else:
        raise UserError(f"--data {data}: not found (expected an identity folder, TFRecord shards "
                        "or 'synthetic')")
    return dataclasses.replace(base, source=source, path=path, image_size=image_size,
                               augment=False, min_images_per_identity=1)


@dataclass
class _Source:
    """The images to embed: the data config that reads them, paths, identity names, skipped files."""

    data_cfg: "DataConfig"
    paths: list
    names: list
    skipped: list


def _read_source(cfg: "Config", checkpoint: str, data_dir: str, embedder: Embedder,
                 log=lambda line: None) -> _Source:
    """Index `data_dir` as the model's run preprocessed its images (`model_data_config`; a run's
    other data keys, with the user's ``--set`` applied); too many unreadable is an error."""
    from mobilenet_embed.checkpoints import config_for_checkpoint
    from mobilenet_embed.data import inspect_data
    from mobilenet_embed.preprocessing_metadata import model_data_config

    exported = str(checkpoint).endswith(".tflite") or is_saved_model(str(checkpoint))
    run_cfg = cfg if exported else config_for_checkpoint(cfg, checkpoint)
    data_cfg = data_config_for(str(data_dir), model_data_config(run_cfg, embedder, log), embedder.image_size)
    index, report = inspect_data(data_cfg, check=True)
    paths = [str(p) for p in index.paths]
    if not paths:
        raise UserError(f"--data {data_dir}: no images found")
    if report.checked and report.bad_fraction > data_cfg.max_bad_fraction:
        raise UserError(f"--data {data_dir}: {len(report.bad_files)} of {report.images} "
                        f"images are unreadable, more than data.max_bad_fraction "
                        f"({data_cfg.max_bad_fraction:g}); `mbembed data check` lists them")
    identities = list(index.identities)
    names = [identities[int(label)] for label in index.labels]
    return _Source(data_cfg, paths, names, [p for p, _ in report.bad_files])


def _start_chunks(chunk_dir: str, manifest: dict, force: bool) -> None:
    """Keep the chunks of an unfinished export of the same work (same `manifest`), else start over
    (an unfinished export of other work needs `force`)."""
    manifest_path = os.path.join(chunk_dir, MANIFEST_NAME)
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as fh:
            try:
                previous = json.load(fh)
            except ValueError:
                previous = None
        if previous != manifest:
            if not force:
                raise UserError(f"{chunk_dir}: holds an unfinished export of other images, another "
                                "model or another chunk size; pass --force to discard it and start over")
            shutil.rmtree(chunk_dir)
    os.makedirs(chunk_dir, exist_ok=True)
    atomic.write_json(manifest_path, manifest, indent=1)


def _chunk_done(path: str, rows: int, embedding_size: int) -> bool:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == (rows, embedding_size)


def _write_chunk(path: str, embeddings: np.ndarray) -> None:
    atomic.write_npy(path, embeddings.astype(np.float32))


def _embed_chunks(embedder: Embedder, data_cfg: "DataConfig", paths: list, chunk_paths: list,
                  chunk_size: int, progress: bool, batches=None) -> int:
    """Embed and save every chunk not finished yet; returns how many were reused. `batches`:
    paths -> preprocessed batches (default: `images_dataset`)."""
    from tqdm import tqdm

    from mobilenet_embed.data import images_dataset

    n = len(paths)
    rows = [min(chunk_size, n - k * chunk_size) for k in range(len(chunk_paths))]
    done = [_chunk_done(p, r, embedder.embedding_size) for p, r in zip(chunk_paths, rows)]
    bar = tqdm(total=n, initial=sum(r for r, d in zip(rows, done) if d), unit="img", desc="embedding",
               disable=None if progress else True, dynamic_ncols=True)
    try:
        for k, chunk_path in enumerate(chunk_paths):
            if done[k]:
                continue
            chunk = paths[k * chunk_size:(k + 1) * chunk_size]
            parts = []
            source = (batches(chunk) if batches is not None else
                      images_dataset(data_cfg, chunk, embedder.batch_size, check=False).as_numpy_iterator())
            for batch in source:
                parts.append(embedder.embed(batch))
                bar.update(len(batch))
            embeddings = np.concatenate(parts) if parts else np.zeros((0, embedder.embedding_size))
            if len(embeddings) != len(chunk):
                raise UserError(f"chunk {k}: expected {len(chunk)} embeddings, the data pipeline "
                                f"returned {len(embeddings)} images")
            _write_chunk(chunk_path, embeddings)
    finally:
        bar.close()
    return sum(done)


def _assemble(chunk_paths: list, emb_path: str, embedding_size: int, n: int, chunk_size: int) -> None:
    """The chunks concatenated into ``embeddings.npy`` (memory-mapped, written atomically)."""

    def write(tmp: str) -> None:
        final = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, embedding_size))
        for k, chunk_path in enumerate(chunk_paths):
            final[k * chunk_size:(k + 1) * chunk_size] = np.load(chunk_path)
        final.flush()
        del final

    atomic.atomic_write(emb_path, write)


def _write_index_csv(path: str, paths: list, names: list) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["row", "path", "identity"])
            for row, (image, name) in enumerate(zip(paths, names)):
                writer.writerow([row, image, name])

    atomic.atomic_write(path, write)


def export_embeddings(cfg: "Config", checkpoint: str, data_dir: str, out: str, force: bool = False,
                      chunk_size: int = 1024, batch_size: Optional[int] = None,
                      num_threads: Optional[int] = None, progress: bool = True, align: bool = False,
                      log=lambda line: None) -> EmbeddingsExport:
    """Embed every image of `data_dir` with the model at `checkpoint` into the folder `out`.

    Writes ``embeddings.npy`` (float32 [N, D], row i = image i) and ``index.csv`` (row, path,
    identity). `checkpoint` is anything `load_embedder` takes (checkpoint, run directory,
    SavedModel, .tflite). Work is done in chunks of `chunk_size` images, each saved as
    ``out/.chunks/chunk-NNNNN.npy`` when finished; a rerun after a crash or Ctrl-C reuses the
    finished chunks (same images, model and chunk size, recorded in ``.chunks/manifest.json``),
    so rows are neither lost nor duplicated. Existing final files need `force`. Images are
    preprocessed as the model records (notes and the source go to `log`); `align`: `data_dir`
    holds raw photos, aligned on the fly to the model's ``data.align_template`` (no face:
    centre-cropped and counted in the result's `align`).
    """
    from mobilenet_embed.align.inference import align_summary, aligned_source

    if chunk_size < 1:
        raise UserError(f"--chunk-size: expected an integer >= 1, received {chunk_size}")
    start = time.perf_counter()
    out = str(out)
    check_out_folder(out)
    emb_path, index_path = os.path.join(out, EMBEDDINGS_NAME), os.path.join(out, INDEX_NAME)
    chunk_dir = os.path.join(out, CHUNKS_DIR)
    finishing = os.path.isfile(os.path.join(chunk_dir, MANIFEST_NAME))  # an unfinished run of ours
    existing = [p for p in (emb_path, index_path) if os.path.lexists(p)]
    if existing and not force and not finishing:
        raise UserError(f"{out}: would overwrite {', '.join(os.path.basename(p) for p in existing)}; "
                        "pass --force to replace")

    embedder = load_embedder(checkpoint, cfg, num_threads=num_threads, batch_size=batch_size)
    source = _read_source(cfg, checkpoint, data_dir, embedder, log)
    if align and source.data_cfg.source != "folder":
        raise UserError(f"--align: needs a folder of photos as --data, received {data_dir} "
                        f"({source.data_cfg.source} source)")
    # files were checked by _read_source (unreadable ones are left out already): no second check
    batches, counts = aligned_source(source.data_cfg, align, embedder.batch_size, log, check=False)
    n = len(source.paths)
    manifest = {
        "n_images": n, "chunk_size": int(chunk_size),
        "paths_sha1": hashlib.sha1("\n".join(source.paths).encode()).hexdigest(),
        "model": os.path.abspath(str(checkpoint)), "embedding_size": embedder.embedding_size,
        "image_size": embedder.image_size, "crop_fraction": source.data_cfg.crop_fraction}
    if align:
        manifest["align"] = [source.data_cfg.align_template, source.data_cfg.align_size, source.data_cfg.align_select]
    _start_chunks(chunk_dir, manifest, force)
    n_chunks = (n + chunk_size - 1) // chunk_size
    chunk_paths = [os.path.join(chunk_dir, f"chunk-{k:05d}.npy") for k in range(n_chunks)]
    reused = _embed_chunks(embedder, source.data_cfg, source.paths, chunk_paths, chunk_size, progress, batches)
    _assemble(chunk_paths, emb_path, embedder.embedding_size, n, chunk_size)
    _write_index_csv(index_path, source.paths, source.names)
    shutil.rmtree(chunk_dir, ignore_errors=True)
    return EmbeddingsExport(emb_path, index_path, n, embedder.embedding_size, n_chunks, reused,
                            time.perf_counter() - start, source.skipped,
                            None if counts is None else align_summary(source.data_cfg, counts))

