"""`align_folder`: an identity folder of raw photos -> the same layout of aligned crops.

For every image of ``DATA/<identity>/...`` (the layout `mbembed data check` reads), in batches:
decode, detect, keep the face the dataset means, align it (`alignment`), write
``OUT/<identity>/...`` under the same relative name. JPEG and PNG files keep their name and
format (JPEG at quality 95); other formats are written as PNG with ``.png`` appended to the name
(``x.bmp`` -> ``x.bmp.png``), so no two outputs can collide.

Bad files get the `mbembed data check` treatment: every file is decode-checked first
(`mobilenet_embed.data.check_files`, cached by `data.check_cache`), unreadable ones are listed
with their reason and not written.

**Resumable.** Each output is written to a hidden temporary file and renamed into place, then
recorded in ``OUT/align_journal.jsonl`` (one JSON line per image: file, status, faces, the
source's size and mtime; after each batch one line with the run's elapsed time). A run started
again reads the journal and skips every file recorded with its current size and mtime, so a
killed run continues where it stopped, and a source file replaced since is aligned again; a
file written but not yet journaled is simply done again, and temporary files a kill left
behind are deleted. The first line records the settings; resuming with
other settings is refused. ``OUT/align_report.json`` is recomputed from the whole journal at
the end of every run (counts over all runs, time summed over runs).
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from typing import Callable, Optional

from mobilenet_embed.align.alignment import ALIGNED, CENTER, SKIPPED, AlignSpec, iter_aligned
from mobilenet_embed.align.detector import FaceDetector
from mobilenet_embed import atomic
from mobilenet_embed.errors import UserError

JOURNAL = "align_journal.jsonl"
REPORT = "align_report.json"
JOURNAL_VERSION = 1
KEEP_EXTENSIONS = (".jpg", ".jpeg", ".png")
JPEG_QUALITY = 95


def output_name(relpath: str) -> str:
    """Relative output path of the input `relpath` (see the module doc)."""
    return relpath if os.path.splitext(relpath)[1].lower() in KEEP_EXTENSIONS else relpath + ".png"


def encode_image(image, name: str) -> bytes:
    """Bytes of uint8 `image` as JPEG (``.jpg`` / ``.jpeg``, quality 95) or PNG (anything else)."""
    from PIL import Image

    buf = io.BytesIO()
    if os.path.splitext(name)[1].lower() in (".jpg", ".jpeg"):
        Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def remove_stale_temporaries(out_dir: str) -> int:
    """Delete the hidden temporary files (`atomic.TMP_PREFIX`...) a killed run left in `out_dir`."""
    removed = 0
    for folder, _, names in os.walk(out_dir):
        for name in names:
            if name.startswith(atomic.TMP_PREFIX):
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed


def read_journal(path: str) -> tuple[Optional[dict], dict, dict]:
    """(settings, {file: entry}, {run id: elapsed seconds}) of a journal; an unparsable line (the
    tail of a killed write) is ignored."""
    settings, entries, runs = None, {}, {}
    if not os.path.exists(path):
        return settings, entries, runs
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if not isinstance(item, dict):
                continue
            if "settings" in item:
                settings = settings or item["settings"]
            elif "file" in item:
                entries[item["file"]] = item
            elif "run" in item:
                runs[item["run"]] = max(float(item.get("elapsed", 0.0)), runs.get(item["run"], 0.0))
    return settings, entries, runs


def build_report(data_dir: str, out_dir: str, settings: dict, found: int, entries: dict, bad: list,
                 runs: dict, this_run: dict) -> dict:
    """The report of `align_folder` from the journal entries of all runs and this run's check."""
    by_status = {ALIGNED: [], CENTER: [], SKIPPED: []}
    for rel, e in sorted(entries.items()):
        by_status.setdefault(e["status"], []).append(rel)
    no_face = sorted(by_status[CENTER] + by_status[SKIPPED])
    several = sorted(rel for rel, e in entries.items() if e.get("faces", 0) > 1)
    seconds = sum(runs.values())
    done = len(entries)
    return {
        "data": os.path.abspath(data_dir), "out": os.path.abspath(out_dir),
        "settings": settings,
        "images": found,
        "aligned": len(by_status[ALIGNED]),
        "no_face": len(no_face),
        "no_face_center_cropped": len(by_status[CENTER]),
        "no_face_skipped": len(by_status[SKIPPED]),
        "several_faces": len(several),
        "unreadable": len(bad),
        "written": len(by_status[ALIGNED]) + len(by_status[CENTER]),
        "pending": max(0, found - len(bad) - done),
        "seconds": round(seconds, 3),
        "images_per_second": round(done / seconds, 3) if seconds > 0 else None,
        "runs": len(runs),
        "this_run": this_run,
        "no_face_files": no_face,
        "several_faces_files": several,
        "unreadable_files": [[p, r] for p, r in bad],
    }


def _settings(spec: AlignSpec, detector_name: str, detector_settings: dict) -> dict:
    return dict(spec.as_dict(), detector=detector_name, **detector_settings, version=JOURNAL_VERSION)


def _sources(data_dir: str, out_dir: str, check_cache: Optional[str]):
    """(identity files, stats, ignored count, every image path, decode check, bad [(path, reason)],
    readable paths) of `data_dir`, after refusing a missing one or an `out_dir` inside it."""
    from mobilenet_embed.data import decode
    from mobilenet_embed.data.index import scan_folder

    if not os.path.isdir(data_dir):
        raise UserError(f"--data: folder not found: {data_dir}" if not os.path.exists(data_dir)
                        else f"--data: not a folder: {data_dir}")
    src, dst = os.path.realpath(data_dir), os.path.realpath(out_dir)
    if dst == src or dst.startswith(src + os.sep):
        raise UserError(f"--out {out_dir}: must not be --data or inside it ({data_dir})")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out: not a folder: {out_dir}")
    files, stats, ignored = scan_folder(data_dir)
    paths = [p for name in files for p in files[name]]
    if not paths:
        raise UserError(f"--data: no images in {data_dir} (expected one sub-folder of images per identity)")
    check = decode.check_files(paths, check_cache, root=data_dir, stats=stats)
    bad = [(p, check.results[p].reason) for p in paths if not check.results[p].ok]
    good = [p for p in paths if check.results[p].ok]
    return files, stats, ignored, paths, check, bad, good


def _start_journal(journal, settings: Optional[dict], wanted: dict) -> None:
    """Put the journal on a fresh line (a killed run may have cut one) and record the settings once."""
    if journal.tell() > 0:
        journal.seek(journal.tell() - 1)
        if journal.read(1) != "\n":
            journal.write("\n")
    if settings is None:
        journal.write(json.dumps({"settings": wanted}) + "\n")


def _align_into(todo: list, pillow: list, rel: dict, stat: dict, out_dir: str, spec: AlignSpec, detector,
                batch_size: int, journal, entries: dict, counts: dict, run_id: str, t_run: float, bar) -> None:
    """Align `todo` batch by batch: write each crop atomically, then journal the batch's entries."""
    for batch_paths, results in iter_aligned(todo, spec, detector, batch_size, pillow):
        lines = []
        for path, result in zip(batch_paths, results):
            out_rel = output_name(rel[path])
            if result.image is not None:
                target = os.path.join(out_dir, out_rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                atomic.write_bytes(target, encode_image(result.image, out_rel))
            entry = {"file": rel[path], "status": result.status, "faces": result.faces,
                     "out": out_rel if result.image is not None else None, "stat": stat[path]}
            entries[rel[path]] = entry
            counts[result.status] += 1
            lines.append(json.dumps(entry))
        lines.append(json.dumps({"run": run_id, "elapsed": round(time.perf_counter() - t_run, 3)}))
        journal.write("\n".join(lines) + "\n")
        journal.flush()
        bar.update(len(batch_paths))


def align_folder(data_dir: str, out_dir: str, spec: AlignSpec, detector: Optional[FaceDetector] = None,
                 batch_size: int = 16, check_cache: Optional[str] = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict:
    """Align every image of the identity folder `data_dir` into `out_dir` (see the module doc).

    Returns the report (also written to ``out_dir/align_report.json``). UserError for a missing
    or empty `data_dir`, an `out_dir` inside it (or equal to it), or a journal of other settings.
    """
    from tqdm import tqdm

    from mobilenet_embed.align.detector import make_detector
    from mobilenet_embed.data import decode

    t0 = time.perf_counter()
    data_dir, out_dir = str(data_dir), str(out_dir)
    files, stats, ignored, paths, check, bad, good = _sources(data_dir, out_dir, check_cache)

    detector = detector if detector is not None else make_detector()
    detector_name = getattr(detector, "name", type(detector).__name__)
    journal_path = os.path.join(out_dir, JOURNAL)
    settings, entries, runs = read_journal(journal_path)
    wanted = _settings(spec, detector_name, dict(getattr(detector, "settings", {})))
    if settings is not None and settings != wanted:
        raise UserError(f"--out {out_dir}: aligned before with other settings ({json.dumps(settings)}); "
                        f"use another --out, or the same settings to continue")
    rel = {p: os.path.relpath(p, data_dir) for p in good}
    stat = {p: list(stats.get(p, (0, 0))) for p in good}
    todo = [p for p in good if entries.get(rel[p], {}).get("stat") != stat[p]]  # new, or changed since
    resumed = len(good) - len(todo)
    log(f"align: {len(paths):,} images of {len(files):,} identities in {data_dir}"
        + (f" ({ignored:,} other files ignored)" if ignored else ""))
    log(f"unreadable: {len(bad):,}" + "".join(f"\n  {p}: {r}" for p, r in bad[:20])
        + (f"\n  ... and {len(bad) - 20:,} more (all in {REPORT})" if len(bad) > 20 else ""))
    if resumed:
        log(f"resuming: {resumed:,} images already done in {out_dir}, {len(todo):,} to go")

    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temporaries(out_dir)
    run_id = uuid.uuid4().hex[:12]
    counts = {ALIGNED: 0, CENTER: 0, SKIPPED: 0}
    t_run = time.perf_counter()
    pillow = [check.results[p].route == decode.ROUTE_PILLOW for p in todo]
    bar = tqdm(total=len(todo), unit="img", desc="align", disable=None if progress else True, dynamic_ncols=True)
    interrupted = False
    try:
        with open(journal_path, "a+", encoding="utf-8") as journal:
            _start_journal(journal, settings, wanted)
            _align_into(todo, pillow, rel, stat, out_dir, spec, detector, batch_size, journal, entries, counts,
                        run_id, t_run, bar)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    runs[run_id] = time.perf_counter() - t_run
    this_run = {"processed": sum(counts.values()), "resumed": resumed, "aligned": counts[ALIGNED],
                "center_cropped": counts[CENTER], "skipped": counts[SKIPPED],
                "seconds": round(time.perf_counter() - t0, 3), "interrupted": interrupted}
    current = {rel[p] for p in good}  # files removed from --data (or unreadable now) no longer count
    report = build_report(data_dir, out_dir, wanted, len(paths),
                          {k: e for k, e in entries.items() if k in current}, bad, runs, this_run)
    atomic.write_bytes(os.path.join(out_dir, REPORT), json.dumps(report, indent=1).encode("utf-8"))
    if interrupted:
        raise KeyboardInterrupt
    return report


def alignment_of_folder(folder: str) -> Optional[dict]:
    """The settings `mbembed align` recorded for the crops in `folder` (from its report, else its
    journal), or None when `folder` was not made by `mbembed align`."""
    try:
        with open(os.path.join(folder, REPORT), encoding="utf-8") as fh:
            return dict(json.load(fh)["settings"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    settings, _, _ = read_journal(os.path.join(folder, JOURNAL))
    return settings


def check_config_alignment(data_cfg) -> list[str]:
    """Make the config and a folder made by `mbembed align` agree (train calls this before reading).

    UserError when `data.path` holds crops of another template, size or face choice than
    `data.align_*` say; a note (returned) when the config does not say its data are aligned
    although they are, or says so for a folder `mbembed align` did not make.
    """
    if getattr(data_cfg, "source", None) != "folder" or not data_cfg.path:
        return []
    made = alignment_of_folder(data_cfg.path)
    if made is None:
        if data_cfg.align_template:
            return [f"note: data.align_template is {data_cfg.align_template} but {data_cfg.path} has no "
                    f"{REPORT}: it is taken on trust that these crops were aligned that way"]
        return []
    if not data_cfg.align_template:
        return [f"note: {data_cfg.path} holds crops aligned by mbembed align ({made.get('template')}, "
                f"{made.get('size')} px) but data.align_template is null; set data.align_template="
                f"{made.get('template')} data.align_size={made.get('size')} so that eval and export can "
                f"align raw photos the same way"]
    for key in ("template", "size", "select"):
        ours = getattr(data_cfg, f"align_{key}")
        if made.get(key) != ours:
            raise UserError(f"data.align_{key}: {ours!r}, but {data_cfg.path} was aligned with {key} "
                            f"{made.get(key)!r} ({REPORT}); make them agree")
    return []
