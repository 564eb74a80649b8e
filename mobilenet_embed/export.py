"""`mbembed export`: a checkpoint's model in the export formats, checked against the Keras model.

`export_model` loads a checkpoint (`mobilenet_embed.checkpoints.load_checkpoint_model`), writes
the formats of ``export.formats`` (`mobilenet_embed.export_formats`: SavedModel, TFLite float32 /
float16 / int8) under an output directory, measures each against the Keras model and writes
``export_report.json`` (`mobilenet_embed.export_report`). A format below its parity target is not
kept unless ``allow_degraded``.

Nothing is overwritten without ``force``; everything is built in ``<out>/.tmp-export-<pid>/``
and renamed into place, so a crash never leaves a half-written model under a final name.

Embeddings of a whole folder (``mbembed export embeddings``) are `mobilenet_embed.export_embeddings`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

import numpy as np

from mobilenet_embed import atomic
from mobilenet_embed.checkpoints import config_for_checkpoint, load_checkpoint_model, resolve_checkpoint
from mobilenet_embed.embedders import Embedder, KerasEmbedder
from mobilenet_embed.errors import UserError
from mobilenet_embed.export_formats import (FILENAMES, TFLITE_KINDS, check_formats, export_saved_model,
                                            export_tflite)
from mobilenet_embed.export_report import (REPORT_NAME, ExportReport, FormatResult, measure_format,
                                           reference_row, sample_images, verify_pairs)
from mobilenet_embed.preprocessing_metadata import build_metadata
from mobilenet_embed.records import versions
from mobilenet_embed.runlock import pid_running

if TYPE_CHECKING:
    import keras

    from mobilenet_embed.config import Config

SCRATCH_PREFIX = ".tmp-export-"


@contextlib.contextmanager
def _scratch_dir(out_dir: str) -> Iterator[str]:
    """``<out_dir>/.tmp-export-<pid>/``, removed afterwards; those of dead processes go first."""
    os.makedirs(out_dir, exist_ok=True)
    for entry in os.listdir(out_dir):
        match = re.fullmatch(re.escape(SCRATCH_PREFIX) + r"(\d+)", entry)
        if match and not pid_running(int(match.group(1))):
            shutil.rmtree(os.path.join(out_dir, entry), ignore_errors=True)
    tmp = os.path.join(out_dir, f"{SCRATCH_PREFIX}{os.getpid()}")
    atomic.remove(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _output_paths(out_dir: str, formats: Sequence[str], force: bool) -> tuple[dict[str, str], str]:
    """Final path of each format and of the report; existing ones need `force`."""
    targets = {f: os.path.join(out_dir, FILENAMES[f]) for f in formats}
    report_path = os.path.join(out_dir, REPORT_NAME)
    existing = [p for p in list(targets.values()) + [report_path] if os.path.lexists(p)]
    if existing and not force:
        raise UserError(f"{out_dir}: would overwrite {', '.join(os.path.basename(p) for p in existing)}; "
                        "pass --force to replace")
    return targets, report_path


def _build_formats(model: "keras.Model", tmp: str, formats: Sequence[str], size: int, crop: float,
                   calibration: np.ndarray, log: Callable[[str], None],
                   metadata: Optional[dict] = None) -> dict[str, str]:
    """Write the SavedModel (always: TFLite is converted from it) and each TFLite format into `tmp`."""
    saved_dir = os.path.join(tmp, FILENAMES["saved_model"])
    log("writing SavedModel")
    export_saved_model(model, saved_dir, size, crop, metadata)  # the record goes into every format
    built = {"saved_model": saved_dir}
    for fmt in formats:
        if fmt in TFLITE_KINDS:
            log(f"converting {fmt}")
            built[fmt] = export_tflite(saved_dir, os.path.join(tmp, FILENAMES[fmt]), TFLITE_KINDS[fmt],
                                       calibration if fmt == "tflite_int8" else None)
    return built


def _keep(rows: Sequence[FormatResult], built: dict[str, str], targets: dict[str, str],
          allow_degraded: bool) -> None:
    """Move each passing (or, with `allow_degraded`, every) format to its final name."""
    for row in rows:
        row.kept = row.passed or allow_degraded
        if row.kept:
            atomic.replace_dir(built[row.format], targets[row.format])
            row.path = targets[row.format]


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
    formats = check_formats(cfg.export.formats if formats is None else formats)
    out_dir = str(out_dir)
    targets, report_path = _output_paths(out_dir, formats, force)
    if pairs is not None and not os.path.isfile(pairs):
        raise UserError(f"--pairs {pairs}: file not found")

    resolved = resolve_checkpoint(checkpoint)
    notes: list = []  # --set keys applied over the run's config (`config_for_checkpoint`)
    config_for_checkpoint(cfg, resolved.path if resolved.which == "file" else checkpoint, notes)
    model, cfg = load_checkpoint_model(checkpoint, cfg)
    for line in notes:
        log(line)
    size, crop = cfg.data.image_size, cfg.data.crop_fraction
    log(f"checkpoint: {resolved.path} ({resolved.which}); input {size}x{size}, "
        f"crop_fraction {crop:g}")
    n_cal = cfg.export.representative_samples if "tflite_int8" in formats else 0
    log(f"reading {n_cal} calibration + {cfg.export.parity_samples} parity images "
        f"({cfg.data.source} source)")
    calibration, parity = sample_images(cfg, n_cal, cfg.export.parity_samples)
    keras_embedder = KerasEmbedder(model)
    reference = keras_embedder.embed(parity)

    with _scratch_dir(out_dir) as tmp:
        metadata = build_metadata(cfg.data, keras_embedder.embedding_size, cfg.eval.distance)
        built = _build_formats(model, tmp, formats, size, crop, calibration, log, metadata)
        ref_row = reference_row(model, keras_embedder, parity[:1], latency_runs)
        rows: list[FormatResult] = []
        embedders: dict[str, Embedder] = {"keras": keras_embedder}
        for fmt in formats:
            row, embedders[fmt] = measure_format(fmt, built[fmt], keras_embedder, reference, parity,
                                                 crop, cfg.seed, latency_runs)
            rows.append(row)
            log(f"{fmt}: cosine mean {row.cosine_mean:.6f}, min {row.cosine_min:.6f} "
                f"({'ok' if row.passed else 'below target'})")
        pairs_info = None
        if pairs is not None:
            log(f"verification on {pairs}")
            pairs_info, results = verify_pairs(embedders, cfg, pairs, pairs_root)
            for row in [ref_row] + rows:
                row.verification = results[row.format]
        _keep(rows, built, targets, allow_degraded)
        report = ExportReport(
            out_dir=out_dir, checkpoint=str(checkpoint), checkpoint_used=resolved.path,
            image_size=size, embedding_size=keras_embedder.embedding_size, crop_fraction=crop,
            calibration_images=len(calibration), parity_images=len(parity), reference=ref_row,
            formats=rows, pairs=pairs_info, report_path=report_path, versions=versions())
        atomic.write_text(report_path, json.dumps(report.to_dict(), indent=1) + "\n")
    return report
