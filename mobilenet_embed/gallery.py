"""A gallery index of enrolled identities: its file format, enrolment, removal and search.

Format (version 1), a folder:

* ``gallery.json``: ``format`` ("mbembed-gallery"), ``version``, ``mode`` (``images``: one row
  per enrolled image, an identity scores by its best image; ``templates``: one row per identity,
  the L2-normalised mean of its images), ``model`` (path, kind, ``sha256`` fingerprint,
  ``image_size``, ``crop_fraction``, ``flip``, ``embedding_size``, ``distance``), ``rows``
  (per row: ``identity``, ``sources`` (image paths), ``norm``: the length of the sum of the
  images' embeddings before normalisation, so that a template can take more images later) and
  ``embeddings_file``;
* ``embeddings-<generation>.npy``: float32 ``[rows, embedding_size]``, row i = ``rows[i]``.

Every write puts a new embeddings file beside the old one, then replaces ``gallery.json`` by
an atomic rename (temporary file in the same folder, fsync, rename, fsync of the folder), then
deletes the old embeddings file: a reader sees the old gallery or the new one, never half.

The model fingerprint (`model_fingerprint`) is a SHA-256 of the Keras model's weights (so a
run directory, its checkpoint and a ``.keras`` file of the same weights agree) or of the bytes
of an exported SavedModel / ``.tflite``: a search with any other model is refused.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import os
import time
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np

from mobilenet_embed import atomic
from mobilenet_embed.errors import UserError
from mobilenet_embed.search import DISTANCES, identity_search, make_backend

if TYPE_CHECKING:
    from mobilenet_embed.config import Config

FORMAT = "mbembed-gallery"
VERSION = 1
META_NAME = "gallery.json"
MODES = ("images", "templates")
#: cosine below which a re-embedded image of an `export embeddings` folder counts as another model
SPOT_CHECK_COSINE = 0.999


# --------------------------------------------------------------------------- files


def _hash_files(path: str) -> str:
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    for name in files:
        digest.update(os.path.relpath(name, path).encode() if name != path else b"")
        with open(name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_fingerprint(embedder, path: str) -> str:
    """SHA-256 of the model: of its weights (Keras embedders: shapes and bytes, in order), else of
    the exported file(s) at `path`."""
    model = getattr(embedder, "model", None)
    if model is not None and hasattr(model, "weights"):
        digest = hashlib.sha256()
        for w in model.weights:
            value = np.ascontiguousarray(np.asarray(w.numpy()))
            digest.update(f"{value.dtype}{value.shape}".encode())
            digest.update(value.tobytes())
        return digest.hexdigest()
    return _hash_files(str(path))


@dataclasses.dataclass
class Gallery:
    """An index in memory: `embeddings` [N, D] with one entry of `rows` per line."""

    embeddings: np.ndarray
    rows: list  # [{"identity": str, "sources": [str], "norm": float}]
    mode: str
    model: dict
    generation: int = 0

    def identities(self) -> list[str]:
        """Enrolled identities, in order of first enrolment."""
        return list(dict.fromkeys(r["identity"] for r in self.rows))

    def labels(self) -> tuple[np.ndarray, list[str]]:
        """(identity label of each row, identity names)."""
        names = self.identities()
        position = {n: i for i, n in enumerate(names)}
        return np.array([position[r["identity"]] for r in self.rows], np.int64), names

    def sources(self) -> set:
        return {s for r in self.rows for s in r["sources"]}

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "mode": self.mode, "model": self.model,
                "n_rows": len(self.rows), "n_identities": len(self.identities()),
                "embeddings_file": _embeddings_name(self.generation), "generation": self.generation,
                "rows": self.rows}


def _embeddings_name(generation: int) -> str:
    return f"embeddings-{generation:06d}.npy"


def save_gallery(gallery: Gallery, folder: str) -> str:
    """Write `gallery` into `folder` as a new generation (see the module doc); return gallery.json's path."""
    os.makedirs(folder, exist_ok=True)
    meta_path = os.path.join(folder, META_NAME)
    if os.path.isfile(meta_path):
        gallery.generation = max(gallery.generation, _read_meta(folder)["generation"]) + 1
    emb = np.ascontiguousarray(gallery.embeddings, dtype=np.float32)
    if emb.shape != (len(gallery.rows), int(gallery.model["embedding_size"])):
        raise ValueError(f"embeddings {emb.shape} do not match {len(gallery.rows)} rows")
    name = _embeddings_name(gallery.generation)
    atomic.atomic_write(os.path.join(folder, name), lambda tmp: np.save(tmp, emb))
    atomic.atomic_write(meta_path, lambda tmp: _dump_json(tmp, gallery.to_json()))
    for old in glob.glob(os.path.join(folder, "embeddings-*.npy")):
        if os.path.basename(old) != name:
            os.unlink(old)
    return meta_path


def _dump_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)


def _load_json(path: str, missing: str) -> dict:
    """The JSON file `path`; UserError `missing` when it is absent, or naming it when it is not JSON."""
    if not os.path.isfile(path):
        raise UserError(missing)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


def _read_meta(folder: str) -> dict:
    path = os.path.join(folder, META_NAME)
    meta = _load_json(path, f"{folder}: not a gallery index (no {META_NAME}; make one with mbembed enroll)")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path}: not an mbembed gallery (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise UserError(f"{path}: gallery format version {meta.get('version')!r}, this mbembed reads version {VERSION}")
    return meta


def load_gallery(folder: str) -> Gallery:
    """The gallery index in `folder`, exactly as `save_gallery` wrote it."""
    meta = _read_meta(folder)
    emb_path = os.path.join(folder, meta["embeddings_file"])
    try:
        emb = np.load(emb_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{emb_path}: cannot read gallery embeddings ({exc.__class__.__name__})") from None
    expected = (len(meta["rows"]), int(meta["model"]["embedding_size"]))
    if emb.shape != expected or emb.dtype != np.float32:
        raise UserError(f"{emb_path}: embeddings {emb.dtype} {list(emb.shape)}, gallery.json expects float32 "
                        f"{list(expected)}")
    return Gallery(emb, meta["rows"], meta["mode"], meta["model"], int(meta["generation"]))


# --------------------------------------------------------------------------- model


@dataclasses.dataclass
class LoadedModel:
    """An embedder with what a gallery records about it."""

    embedder: object
    info: dict  # path, kind, sha256, image_size, crop_fraction, flip, embedding_size, distance, aligned
    data_cfg: object  # DataConfig that preprocesses images for it
    batches: Optional[Callable] = None  # paths -> aligned batches (`aligned_source`), None: images as they are
    align_counts: Optional[object] = None  # `AlignCounts` of the images aligned so far

    def align_line(self) -> Optional[str]:
        """What on-the-fly alignment did (`align.inference.align_line`), None without --align."""
        from mobilenet_embed.align.inference import align_line

        return None if self.align_counts is None else align_line(self.align_summary())

    def align_summary(self) -> Optional[dict]:
        """`align.inference.align_summary` of the images aligned so far, None without --align."""
        from mobilenet_embed.align.inference import align_summary

        return None if self.align_counts is None else align_summary(self.data_cfg, self.align_counts)


def load_model(cfg: "Config", path: str, recorded: Optional[dict] = None, flip: Optional[bool] = None,
               align: bool = False, log: Callable[[str], None] = lambda line: None) -> LoadedModel:
    """The embedder at `path` (anything `mbembed eval` takes) with its preprocessing.

    With `recorded` (a gallery's ``model``), crop, flip and distance are the gallery's. Else the
    crop is the model's own (a run's config, an export report), else ``data.crop_fraction``;
    `flip` defaults to ``eval.flip``; the distance is ``eval.distance``. `align`: the images are
    raw photos, aligned on the fly to the template the model records (`model_data_config`,
    `align.inference.aligned_source`, as `mbembed eval --align`); photos without a face are
    centre-cropped and counted (`LoadedModel.align_line`).
    """
    from mobilenet_embed.align.inference import aligned_source
    from mobilenet_embed.embedders import load_embedder

    embedder = load_embedder(path, cfg, batch_size=cfg.eval.batch_size)
    if recorded is not None:
        crop, flip, distance = recorded["crop_fraction"], recorded["flip"], recorded["distance"]
    else:
        crop = embedder.crop_fraction if embedder.crop_fraction is not None else cfg.data.crop_fraction
        flip = cfg.eval.flip if flip is None else bool(flip)
        distance = cfg.eval.distance
    if distance not in DISTANCES:
        raise UserError(f"eval.distance: search supports {', '.join(DISTANCES)}, received {distance!r}")
    alignment = _model_alignment(cfg, embedder, align, log)
    info = {"path": os.path.abspath(str(path)), "kind": embedder.kind,
            "sha256": model_fingerprint(embedder, path), "image_size": int(embedder.image_size),
            "crop_fraction": float(crop), "flip": bool(flip), "embedding_size": int(embedder.embedding_size),
            "distance": distance, "aligned": alignment["align_template"] if align else None}
    data_cfg = dataclasses.replace(cfg.data, source="folder", image_size=embedder.image_size,
                                   crop_fraction=float(crop), augment=False, **alignment)
    batches, counts = aligned_source(data_cfg, align, cfg.eval.batch_size, log)
    return LoadedModel(embedder, info, data_cfg, batches, counts)


def _model_alignment(cfg: "Config", embedder, align: bool, log: Callable[[str], None]) -> dict:
    """``data.align_*`` of the model: with `align`, those `mbembed eval --align` uses
    (`model_data_config`: the model's record, ``--set`` applied); without, the record's (for the
    note that the model expects aligned faces), else the config's."""
    from mobilenet_embed.preprocessing_metadata import model_data_config

    keys = ("align_template", "align_size", "align_select")
    if align:
        wanted = model_data_config(cfg, embedder, log)
        return {k: getattr(wanted, k) for k in keys}
    recorded = getattr(embedder, "recorded", None) or {}
    return {k: recorded[k] if k in recorded else getattr(cfg.data, k) for k in keys}


def embed_images(loaded: LoadedModel, paths: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Embeddings [N, D] of image files, preprocessed as `loaded` records (flip included)."""
    from mobilenet_embed.verification import embed_paths

    return embed_paths(loaded.embedder, loaded.data_cfg, list(paths), batch_size,
                       flip=loaded.info["flip"], batches=loaded.batches)


def check_same_model(recorded: dict, info: dict, where: str) -> None:
    """Refuse a model whose fingerprint or preprocessing differs from what `recorded` says."""
    if recorded["sha256"] != info["sha256"]:
        raise UserError(f"{where}: the model {info['path']} (sha256 {info['sha256'][:12]}) is not the one "
                        f"this gallery was enrolled with ({recorded['path']}, sha256 {recorded['sha256'][:12]})")
    for key in ("image_size", "crop_fraction", "flip", "embedding_size", "distance"):
        if recorded[key] != info[key]:
            raise UserError(f"{where}: {key} {info[key]!r} differs from the gallery's {recorded[key]!r} "
                            "(queries must be preprocessed and compared as the gallery was)")
    # galleries enrolled before the alignment was recorded carry no "aligned": nothing to compare
    if "aligned" in recorded and recorded["aligned"] != info["aligned"]:
        raise UserError(f"{where}: the gallery was enrolled {_aligned_words(recorded['aligned'])}, these "
                        f"images come {_aligned_words(info['aligned'])}; give --align to both or to neither")


def _aligned_words(template: Optional[str]) -> str:
    return f"with --align (faces aligned to the {template!r} template)" if template else "without --align"


# --------------------------------------------------------------------------- enrol, remove


@dataclasses.dataclass
class EnrollResult:
    index: str
    added_images: int
    new_identities: int
    skipped_duplicates: int
    n_rows: int
    n_identities: int
    seconds: float
    align: Optional[dict] = None  # `align_summary` of the images aligned by this call (--align)


def _collect_folder(root: str) -> list[tuple[str, str]]:
    from mobilenet_embed.pairs import identity_folders

    folders = identity_folders(root)
    if not folders:
        raise UserError(f"--data {root}: no identity sub-folder with images")
    return [(name, path) for name, paths in folders.items() for path in paths]


def read_embeddings_export(folder: str) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """(embeddings [N, D], [(identity, path)]) of an `mbembed export embeddings` output folder."""
    emb_path, index_path = os.path.join(folder, "embeddings.npy"), os.path.join(folder, "index.csv")
    for p in (emb_path, index_path):
        if not os.path.isfile(p):
            raise UserError(f"--embeddings {folder}: {os.path.basename(p)} not found (an `mbembed export "
                            "embeddings` folder holds embeddings.npy and index.csv)")
    emb = np.load(emb_path)
    with open(index_path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if emb.ndim != 2 or len(rows) != len(emb):
        raise UserError(f"{index_path}: {len(rows)} rows for embeddings of shape {list(emb.shape)}")
    try:
        return emb.astype(np.float32), [(r["identity"], r["path"]) for r in rows]
    except KeyError:
        raise UserError(f"{index_path}: expected columns row, path, identity") from None


def add_to_gallery(gallery: Gallery, items: Sequence[tuple[str, str]], embeddings: np.ndarray) -> int:
    """Append (identity, path) items with their embeddings; returns how many identities are new.

    ``images`` mode: one row each. ``templates`` mode: each identity's row becomes the
    normalised sum of all its images' embeddings (old ones recovered as row x norm)."""
    known = set(gallery.identities())
    new_ids = len({name for name, _ in items} - known)
    emb = np.asarray(embeddings, np.float32)
    if gallery.mode == "images":
        gallery.rows.extend({"identity": n, "sources": [p], "norm": 1.0} for n, p in items)
        gallery.embeddings = np.concatenate([gallery.embeddings, emb])
        return new_ids
    position = {r["identity"]: i for i, r in enumerate(gallery.rows)}
    sums = [gallery.embeddings[i].astype(np.float64) * r["norm"] for i, r in enumerate(gallery.rows)]
    for (name, path), e in zip(items, emb):
        if name not in position:
            position[name] = len(gallery.rows)
            gallery.rows.append({"identity": name, "sources": [], "norm": 0.0})
            sums.append(np.zeros(emb.shape[1]))
        i = position[name]
        sums[i] = sums[i] + e
        gallery.rows[i]["sources"].append(path)
    norms = [float(np.linalg.norm(s)) for s in sums]
    for row, n in zip(gallery.rows, norms):
        row["norm"] = n
    gallery.embeddings = np.stack([s / max(n, 1e-12) for s, n in zip(sums, norms)]).astype(np.float32)
    return new_ids


def enroll(cfg: "Config", model: str, index: str, data: Optional[str] = None, embeddings: Optional[str] = None,
           mode: Optional[str] = None, align: bool = False,
           log: Callable[[str], None] = lambda line: None) -> EnrollResult:
    """Enrol the identity folder `data` (or the `export embeddings` folder `embeddings`) into the
    gallery `index`, creating it or appending to it (the model must be the gallery's).

    Images already enrolled (same path) are skipped and counted; nothing already enrolled is
    re-embedded. `mode` (``images`` | ``templates``) applies to a new gallery (default images)
    and must match an existing one. `align`: the images are raw photos, aligned on the fly
    (`load_model`; with `embeddings`, the images re-embedded by the spot check); what alignment
    did goes to `log` and the result's `align`.
    """
    start = time.perf_counter()
    if (data is None) == (embeddings is None):
        raise UserError("mbembed enroll: give exactly one of --data DIR and --embeddings DIR")
    if mode is not None and mode not in MODES:
        raise UserError(f"--mode: expected one of {', '.join(MODES)}, received {mode!r}")
    existing = os.path.isfile(os.path.join(index, META_NAME))
    gallery = load_gallery(index) if existing else None
    if gallery is not None and mode is not None and mode != gallery.mode:
        raise UserError(f"--mode {mode}: the gallery {index} keeps {gallery.mode}")
    if embeddings is not None and gallery is not None and gallery.model["flip"]:
        raise UserError(f"--embeddings {embeddings}: export embeddings are not flip-averaged, but the gallery "
                        f"{index} is (eval.flip); enrol images with --data instead")
    loaded = load_model(cfg, model, recorded=gallery.model if gallery is not None else None,
                        flip=False if embeddings is not None else None, align=align, log=log)
    if gallery is not None:
        check_same_model(gallery.model, loaded.info, f"mbembed enroll --out {index}")
    else:
        gallery = Gallery(np.zeros((0, loaded.info["embedding_size"]), np.float32), [], mode or "images",
                          loaded.info)

    if data is not None:
        items = [(n, os.path.abspath(p)) for n, p in _collect_folder(data)]
        emb = None
    else:
        emb, items = read_embeddings_export(embeddings)
        items = [(n, os.path.abspath(p)) for n, p in items]
        _spot_check(loaded, emb, items, embeddings, cfg.eval.batch_size)
    enrolled = gallery.sources()
    keep = [i for i, (_, p) in enumerate(items) if p not in enrolled]
    skipped = len(items) - len(keep)
    items = [items[i] for i in keep]
    if items:
        if emb is None:
            log(f"embedding {len(items)} images with {loaded.info['kind']} model {model}")
            emb = embed_images(loaded, [p for _, p in items], cfg.eval.batch_size)
        else:
            emb = emb[keep]
        new_ids = add_to_gallery(gallery, items, emb)
        save_gallery(gallery, index)
    else:
        new_ids = 0
        if not existing:
            raise UserError(f"--data {data}: no images to enrol")
    if loaded.align_counts is not None:
        log(loaded.align_line())
    return EnrollResult(index, len(items), new_ids, skipped, len(gallery.rows), len(gallery.identities()),
                        time.perf_counter() - start, loaded.align_summary())


def _spot_check(loaded: LoadedModel, emb: np.ndarray, items: list, folder: str, batch_size: int) -> None:
    """Re-embed up to 4 images of an export and refuse it when they do not match (another model)."""
    if emb.shape[1] != loaded.info["embedding_size"]:
        raise UserError(f"--embeddings {folder}: {emb.shape[1]}-d embeddings, the model gives "
                        f"{loaded.info['embedding_size']}-d")
    picks = sorted(set(np.linspace(0, len(items) - 1, min(4, len(items))).astype(int).tolist()))
    again = embed_images(loaded, [items[i][1] for i in picks], batch_size)
    cos = np.sum(again * emb[picks], axis=1)
    if np.min(cos) < SPOT_CHECK_COSINE:
        raise UserError(f"--embeddings {folder}: not made by {loaded.info['path']} with this preprocessing "
                        f"(re-embedded images have cosine {np.min(cos):.4f} < {SPOT_CHECK_COSINE} to the file's)")


def remove_identities(index: str, names: Sequence[str]) -> tuple[int, int]:
    """Remove every row of the identities `names` from the gallery `index`: (identities, rows) removed."""
    gallery = load_gallery(index)
    known = set(gallery.identities())
    missing = [n for n in names if n not in known]
    if missing:
        raise UserError(f"{index}: not enrolled: {', '.join(missing)}")
    drop = set(names)
    keep = [i for i, r in enumerate(gallery.rows) if r["identity"] not in drop]
    removed = len(gallery.rows) - len(keep)
    gallery.rows = [gallery.rows[i] for i in keep]
    gallery.embeddings = gallery.embeddings[keep]
    save_gallery(gallery, index)
    return len(drop), removed


# --------------------------------------------------------------------------- search


@dataclasses.dataclass
class Match:
    identity: str
    distance: float
    source: str  # the gallery image (images mode) or identity's first image (templates)


@dataclasses.dataclass
class QueryResult:
    query: str
    matches: list  # [Match], best first
    identity: Optional[str]  # the decision: best identity, or None for unknown
    threshold: Optional[float]

    def to_dict(self) -> dict:
        best = self.matches[0].distance if self.matches else None
        return {"query": self.query, "identity": self.identity if self.identity is not None else "unknown",
                "known": self.identity is not None, "distance": best, "threshold": self.threshold,
                "matches": [{"rank": i + 1, **dataclasses.asdict(m)} for i, m in enumerate(self.matches)]}


def decide(best_distance: float, threshold: Optional[float]) -> bool:
    """Known when the best distance is below the threshold (eval's rule ``distance < threshold``)."""
    return threshold is None or best_distance < threshold


def search_embeddings(gallery: Gallery, queries: np.ndarray, names: Sequence[str], top_k: int = 5,
                      threshold: Optional[float] = None, backend: str = "numpy") -> list[QueryResult]:
    """Top-k identities of each query embedding, and the known / unknown decision."""
    labels, identities = gallery.labels()
    engine = make_backend(backend, gallery.embeddings, gallery.model["distance"])
    dist, found, rows = identity_search(engine, labels, queries, top_k)
    results = []
    for name, d_row, l_row, r_row in zip(names, dist, found, rows):
        matches = [Match(identities[label], float(d), gallery.rows[r]["sources"][0])
                   for d, label, r in zip(d_row, l_row, r_row) if label >= 0]
        known = bool(matches) and decide(matches[0].distance, threshold)
        results.append(QueryResult(name, matches, matches[0].identity if known else None, threshold))
    return results


def search_images(cfg: "Config", index: str, images: Sequence[str], model: Optional[str] = None,
                  top_k: int = 5, threshold: Optional[float] = None, backend: str = "numpy",
                  align: bool = False, log: Callable[[str], None] = lambda line: None
                  ) -> tuple[list[QueryResult], Gallery]:
    """Embed query image files with the gallery's model (or `model`, which must have the same
    fingerprint) and search the gallery `index`. `align`: the queries are raw photos, aligned on
    the fly (`load_model`); what alignment did goes to `log`."""
    gallery = load_gallery(index)
    if not gallery.rows:
        raise UserError(f"{index}: the gallery is empty")
    path = model or gallery.model["path"]
    if model is None and not os.path.exists(path):
        raise UserError(f"{index}: the gallery's model {path} is gone; give --model PATH (the same model)")
    loaded = load_model(cfg, path, recorded=gallery.model, align=align, log=log)  # the gallery's preprocessing
    check_same_model(gallery.model, loaded.info, f"mbembed search --index {index}")
    paths = expand_images(images)
    queries = embed_images(loaded, paths, cfg.eval.batch_size)
    if loaded.align_counts is not None:
        log(loaded.align_line())
    return search_embeddings(gallery, queries, paths, top_k, threshold, backend), gallery


def expand_images(images: Sequence[str]) -> list[str]:
    """Files as given, folders replaced by the image files below them (sorted)."""
    from mobilenet_embed.image_files import IMAGE_EXTENSIONS

    exts = tuple(e.lower() for e in IMAGE_EXTENSIONS)
    out = []
    for item in images:
        if os.path.isdir(item):
            found = sorted(os.path.join(r, f) for r, _, files in os.walk(item) for f in files
                           if f.lower().endswith(exts) and not f.startswith("."))
            if not found:
                raise UserError(f"{item}: no image files in this folder")
            out.extend(found)
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise UserError(f"{item}: query image not found")
    if not out:
        raise UserError("mbembed search: no query images given")
    return out


# --------------------------------------------------------------------------- thresholds


def threshold_from_eval(metrics_path: str, far: float, distance: str) -> dict:
    """The distance threshold for a false-accept rate `far` from `mbembed eval`'s output.

    From ``pair_distances.csv`` beside `metrics_path` when present: `threshold_at_rate` over
    the distances of all different-person pairs (pooled, no folds: at most ``floor(far * M)``
    of the M different pairs fall below it). Else from the ROC of ``metrics.json`` (FAR
    averaged over folds on the 400-step grid), by `metrics.threshold_at_far`.
    Returns ``threshold``, ``far`` (achieved), ``source``, ``n_different`` and the eval's
    preprocessing (``image_size``, ``crop_fraction``, ``flip``, ``model``).
    """
    from mobilenet_embed.identification import threshold_at_rate
    from mobilenet_embed.metrics import threshold_at_far

    metrics_path, metrics = _read_eval_json(metrics_path, "metrics.json", distance,
                                            "eval metrics not found (run mbembed eval, or give --metrics FILE)")
    csv_path = os.path.join(os.path.dirname(metrics_path), "pair_distances.csv")
    out = {key: metrics.get(key) for key in ("image_size", "crop_fraction", "flip", "model")}
    if os.path.isfile(csv_path):
        with open(csv_path, encoding="utf-8", newline="") as fh:
            different = [float(r["distance"]) for r in csv.DictReader(fh) if r["same"] == "0"]
        if not different:
            raise UserError(f"{csv_path}: no different-person pairs to set a FAR threshold on")
        t = threshold_at_rate(different, far)
        out.update(threshold=t, far=float(np.mean(np.asarray(different) < t)), source=csv_path,
                   n_different=len(different))
        return out
    try:
        fpr, thresholds = np.asarray(metrics["fpr"]), np.asarray(metrics["thresholds"])
    except KeyError:
        raise UserError(f"{metrics_path}: no ROC (fpr, thresholds) and no pair_distances.csv beside it") from None
    t = threshold_at_far(fpr, thresholds, far)
    out.update(threshold=t, far=float(np.interp(t, thresholds, fpr)), source=metrics_path,
               n_different=metrics.get("n_diff"))
    return out


def _read_eval_json(path: str, name: str, distance: str, missing: str) -> tuple[str, dict]:
    """(file, contents) of an eval output `name` (given as the file or its folder), refusing a
    missing or invalid file and one measured with another distance than the gallery's."""
    if os.path.isdir(path):
        path = os.path.join(path, name)
    metrics = _load_json(path, f"{path}: {missing}")
    if metrics.get("distance") != distance:
        raise UserError(f"{path}: eval distance {metrics.get('distance')!r}, the gallery compares by {distance!r}")
    return path, metrics


def default_metrics_path(model_path: str) -> Optional[str]:
    """``<run>/eval/metrics.json`` of the run the model comes from (what `mbembed eval` writes by
    default), or ``eval/metrics.json`` beside an exported model; None when neither exists."""
    from mobilenet_embed.checkpoints import run_config_path

    found = run_config_path(model_path)
    candidates = [os.path.join(os.path.dirname(found), "eval", "metrics.json")] if found else []
    candidates.append(os.path.join(os.path.dirname(os.path.abspath(model_path).rstrip(os.sep)), "eval",
                                   "metrics.json"))
    return next((c for c in candidates if os.path.isfile(c)), None)


def threshold_from_identification(path: str, fpir: float, distance: str) -> dict:
    """The distance threshold for a false-positive identification rate `fpir` from the output of
    `mbembed eval --protocol identification` (``identification.json`` or its folder).

    `threshold_at_rate` over the best distances of the distractor probes in ``probe_ranks.csv``
    beside it: the eval's own rule for DIR@FPIR. Returns ``threshold``, ``fpir`` (achieved),
    ``n_distractors``, ``n_gallery_identities``, ``model_sha256`` and ``source``.
    """
    from mobilenet_embed.identification import threshold_at_rate

    path, metrics = _read_eval_json(path, "identification.json", distance,
                                    "identification metrics not found (run mbembed eval --protocol identification)")
    csv_path = os.path.join(os.path.dirname(path), "probe_ranks.csv")
    if not os.path.isfile(csv_path):
        raise UserError(f"{csv_path}: not found (written by mbembed eval --protocol identification)")
    with open(csv_path, encoding="utf-8", newline="") as fh:
        best = [float(r["best_distance"]) for r in csv.DictReader(fh) if r["mated"] == "0"]
    if not best:
        raise UserError(f"{csv_path}: no distractor probes to set an FPIR threshold on")
    t = threshold_at_rate(best, fpir)
    return {"threshold": t, "fpir": float(np.mean(np.asarray(best) < t)), "n_distractors": len(best),
            "n_gallery_identities": metrics.get("n_gallery_identities"), "model_sha256": metrics.get("model_sha256"),
            "source": csv_path}
