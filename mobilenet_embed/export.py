"""`mbembed export`: a checkpoint's model in the export formats, checked against the Keras model.

`export_model` loads a checkpoint (`mobilenet_embed.checkpoints.load_checkpoint_model`), writes
the formats of ``export.formats`` (`mobilenet_embed.export_formats`: SavedModel, TFLite float32 /
float16 / int8) under an output directory, measures each against the Keras model and writes
``export_report.json`` (`mobilenet_embed.export_report`). A format below its parity target is not
kept unless ``allow_degraded``.

An export folder is one export: everything (formats and report) is built in a scratch folder
beside it, ``.tmp-export-<name>-<pid>/``, and the finished folder then replaces the old one whole
(`atomic.replace_dir`), so a kill at any point leaves the earlier export or the new one, never a
mix, and an earlier export's files of other formats do not survive a ``force`` export. Nothing is
replaced without ``force``; a folder holding anything other than an export is refused
(`check_export_folder`). The converters' native output is captured (`mobilenet_embed.quiet`).

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
from mobilenet_embed.out_folder import check_out_folder
from mobilenet_embed.preprocessing_metadata import build_metadata
from mobilenet_embed.quiet import quiet_native
from mobilenet_embed.records import versions
from mobilenet_embed.runlock import LOCK_NAME, pid_running

if TYPE_CHECKING:
    import keras

    from mobilenet_embed.config import Config

SCRATCH_PREFIX = ".tmp-export-"
#: what an export folder holds; anything else in it makes it no export folder
EXPORT_ENTRIES = (*FILENAMES.values(), REPORT_NAME)


def _scratch_name(out_dir: str, pid: int) -> str:
    return os.path.join(os.path.dirname(out_dir), f"{SCRATCH_PREFIX}{os.path.basename(out_dir)}-{pid}")


def check_export_folder(out_dir: str, force: bool) -> str:
    """The folder an export of `out_dir` replaces (symbolic links followed), after the checks.

    An export folder is one export, replaced whole: `out_dir` must be missing, empty or hold
    only what an export writes (`EXPORT_ENTRIES`, a lock, an old scratch folder); an earlier
    export needs `force`. A file, a folder holding other files, or the current folder (or one
    above it) is a `UserError`.
    """
    check_out_folder(out_dir)
    target = os.path.realpath(out_dir)
    cwd = os.path.realpath(os.getcwd())
    if target == cwd or cwd.startswith(target.rstrip(os.sep) + os.sep):
        raise UserError(f"--out {out_dir}: is the current folder or holds it; an export replaces its "
                        "folder whole: give a sub-folder such as exported/")
    if not os.path.isdir(target):
        return target
    entries = sorted(os.listdir(target))
    scratch = re.compile(re.escape(SCRATCH_PREFIX) + r"\d+")
    foreign = [e for e in entries if e not in EXPORT_ENTRIES and e != LOCK_NAME and not scratch.fullmatch(e)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"--out {out_dir}: holds files that are not part of an export ({shown}); an "
                        "export replaces its folder whole: give a new or empty folder")
    existing = [e for e in EXPORT_ENTRIES if e in entries]
    if existing and not force:
        raise UserError(f"{out_dir}: would overwrite {', '.join(existing)}; pass --force to replace "
                        "that export (the folder is replaced whole)")
    return target


@contextlib.contextmanager
def _scratch_dir(target: str) -> Iterator[str]:
    """``.tmp-export-<name>-<pid>/`` beside `target`, removed afterwards; those of dead processes
    go first. A folder that cannot be made (read-only, full, forbidden) is a `UserError` from
    `atomic.writing`: ``<folder>: cannot write: <reason>``."""
    parent, name = os.path.dirname(target), os.path.basename(target)
    with atomic.writing(parent):
        os.makedirs(parent, exist_ok=True)
    pattern = re.compile(re.escape(f"{SCRATCH_PREFIX}{name}-") + r"(\d+)")
    for entry in os.listdir(parent):
        match = pattern.fullmatch(entry)
        if match and not pid_running(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    tmp = _scratch_name(target, os.getpid())
    atomic.remove(tmp)
    with atomic.writing(tmp):
        os.makedirs(tmp)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_formats(model: "keras.Model", work: str, formats: Sequence[str], size: int, crop: float,
                   calibration: np.ndarray, log: Callable[[str], None],
                   metadata: Optional[dict] = None) -> dict[str, str]:
    """Write the SavedModel (always: TFLite is converted from it) and each TFLite format into
    `work`; the converters' native chatter is captured (`quiet_native`), shown only on failure.
    `metadata` (the preprocessing record) goes into the SavedModel and from it into every format."""
    saved_dir = os.path.join(work, FILENAMES["saved_model"])
    log("writing SavedModel")
    with atomic.writing(saved_dir), quiet_native():  # a full disk: one line naming the folder
        export_saved_model(model, saved_dir, size, crop, metadata)
    built = {"saved_model": saved_dir}
    for fmt in formats:
        if fmt in TFLITE_KINDS:
            log(f"converting {fmt}")
            with quiet_native():
                built[fmt] = export_tflite(saved_dir, os.path.join(work, FILENAMES[fmt]), TFLITE_KINDS[fmt],
                                           calibration if fmt == "tflite_int8" else None)
    return built


def _keep(rows: Sequence[FormatResult], built: dict[str, str], staged: str, out_dir: str,
          allow_degraded: bool) -> None:
    """Move each passing (or, with `allow_degraded`, every) format into the staged export folder;
    its row gets its final path under `out_dir`."""
    for row in rows:
        row.kept = row.passed or allow_degraded
        if row.kept:
            os.replace(built[row.format], os.path.join(staged, FILENAMES[row.format]))
            row.path = os.path.join(out_dir, FILENAMES[row.format])


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
    verification accuracy. `out_dir` is replaced whole by the new export; an existing export
    there is an error unless `force` (`check_export_folder`). `log` receives progress lines.
    """
    formats = check_formats(cfg.export.formats if formats is None else formats)
    out_dir = str(out_dir)
    target = check_export_folder(out_dir, force)
    report_path = os.path.join(out_dir, REPORT_NAME)
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

    with _scratch_dir(target) as scratch:
        work, staged = os.path.join(scratch, "work"), os.path.join(scratch, "export")
        os.makedirs(work)
        os.makedirs(staged)
        metadata = build_metadata(cfg.data, keras_embedder.embedding_size, cfg.eval.distance)
        built = _build_formats(model, work, formats, size, crop, calibration, log, metadata)
        with quiet_native():
            ref_row = reference_row(model, keras_embedder, parity[:1], latency_runs)
        rows: list[FormatResult] = []
        embedders: dict[str, Embedder] = {"keras": keras_embedder}
        for fmt in formats:
            with quiet_native():  # the TFLite interpreter announces its XNNPACK delegate on fd 2
                row, embedders[fmt] = measure_format(fmt, built[fmt], keras_embedder, reference, parity,
                                                     crop, cfg.seed, latency_runs)
            rows.append(row)
            log(f"{fmt}: cosine mean {row.cosine_mean:.6f}, min {row.cosine_min:.6f} "
                f"({'ok' if row.passed else 'below target'})")
        pairs_info = None
        if pairs is not None:
            log(f"verification on {pairs}")
            with quiet_native():
                pairs_info, results = verify_pairs(embedders, cfg, pairs, pairs_root, log)
            for row in [ref_row] + rows:
                row.verification = results[row.format]
        _keep(rows, built, staged, out_dir, allow_degraded)
        report = ExportReport(
            out_dir=out_dir, checkpoint=str(checkpoint), checkpoint_used=resolved.path,
            image_size=size, embedding_size=keras_embedder.embedding_size, crop_fraction=crop,
            calibration_images=len(calibration), parity_images=len(parity), reference=ref_row,
            formats=rows, pairs=pairs_info, report_path=report_path, versions=versions())
        atomic.write_text(os.path.join(staged, REPORT_NAME), json.dumps(report.to_dict(), indent=1) + "\n")
        # the one step that changes out_dir: the finished export replaces the earlier one whole
        atomic.replace_dir(staged, target)
    return report
