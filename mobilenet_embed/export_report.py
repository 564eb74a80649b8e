"""The export report: how each exported format compares with the Keras model it came from.

For each format: its size, the cosine similarity of its embeddings to the Keras model's on
``export.parity_samples`` held-out images (mean, min), single-image latency and, with a pairs
file, verification accuracy through `mobilenet_embed.verification.evaluate_pairs` (the code path of
`mbembed eval`). A format below its `TARGETS` fails. The report also owns the lines
``mbembed export`` prints about it (`ExportReport.table`, `input_notes`, `parity_warnings`).

Calibration (int8) and parity images come from the training source (`sample_images`).

Latency: median of `latency_runs` single-image calls after warm-up. TFLite files run with 1 and
2 interpreter threads. The Keras model (inside a `tf.function`) and the SavedModel run with
TensorFlow's thread pools as they are (``tf.config.threading`` left unchanged: by default one
intra-op thread per core), since TensorFlow cannot change them once started;
``scripts/bench_export.py`` measures them at 1 and 2 threads in separate processes.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

from mobilenet_embed.embedders import (OUTPUT_KEY, PREPROCESSED_SIGNATURE, RAW_SIGNATURE, Embedder,
                                       KerasEmbedder, SavedModelEmbedder, TFLiteEmbedder, l2_normalize)
from mobilenet_embed.errors import UserError

if TYPE_CHECKING:
    import keras

    from mobilenet_embed.config import Config, DataConfig

REPORT_NAME = "export_report.json"
#: parity target of each format: (statistic of the per-image cosine similarity, lowest value)
TARGETS = {
    "saved_model": ("min", 0.9999),
    "tflite_float32": ("min", 0.9999),
    "tflite_float16": ("min", 0.999),
    "tflite_int8": ("mean", 0.98),
}


# --------------------------------------------------------------------------- measuring


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


def size_on_disk(path: str) -> int:
    """Bytes of a file, or of every file under a directory."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, f))
                   for root, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


# --------------------------------------------------------------------------- images


def load_images(data_cfg: "DataConfig", paths: Sequence[str], batch_size: int = 64,
                check: bool = True) -> np.ndarray:
    """Preprocessed float32 images [N, S, S, 3] of `paths` (as training preprocesses them)."""
    from mobilenet_embed.data import images_dataset

    size = data_cfg.image_size
    if not len(paths):
        return np.zeros((0, size, size, 3), np.float32)
    arrays = list(images_dataset(data_cfg, list(paths), batch_size, check=check).as_numpy_iterator())
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

    def input_notes(self) -> list[str]:
        """How a device program quantises its input, one line per int8 format."""
        return [f"{row.format} input: int8 = round(x / {row.input['scale']:.8g} + "
                f"{row.input['zero_point']}) of the preprocessed image x in [-1, 1]"
                for row in self.formats
                if row.format != "saved_model" and row.input.get("scale") is not None]

    def parity_warnings(self) -> list[str]:
        """One line per format that misses its parity target: ``Warning: ...`` when it was kept
        anyway (``allow_degraded``), ``Not written: ...`` when it was left out. Not ``Error:``:
        the export ran as asked and its result missed a target (`mbembed export` exits 1), which
        is no input error (exit 2)."""
        lines = []
        for row in self.formats:
            if row.passed:
                continue
            value = row.cosine_min if row.target["statistic"] == "min" else row.cosine_mean
            miss = (f"{row.format} misses its parity target: cosine {row.target['statistic']} "
                    f"{value:.6f} < {row.target['value']:g}")
            lines.append(f"Warning: {miss}; kept anyway (--allow-degraded)" if row.kept else
                         f"Not written: {miss} (--allow-degraded keeps it)")
        return lines

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
        if self.pairs and self.pairs.get("skipped_pairs"):
            from mobilenet_embed.pairs import skipped_pairs_text

            lines.append(f"accuracy: {self.pairs['n_pairs']} pairs of {self.pairs['file']}; skipped "
                         f"{skipped_pairs_text(self.pairs['skipped_pairs'], self.pairs['root'])}")
        return "\n".join(lines)


#: keys of `verification_metrics` copied into the report
VERIFICATION_KEYS = ("accuracy", "accuracy_std", "threshold", "val", "val_std", "far", "far_target",
                     "auc", "eer", "n_pairs")


def verify_pairs(embedders: dict[str, Embedder], cfg: "Config", pairs_file: str,
                  root: Optional[str], log: Callable[[str], None] = lambda line: None
                  ) -> tuple[dict, dict[str, dict]]:
    """Verification metrics of every embedder on a pairs file, through
    `mobilenet_embed.verification.evaluate_pairs` (the code path of `mbembed eval`); pairs naming
    an unreadable image are skipped, listed in the returned info (``skipped_pairs``). The folds
    used are those `mbembed eval` uses (`evaluate.pairs_folds_for`: the config's
    ``eval.pairs_folds`` only for its own ``eval.pairs`` file or when set with ``--set``)."""
    from mobilenet_embed.evaluate import pairs_folds_for
    from mobilenet_embed.verification import evaluate_pairs
    from mobilenet_embed.pairs import drop_unreadable_pairs, read_pairs

    root = root or cfg.eval.data or cfg.data.path
    if not root:
        raise UserError(f"--pairs {pairs_file}: the image root is unknown; set eval.data "
                        "(or data.path) or pass --pairs-root")
    folds = pairs_folds_for(cfg, pairs_file, log)
    pairs, skipped = drop_unreadable_pairs(read_pairs(pairs_file, root, folds=folds), root,
                                           pairs_file, cache_dir=cfg.data.check_cache)
    if not pairs:
        raise UserError(f"{pairs_file}: no pairs" + (f" with readable images ({len(skipped)} skipped)"
                                                     if skipped else ""))
    data_cfg = dataclasses.replace(cfg.data, augment=False)
    results = {}
    for name, embedder in embedders.items():
        metrics = evaluate_pairs(embedder, data_cfg, pairs, batch_size=cfg.eval.batch_size,
                                 flip=cfg.eval.flip, n_folds=cfg.eval.folds,
                                 far_target=cfg.eval.far_target, distance=cfg.eval.distance)
        results[name] = {k: metrics[k] for k in VERIFICATION_KEYS}
    info = {"file": str(pairs_file), "root": str(root), "pairs_folds": folds, "n_pairs": len(pairs),
            "skipped_pairs": skipped,
            "distance": cfg.eval.distance, "flip": cfg.eval.flip, "folds": cfg.eval.folds}
    return info, results


def raw_signature_check(saved: SavedModelEmbedder, keras_embedder: KerasEmbedder,
                         crop_fraction: float, seed: int) -> float:
    """Min cosine of the raw-uint8 signature vs `preprocess_images` + Keras, on two odd sizes."""
    from mobilenet_embed.data import preprocess_images

    rng = np.random.default_rng(seed)
    size = saved.image_size
    worst = 1.0
    for h, w in ((size + 7, size + 13), (2 * size, size + 1)):
        images = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        reference = keras_embedder.embed(np.asarray(preprocess_images(images, size, crop_fraction)))
        worst = min(worst, float(cosine_similarities(reference, saved.embed_raw(images)).min()))
    return worst


# --------------------------------------------------------------------------- rows


def reference_row(model: "keras.Model", keras_embedder: KerasEmbedder, sample: np.ndarray,
                  latency_runs: int) -> FormatResult:
    """The Keras model's row: float32 size from the parameter count, its latency."""
    size = keras_embedder.image_size
    row = FormatResult("keras", None, int(sum(int(np.prod(w.shape)) * 4 for w in model.weights)),
                       kept=False, input={"dtype": "float32", "shape": [-1, size, size, 3]},
                       checks={"size": "float32 weights: parameters x 4 bytes"})
    row.latency_ms["tf_default"] = measure_latency(lambda: keras_embedder.embed(sample), latency_runs)
    return row


def _saved_model_contract(size: int, crop: float) -> dict:
    return {"signatures": {
        RAW_SIGNATURE: {"dtype": "uint8", "shape": [-1, -1, -1, 3],
                        "values": f"raw RGB images (cropped to {crop:g}, resized to {size})"},
        PREPROCESSED_SIGNATURE: {"dtype": "float32", "shape": [-1, size, size, 3],
                                 "values": "preprocessed image in [-1, 1]"}},
        "output": OUTPUT_KEY}


def measure_format(fmt: str, path: str, keras_embedder: KerasEmbedder, reference: np.ndarray,
                   parity: np.ndarray, crop: float, seed: int, latency_runs: int
                   ) -> tuple[FormatResult, Embedder]:
    """The report row of format `fmt` written at `path` (parity against `reference`, the Keras
    embeddings of `parity`; latency on one image) and the embedder that ran it."""
    statistic, value = TARGETS[fmt]
    sample = parity[:1]
    row = FormatResult(fmt, None, size_on_disk(path), target={"statistic": statistic, "value": value})
    if fmt == "saved_model":
        embedder: Embedder = SavedModelEmbedder(path)
        row.input = _saved_model_contract(embedder.image_size, crop)
        row.checks["raw_signature_cosine_min"] = raw_signature_check(embedder, keras_embedder, crop, seed)
        row.latency_ms["tf_default"] = measure_latency(lambda: embedder.embed(sample), latency_runs)
    else:
        embedder = TFLiteEmbedder(path)
        row.input = embedder.input_contract()
        for threads in (1, 2):
            timed = TFLiteEmbedder(path, num_threads=threads)
            row.latency_ms[f"threads_{threads}"] = measure_latency(lambda e=timed: e.embed(sample),
                                                                   latency_runs)
    cos = cosine_similarities(reference, embedder.embed(parity))
    row.cosine_mean, row.cosine_min = float(cos.mean()), float(cos.min())
    row.passed = (row.cosine_min if statistic == "min" else row.cosine_mean) >= value
    if "raw_signature_cosine_min" in row.checks:
        row.passed = row.passed and row.checks["raw_signature_cosine_min"] >= value
    return row, embedder
