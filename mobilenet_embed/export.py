"""Export a trained embedding model: SavedModel, TFLite (float32, float16, int8), a parity report.

`export_model` (``mbembed export``) loads a checkpoint, writes the formats of
``export.formats`` under an output directory and checks each against the Keras model:

* ``saved_model/``: two signatures. ``serving_default`` takes raw images (uint8
  ``[N, H, W, 3]``, any H and W) and preprocesses them inside the graph with the very function
  training uses (`mobilenet_embed.data.preprocess_images`: central crop, resize, scale to
  [-1, 1]); ``embed_preprocessed`` takes float32 ``[N, S, S, 3]`` already preprocessed. Both
  return ``{"embeddings": float32 [N, D]}``, L2-normalised. No Python is needed to serve it
  (TF Serving, `tf.saved_model.load`).
* ``model_float32.tflite``, ``model_float16.tflite`` (float16 weights, float32 compute on
  CPU), ``model_int8.tflite`` (full-integer post-training quantisation, int8 input and
  output, calibrated on ``export.representative_samples`` images of the training source):
  converted from the ``embed_preprocessed`` signature with builtin ops only. Their input is
  the preprocessed image (batch dimension dynamic); for int8 the input is
  ``round(x / scale + zero_point)`` with the scale and zero point the report lists. A model
  that would need Flex (TF Select) ops is refused with the ops named.
* ``export_report.json``: for each format its size, the cosine similarity of its embeddings
  to the Keras model's on ``export.parity_samples`` held-out images (mean, min), single-image
  latency and, with ``pairs``, verification accuracy. A format below its `TARGETS` is not
  kept unless ``allow_degraded``.

Nothing is overwritten without ``force``; everything is built in ``<out>/.tmp-export-<pid>/``
and renamed into place, so a crash never leaves a half-written model under a final name.

`export_embeddings` (``mbembed export embeddings``) embeds every image of a folder or TFRecord
source into ``embeddings.npy`` + ``index.csv``, in chunks that a rerun reuses.

Latency: median of `latency_runs` single-image calls after warm-up. TFLite files run with 1 and
2 interpreter threads. The Keras model (inside a `tf.function`) and the SavedModel run with
TensorFlow's thread pools as they are (``tf.config.threading`` left unchanged: by default one
intra-op thread per core), since TensorFlow cannot change them once started;
``scripts/bench_export.py`` measures them at 1 and 2 threads in separate processes.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import shutil
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

import numpy as np

from mobilenet_embed.embedders import (OUTPUT_KEY, PREPROCESSED_SIGNATURE, RAW_SIGNATURE,
                                       Embedder, KerasEmbedder, SavedModelEmbedder,
                                       TFLiteEmbedder, config_for_checkpoint, is_saved_model,
                                       l2_normalize, load_checkpoint_model, load_embedder,
                                       resolve_checkpoint)
from mobilenet_embed.errors import UserError

if TYPE_CHECKING:
    import keras

    from mobilenet_embed.config import Config, DataConfig

FORMATS = ("saved_model", "tflite_float32", "tflite_float16", "tflite_int8")
TFLITE_KINDS = {"tflite_float32": "float32", "tflite_float16": "float16", "tflite_int8": "int8"}
#: file (or directory) name of each format under the output directory
FILENAMES = {
    "saved_model": "saved_model",
    "tflite_float32": "model_float32.tflite",
    "tflite_float16": "model_float16.tflite",
    "tflite_int8": "model_int8.tflite",
}
REPORT_NAME = "export_report.json"
#: parity target of each format: (statistic of the per-image cosine similarity, lowest value)
TARGETS = {
    "saved_model": ("min", 0.9999),
    "tflite_float32": ("min", 0.9999),
    "tflite_float16": ("min", 0.999),
    "tflite_int8": ("mean", 0.98),
}
EMBEDDINGS_NAME = "embeddings.npy"
INDEX_NAME = "index.csv"
CHUNKS_DIR = ".chunks"


# --------------------------------------------------------------------------- small helpers


def _preprocess_images():
    """The training preprocessing (`mobilenet_embed.data.preprocess_images`)."""
    try:
        from mobilenet_embed.data import preprocess_images
    except ImportError:
        from mobilenet_embed.data.preprocess import preprocess_images
    return preprocess_images


def cosine_similarities(reference: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of two [N, D] arrays."""
    a = l2_normalize(np.asarray(reference, np.float64))
    b = l2_normalize(np.asarray(embeddings, np.float64))
    return np.sum(a * b, axis=1)


def measure_latency(fn: Callable[[], Any], runs: int = 30, warmup: int = 3) -> float:
    """Median wall time of `fn()` in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, f))
                   for root, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _place(tmp: str, final: str) -> None:
    """Move `tmp` to `final`, replacing it. Files: one atomic `os.replace`. Directories: the old
    one is renamed aside first, so `final` always names a complete directory or nothing."""
    if os.path.isdir(final) and not os.path.islink(final) or (
            os.path.lexists(final) and os.path.isdir(tmp) != os.path.isdir(final)):
        aside = os.path.join(os.path.dirname(final), f".old-{os.path.basename(final)}-{os.getpid()}")
        _remove(aside)
        os.replace(final, aside)
        os.replace(tmp, final)
        _remove(aside)
    else:
        os.replace(tmp, final)


def _clean_stale(out_dir: str, prefix: str) -> None:
    """Remove temporary directories of dead processes (`<prefix><pid>`) in `out_dir`."""
    if not os.path.isdir(out_dir):
        return
    for entry in os.listdir(out_dir):
        match = re.fullmatch(re.escape(prefix) + r"(\d+)", entry)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(os.path.join(out_dir, entry), ignore_errors=True)


def _write_text_atomic(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{os.path.basename(path)}-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _check_formats(formats: Optional[Sequence[str]], cfg: "Config") -> list[str]:
    formats = list(cfg.export.formats if formats is None else formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UserError(f"export formats: unknown {', '.join(map(repr, unknown))}; expected some of "
                        f"{', '.join(FORMATS)}")
    if not formats:
        raise UserError("export formats: expected at least one format, received []")
    return [f for f in FORMATS if f in formats]  # canonical order, no duplicates


# --------------------------------------------------------------------------- SavedModel


def export_saved_model(model: "keras.Model", path: str, image_size: Optional[int] = None,
                       crop_fraction: float = 1.0) -> str:
    """Write `model` as a SavedModel at `path` with two signatures (see the module doc):
    ``serving_default`` on raw uint8 images [N, H, W, 3] (any H, W), preprocessed in the graph
    by `preprocess_images(images, image_size, crop_fraction)`, and ``embed_preprocessed`` on
    float32 [N, S, S, 3]. Both return ``{"embeddings": [N, D]}``. Returns `path`.
    """
    import keras
    import tensorflow as tf

    preprocess_images = _preprocess_images()
    size = int(model.input_shape[1])
    if image_size is not None and int(image_size) != size:
        raise UserError(f"export: image_size {image_size} differs from the model's input size {size}")

    def embed_raw(images):
        return {OUTPUT_KEY: model(preprocess_images(images, size, crop_fraction), training=False)}

    def embed_preprocessed(images):
        return {OUTPUT_KEY: model(images, training=False)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(RAW_SIGNATURE, embed_raw, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    archive.add_endpoint(PREPROCESSED_SIGNATURE, embed_preprocessed, input_signature=[
        tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
    archive.write_out(str(path), verbose=False)
    return str(path)


# --------------------------------------------------------------------------- TFLite


_FLEX_PATTERNS = (
    re.compile(r"TF Select ops: ([^\n]+)"),
    re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op"),
)


def flex_ops_in(message: str) -> list[str]:
    """TensorFlow op names a failed conversion reports as needing Flex (TF Select)."""
    ops: list[str] = []
    for pattern in _FLEX_PATTERNS:
        for match in pattern.finditer(message):
            for name in re.split(r"[,\s]+", match.group(1)):
                name = name.strip().removeprefix("tf.")
                if name and name not in ops:
                    ops.append(name)
    return ops


def export_tflite(saved_model_dir: str, path: str, kind: str,
                  representative_images: Optional[np.ndarray] = None,
                  signature: str = PREPROCESSED_SIGNATURE) -> str:
    """Convert `signature` of a SavedModel to a .tflite file at `path`, builtin ops only.

    `kind`: ``float32``; ``float16`` (weights stored as float16); ``int8`` (full-integer
    post-training quantisation with int8 input and output, calibrated on
    `representative_images`, preprocessed float32 [N, S, S, 3]). Raises `UserError` naming the
    ops when the model needs Flex ops, which devices do not have. Returns `path`.
    """
    import tensorflow as tf

    kind = TFLITE_KINDS.get(kind, kind)
    if kind not in ("float32", "float16", "int8"):
        raise UserError(f"tflite kind: expected float32, float16 or int8, received {kind!r}")
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=[signature])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if kind == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif kind == "int8":
        if representative_images is None or len(representative_images) == 0:
            raise UserError("tflite int8: calibration needs representative images, received none")
        calibration = np.asarray(representative_images, np.float32)

        def representative_dataset():
            for image in calibration:
                yield [image[None]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    try:
        flatbuffer = converter.convert()
    except Exception as exc:  # noqa: BLE001 - ConverterError and friends are not public types
        message = str(exc)
        ops = flex_ops_in(message)
        if ops:
            raise UserError(
                f"tflite {kind}: {saved_model_dir}: the model uses TensorFlow ops with no TFLite "
                f"builtin: {', '.join(ops)}. They would need Flex (TF Select) ops, which devices do "
                "not have; replace them with ops TFLite supports "
                "(https://ai.google.dev/edge/litert/models/ops_compatibility)") from None
        if type(exc).__name__ != "ConverterError":
            raise
        lines = [ln.strip() for ln in message.splitlines() if "error" in ln.lower()]
        raise UserError(f"tflite {kind}: {saved_model_dir}: conversion failed: "
                        f"{(lines or [message.strip()])[-1][:500]}") from None
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(flatbuffer)
    os.replace(tmp, path)
    return str(path)


# --------------------------------------------------------------------------- data


def _dataset_arrays(dataset) -> Iterable[np.ndarray]:
    for batch in dataset:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        elif isinstance(batch, dict):
            batch = batch["images"]
        yield np.asarray(batch, np.float32)


def load_images(data_cfg: "DataConfig", paths: Sequence[str], batch_size: int = 64,
                check: bool = True) -> np.ndarray:
    """Preprocessed float32 images [N, S, S, 3] of `paths` (as training preprocesses them)."""
    from mobilenet_embed.data import images_dataset

    size = data_cfg.image_size
    if not len(paths):
        return np.zeros((0, size, size, 3), np.float32)
    arrays = list(_dataset_arrays(images_dataset(data_cfg, list(paths), batch_size, check=check)))
    images = np.concatenate(arrays) if arrays else np.zeros((0, size, size, 3), np.float32)
    if len(images) != len(paths):
        raise UserError(f"expected {len(paths)} images, the data pipeline returned {len(images)}")
    return images


def sample_images(cfg: "Config", n_calibration: int, n_parity: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibration and parity images from the training data source, disjoint.

    Parity images come first from the identities training holds out for validation
    (`split_identities` with ``data.val_identities``), calibration images first from the
    training identities; either side is topped up from the other when it is too small. Draws are seeded by
    ``cfg.seed``. When the source holds fewer images than asked for, both sets shrink in
    proportion.
    """
    from mobilenet_embed.data import build_index

    index, _ = build_index(cfg.data, check=True)
    paths = list(index.paths)
    rng = np.random.default_rng(cfg.seed)
    total = n_calibration + n_parity
    if len(paths) < 2:
        raise UserError(f"data: {len(paths)} image(s) found; the export report needs at least 2")
    if len(paths) < total:
        n_parity = max(1, round(n_parity * len(paths) / total))
        n_calibration = len(paths) - n_parity
    held_out = np.zeros(len(paths), bool)
    if cfg.data.val_identities > 0:
        from mobilenet_embed.data import split_identities

        _, val = split_identities(index, cfg.data.val_identities, cfg.seed)
        val_paths = set(val.paths)
        held_out = np.array([p in val_paths for p in paths], bool)
    held = rng.permutation(np.flatnonzero(held_out)).tolist()
    train = rng.permutation(np.flatnonzero(~held_out)).tolist()
    parity = (held + train)[:n_parity]
    used = set(parity)
    calibration = [i for i in train + held if i not in used][:n_calibration]
    return (load_images(cfg.data, [paths[i] for i in sorted(calibration)], check=False),
            load_images(cfg.data, [paths[i] for i in sorted(parity)], check=False))


# --------------------------------------------------------------------------- report


@dataclass
class FormatResult:
    """One row of the export report."""

    format: str
    path: Optional[str]  # where it was written; None when not kept
    size_bytes: int
    cosine_mean: Optional[float] = None
    cosine_min: Optional[float] = None
    target: dict = field(default_factory=dict)  # {"statistic": "min", "value": 0.9999}
    passed: bool = True
    kept: bool = True
    latency_ms: dict = field(default_factory=dict)  # {"threads_1": .., "threads_2": ..} or {"tf_default": ..}
    input: dict = field(default_factory=dict)  # the input contract
    verification: Optional[dict] = None
    checks: dict = field(default_factory=dict)  # e.g. raw-signature parity of the SavedModel


@dataclass
class ExportReport:
    """What `export_model` wrote and how each format compares with the Keras model."""

    out_dir: str
    checkpoint: str
    checkpoint_used: str
    image_size: int
    embedding_size: int
    crop_fraction: float
    calibration_images: int
    parity_images: int
    reference: FormatResult
    formats: list[FormatResult]
    pairs: Optional[dict] = None
    report_path: Optional[str] = None
    versions: dict = field(default_factory=dict)

    @property
    def degraded(self) -> list[str]:
        return [r.format for r in self.formats if not r.passed]

    @property
    def passed(self) -> bool:
        return not self.degraded

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["passed"] = self.passed
        data["degraded"] = self.degraded
        return data

    def table(self) -> str:
        """The report as a plain-text table (what `mbembed export` prints)."""
        head = ["format", "size MB", "cos mean", "cos min", "target", "ok",
                "ms 1 thr", "ms 2 thr", "ms TF"]
        if self.pairs:
            head.append("accuracy")
        rows = []
        for r in [self.reference] + self.formats:
            lat = r.latency_ms

            def ms(key: str) -> str:
                return f"{lat[key]:.2f}" if lat.get(key) is not None else "-"

            target = f"{r.target['statistic']} >= {r.target['value']:g}" if r.target else "reference"
            name = r.format + (" (reference)" if r is self.reference else
                               "" if r.kept else " (not kept)")
            row = [name, f"{r.size_bytes / 1e6:.2f}",
                   "-" if r.cosine_mean is None else f"{r.cosine_mean:.6f}",
                   "-" if r.cosine_min is None else f"{r.cosine_min:.6f}",
                   target, "yes" if r.passed else "NO", ms("threads_1"), ms("threads_2"),
                   ms("tf_default")]
            if self.pairs:
                row.append("-" if not r.verification else
                           f"{r.verification['accuracy']:.4f}")
            rows.append(row)
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        lines.append("latency: batch 1, median; 'thr' = TFLite interpreter threads, 'TF' = TensorFlow's "
                     "default thread pools (Keras tf.function, SavedModel)")
        return "\n".join(lines)


#: keys of `verification_metrics` copied into the report
VERIFICATION_KEYS = ("accuracy", "accuracy_std", "threshold", "val", "val_std", "far", "far_target",
                     "auc", "eer", "n_pairs")


def _verify_pairs(embedders: dict[str, Embedder], cfg: "Config", pairs_file: str,
                  root: Optional[str]) -> tuple[dict, dict[str, dict]]:
    """Verification metrics of every embedder on a pairs file, through
    `mobilenet_embed.embedding.evaluate_pairs` (the code path of `mbembed eval`)."""
    from mobilenet_embed.embedding import evaluate_pairs
    from mobilenet_embed.pairs import read_pairs

    root = root or cfg.eval.data or cfg.data.path
    if not root:
        raise UserError(f"--pairs {pairs_file}: the image root is unknown; set eval.data "
                        "(or data.path) or pass --pairs-root")
    pairs = read_pairs(pairs_file, root, folds=cfg.eval.pairs_folds)
    if not pairs:
        raise UserError(f"{pairs_file}: no pairs")
    data_cfg = dataclasses.replace(cfg.data, augment=False)
    results = {}
    for name, embedder in embedders.items():
        metrics = evaluate_pairs(embedder, data_cfg, pairs, batch_size=cfg.eval.batch_size,
                                 flip=cfg.eval.flip, n_folds=cfg.eval.folds,
                                 far_target=cfg.eval.far_target, distance=cfg.eval.distance)
        results[name] = {k: metrics[k] for k in VERIFICATION_KEYS}
    info = {"file": str(pairs_file), "root": str(root), "n_pairs": len(pairs),
            "distance": cfg.eval.distance, "flip": cfg.eval.flip, "folds": cfg.eval.folds}
    return info, results


def _raw_signature_check(saved: SavedModelEmbedder, keras_embedder: KerasEmbedder,
                         crop_fraction: float, seed: int) -> float:
    """Min cosine of the raw-uint8 signature vs `preprocess_images` + Keras, on two odd sizes."""
    preprocess_images = _preprocess_images()
    rng = np.random.default_rng(seed)
    size = saved.image_size
    worst = 1.0
    for h, w in ((size + 7, size + 13), (2 * size, size + 1)):
        images = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        reference = keras_embedder.embed(np.asarray(preprocess_images(images, size, crop_fraction)))
        worst = min(worst, float(cosine_similarities(reference, saved.embed_raw(images)).min()))
    return worst


def _versions() -> dict:
    import keras
    import tensorflow as tf

    from mobilenet_embed import __version__

    out = {"mbembed": __version__, "tensorflow": tf.__version__, "keras": keras.__version__}
    try:
        from importlib.metadata import version

        out["ai_edge_litert"] = version("ai-edge-litert")
    except Exception:  # noqa: BLE001 - informative only
        pass
    return out


def export_model(cfg: "Config", checkpoint: str, out_dir: str, formats: Optional[Sequence[str]] = None,
                 force: bool = False, allow_degraded: bool = False, pairs: Optional[str] = None,
                 pairs_root: Optional[str] = None, latency_runs: int = 30,
                 log: Callable[[str], None] = lambda line: None) -> ExportReport:
    """Export the checkpoint's model in `formats` (default ``cfg.export.formats``) to `out_dir`.

    `checkpoint`: a checkpoint file or run directory (`resolve_checkpoint`); a run's saved
    config sets the model and data sections. Writes each format, then ``export_report.json``;
    returns the report. A format that misses its parity target (`TARGETS`) is left out (its
    row says ``kept: false``) unless `allow_degraded`; check `report.passed`. `pairs` (a pairs
    file; images under `pairs_root`, default ``eval.data`` or ``data.path``) adds each format's
    verification accuracy. Existing outputs are an error unless `force`. `log` receives
    progress lines.
    """
    formats = _check_formats(formats, cfg)
    out_dir = str(out_dir)
    targets = {f: os.path.join(out_dir, FILENAMES[f]) for f in formats}
    report_path = os.path.join(out_dir, REPORT_NAME)
    existing = [p for p in list(targets.values()) + [report_path] if os.path.lexists(p)]
    if existing and not force:
        raise UserError(f"{out_dir}: would overwrite {', '.join(os.path.basename(p) for p in existing)}; "
                        "pass --force to replace")
    if pairs is not None and not os.path.isfile(pairs):
        raise UserError(f"--pairs {pairs}: file not found")

    resolved = resolve_checkpoint(checkpoint)
    model, cfg = load_checkpoint_model(checkpoint, cfg)
    size, crop = cfg.data.image_size, cfg.data.crop_fraction
    log(f"checkpoint: {resolved.path} ({resolved.which}); input {size}x{size}, "
        f"crop_fraction {crop:g}")

    n_cal = cfg.export.representative_samples if "tflite_int8" in formats else 0
    log(f"reading {n_cal} calibration + {cfg.export.parity_samples} parity images "
        f"({cfg.data.source} source)")
    calibration, parity = sample_images(cfg, n_cal, cfg.export.parity_samples)
    keras_embedder = KerasEmbedder(model)
    reference = keras_embedder.embed(parity)
    sample = parity[:1]

    os.makedirs(out_dir, exist_ok=True)
    _clean_stale(out_dir, ".tmp-export-")
    tmp = os.path.join(out_dir, f".tmp-export-{os.getpid()}")
    _remove(tmp)
    os.makedirs(tmp)
    try:
        saved_dir = os.path.join(tmp, FILENAMES["saved_model"])
        log("writing SavedModel")
        export_saved_model(model, saved_dir, size, crop)
        built = {"saved_model": saved_dir}
        for fmt in formats:
            if fmt in TFLITE_KINDS:
                log(f"converting {fmt}")
                built[fmt] = export_tflite(saved_dir, os.path.join(tmp, FILENAMES[fmt]),
                                           TFLITE_KINDS[fmt], calibration if fmt == "tflite_int8" else None)

        ref_row = FormatResult("keras", None, int(sum(int(np.prod(w.shape)) * 4 for w in model.weights)),
                               kept=False, input={"dtype": "float32", "shape": [-1, size, size, 3]},
                               checks={"size": "float32 weights: parameters x 4 bytes"})
        ref_row.latency_ms["tf_default"] = measure_latency(lambda: keras_embedder.embed(sample),
                                                           latency_runs)
        rows: list[FormatResult] = []
        embedders: dict[str, Embedder] = {"keras": keras_embedder}
        for fmt in formats:
            path = built[fmt]
            statistic, value = TARGETS[fmt]
            row = FormatResult(fmt, None, _size(path), target={"statistic": statistic, "value": value})
            if fmt == "saved_model":
                embedder = SavedModelEmbedder(path)
                row.input = {"signatures": {
                    RAW_SIGNATURE: {"dtype": "uint8", "shape": [-1, -1, -1, 3],
                                    "values": f"raw RGB images (cropped to {crop:g}, resized to {size})"},
                    PREPROCESSED_SIGNATURE: {"dtype": "float32", "shape": [-1, size, size, 3],
                                             "values": "preprocessed image in [-1, 1]"}},
                    "output": OUTPUT_KEY}
                row.checks["raw_signature_cosine_min"] = _raw_signature_check(
                    embedder, keras_embedder, crop, cfg.seed)
                row.latency_ms["tf_default"] = measure_latency(lambda e=embedder: e.embed(sample),
                                                               latency_runs)
            else:
                embedder = TFLiteEmbedder(path)
                row.input = embedder.input_contract()
                for threads in (1, 2):
                    timed = TFLiteEmbedder(path, num_threads=threads)
                    row.latency_ms[f"threads_{threads}"] = measure_latency(
                        lambda e=timed: e.embed(sample), latency_runs)
            cos = cosine_similarities(reference, embedder.embed(parity))
            row.cosine_mean, row.cosine_min = float(cos.mean()), float(cos.min())
            row.passed = (row.cosine_min if statistic == "min" else row.cosine_mean) >= value
            if "raw_signature_cosine_min" in row.checks:
                row.passed = row.passed and row.checks["raw_signature_cosine_min"] >= value
            embedders[fmt] = embedder
            rows.append(row)
            log(f"{fmt}: cosine mean {row.cosine_mean:.6f}, min {row.cosine_min:.6f} "
                f"({'ok' if row.passed else 'below target'})")

        pairs_info = None
        if pairs is not None:
            log(f"verification on {pairs}")
            pairs_info, results = _verify_pairs(embedders, cfg, pairs, pairs_root)
            ref_row.verification = results["keras"]
            for row in rows:
                row.verification = results[row.format]

        for row in rows:
            row.kept = row.passed or allow_degraded
            if row.kept:
                final = targets[row.format]
                _place(built[row.format], final)
                row.path = final
        report = ExportReport(
            out_dir=out_dir, checkpoint=str(checkpoint), checkpoint_used=resolved.path,
            image_size=size, embedding_size=keras_embedder.embedding_size, crop_fraction=crop,
            calibration_images=len(calibration), parity_images=len(parity), reference=ref_row,
            formats=rows, pairs=pairs_info, report_path=report_path, versions=_versions())
        _write_text_atomic(report_path, json.dumps(report.to_dict(), indent=1) + "\n")
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- embeddings


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


def data_config_for(data: str, base: "DataConfig", image_size: int) -> "DataConfig":
    """`base` pointed at `data`: ``synthetic`` (the synthetic source, as `base` configures it);
    TFRecord data written by `mbembed prepare` (a shard glob, a shard, a ``.manifest.json``, its
    PREFIX, or a folder holding one manifest and no sub-folders); else an identity folder.
    Augmentation off, every identity kept (even with one image), images preprocessed to
    `image_size` with `base`'s crop fraction."""
    import glob as globmod

    from mobilenet_embed.data.tfrecord import MANIFEST_SUFFIX

    if data == "synthetic":
        source, path = "synthetic", None
    elif (any(c in data for c in "*?[") or data.endswith(MANIFEST_SUFFIX)
          or re.search(r"-\d{5}-of-\d{5}\.tfrecord$", data) or os.path.isfile(data + MANIFEST_SUFFIX)):
        source, path = "tfrecord", data
    elif os.path.isdir(data):
        manifests = globmod.glob(os.path.join(data, "*" + MANIFEST_SUFFIX))
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


def _write_chunk(path: str, embeddings: np.ndarray) -> None:
    """Write one chunk atomically (temporary name, then rename)."""
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, embeddings.astype(np.float32))
    os.replace(tmp, path)


def export_embeddings(cfg: "Config", checkpoint: str, data_dir: str, out: str, force: bool = False,
                      chunk_size: int = 1024, batch_size: Optional[int] = None,
                      num_threads: Optional[int] = None, progress: bool = True) -> EmbeddingsExport:
    """Embed every image of `data_dir` with the model at `checkpoint` into the folder `out`.

    Writes ``embeddings.npy`` (float32 [N, D], row i = image i) and ``index.csv`` (row, path,
    identity). `checkpoint` is anything `load_embedder` takes (checkpoint, run directory,
    SavedModel, .tflite). Work is done in chunks of `chunk_size` images, each saved as
    ``out/.chunks/chunk-NNNNN.npy`` when finished; a rerun after a crash or Ctrl-C reuses the
    finished chunks (same images, model and chunk size, recorded in ``.chunks/manifest.json``),
    so rows are neither lost nor duplicated. Existing final files need `force`.
    """
    from tqdm import tqdm

    from mobilenet_embed.data import images_dataset, inspect_data

    if chunk_size < 1:
        raise UserError(f"--chunk-size: expected an integer >= 1, received {chunk_size}")
    start = time.perf_counter()
    out = str(out)
    emb_path, index_path = os.path.join(out, EMBEDDINGS_NAME), os.path.join(out, INDEX_NAME)
    chunk_dir = os.path.join(out, CHUNKS_DIR)
    manifest_path = os.path.join(chunk_dir, "manifest.json")
    finishing = os.path.isfile(manifest_path)  # outputs of an unfinished run of ours may exist
    existing = [p for p in (emb_path, index_path) if os.path.lexists(p)]
    if existing and not force and not finishing:
        raise UserError(f"{out}: would overwrite {', '.join(os.path.basename(p) for p in existing)}; "
                        "pass --force to replace")

    embedder = load_embedder(checkpoint, cfg, num_threads=num_threads, batch_size=batch_size)
    run_cfg = cfg if (str(checkpoint).endswith(".tflite") or is_saved_model(str(checkpoint))) \
        else config_for_checkpoint(cfg, checkpoint)
    data_cfg = data_config_for(str(data_dir), run_cfg.data, embedder.image_size)
    if embedder.crop_fraction is not None:
        data_cfg = dataclasses.replace(data_cfg, crop_fraction=embedder.crop_fraction)
    index, data_report = inspect_data(data_cfg, check=True)
    paths = [str(p) for p in index.paths]
    if not paths:
        raise UserError(f"--data {data_dir}: no images found")
    if data_report.checked and data_report.bad_fraction > data_cfg.max_bad_fraction:
        raise UserError(f"--data {data_dir}: {len(data_report.bad_files)} of {data_report.images} "
                        f"images are unreadable, more than data.max_bad_fraction "
                        f"({data_cfg.max_bad_fraction:g}); `mbembed data check` lists them")
    identities = list(index.identities)
    names = [identities[int(label)] for label in index.labels]
    n = len(paths)

    manifest = {"n_images": n, "chunk_size": int(chunk_size),
                "paths_sha1": hashlib.sha1("\n".join(paths).encode()).hexdigest(),
                "model": os.path.abspath(str(checkpoint)), "embedding_size": embedder.embedding_size,
                "image_size": embedder.image_size, "crop_fraction": data_cfg.crop_fraction}
    if finishing:
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
    _write_text_atomic(manifest_path, json.dumps(manifest, indent=1))

    n_chunks = (n + chunk_size - 1) // chunk_size
    chunk_paths = [os.path.join(chunk_dir, f"chunk-{k:05d}.npy") for k in range(n_chunks)]

    def complete(k: int) -> bool:
        expected = min(chunk_size, n - k * chunk_size)
        try:
            arr = np.load(chunk_paths[k], mmap_mode="r")
        except (OSError, ValueError):
            return False
        return arr.shape == (expected, embedder.embedding_size)

    done = [complete(k) for k in range(n_chunks)]
    reused = sum(done)
    done_images = sum(min(chunk_size, n - k * chunk_size) for k in range(n_chunks) if done[k])
    bar = tqdm(total=n, initial=done_images, unit="img", desc="embedding", disable=not progress,
               dynamic_ncols=True)
    try:
        for k in range(n_chunks):
            if done[k]:
                continue
            chunk = paths[k * chunk_size:(k + 1) * chunk_size]
            parts = []
            for batch in _dataset_arrays(images_dataset(data_cfg, chunk, embedder.batch_size, check=False)):
                parts.append(embedder.embed(batch))
                bar.update(len(batch))
            embeddings = np.concatenate(parts) if parts else np.zeros((0, embedder.embedding_size))
            if len(embeddings) != len(chunk):
                raise UserError(f"chunk {k}: expected {len(chunk)} embeddings, the data pipeline "
                                f"returned {len(embeddings)} images")
            _write_chunk(chunk_paths[k], embeddings)
    finally:
        bar.close()

    tmp_emb = os.path.join(out, f".tmp-{EMBEDDINGS_NAME}-{os.getpid()}.npy")
    final = np.lib.format.open_memmap(tmp_emb, mode="w+", dtype=np.float32,
                                      shape=(n, embedder.embedding_size))
    for k in range(n_chunks):
        final[k * chunk_size:(k + 1) * chunk_size] = np.load(chunk_paths[k])
    final.flush()
    del final
    os.replace(tmp_emb, emb_path)
    tmp_index = os.path.join(out, f".tmp-{INDEX_NAME}-{os.getpid()}")
    with open(tmp_index, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", "path", "identity"])
        for row, (path, name) in enumerate(zip(paths, names)):
            writer.writerow([row, path, name])
    os.replace(tmp_index, index_path)
    shutil.rmtree(chunk_dir, ignore_errors=True)
    return EmbeddingsExport(emb_path, index_path, n, embedder.embedding_size, n_chunks, reused,
                            time.perf_counter() - start, [p for p, _ in data_report.bad_files])
