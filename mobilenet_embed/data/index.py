"""The image index (paths, labels, identity names) of a data source, and the data check.

`build_index(data_cfg)` = `inspect_data` (scan, decode check, identity filters, report) followed by
`validate_report` (the errors that stop training). `mbembed data check` prints the report between
the two, so the list of bad files is shown even when there are too many of them.

Folder layout: ``ROOT/<identity>/.../<file>``: every file with an image extension
(`mobilenet_embed.image_files.IMAGE_EXTENSIONS`, any case) anywhere below an identity folder is an image of that
identity; hidden files and folders (``.name``) are skipped; other files, and files directly in
ROOT, are counted as ignored. Identities are sorted by name; label i is ``identities[i]``.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from mobilenet_embed.data import decode, synthetic, tfrecord
from mobilenet_embed.errors import UserError
from mobilenet_embed.image_files import display_path, scan_folder


@dataclass
class ImageIndex:
    """Images of a data source. ``labels[i]`` (0..num_identities-1) names ``identities[label]``.

    `paths`: file paths (folder); ``synthetic:<identity>:<n>`` keys (synthetic);
    ``tfrecord:<shard>:<record>`` keys (tfrecord: shard index in the manifest, record number).
    `pillow`: per image, True when it must be decoded by Pillow (None: decide by extension).
    Images are grouped by identity, in label order.
    """

    paths: list
    labels: np.ndarray
    identities: list
    pillow: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int32)
        if self.pillow is not None:
            self.pillow = np.asarray(self.pillow, dtype=bool)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_images(self) -> int:
        return len(self.paths)

    @property
    def num_identities(self) -> int:
        return len(self.identities)

    def counts(self) -> np.ndarray:
        """Images per label, int64 ``[num_identities]``."""
        return np.bincount(self.labels, minlength=len(self.identities)).astype(np.int64)

    def identity_to_paths(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {name: [] for name in self.identities}
        for path, label in zip(self.paths, self.labels.tolist()):
            out[self.identities[label]].append(path)
        return out

    def pillow_flags(self) -> np.ndarray:
        """Per image, True where Pillow decodes it (from the check, else from the extension)."""
        if self.pillow is not None:
            return self.pillow
        return np.array([not synthetic.is_synthetic_key(p) and not str(p).startswith("tfrecord:")
                         and decode.route_by_extension(p) == decode.ROUTE_PILLOW for p in self.paths], bool)

    def subset(self, identity_names: Sequence[str]) -> "ImageIndex":
        """The images of `identity_names` (kept in their given order), relabelled 0..n-1."""
        names = list(dict.fromkeys(identity_names))
        position = {name: i for i, name in enumerate(self.identities)}
        missing = [n for n in names if n not in position]
        if missing:
            raise KeyError(f"identities not in the index: {missing[:5]}")
        new_label = np.full(len(self.identities), -1, np.int64)
        for i, name in enumerate(names):
            new_label[position[name]] = i
        mapped = new_label[self.labels] if len(self.labels) else np.zeros(0, np.int64)
        keep = np.flatnonzero(mapped >= 0)
        keep = keep[np.argsort(mapped[keep], kind="stable")]
        return ImageIndex([self.paths[i] for i in keep.tolist()], mapped[keep].astype(np.int32), names,
                          None if self.pillow is None else self.pillow[keep])

    def select_images(self, mask: np.ndarray) -> "ImageIndex":
        """The images where `mask` is True; identities left without images are dropped."""
        mask = np.asarray(mask, bool)
        kept_labels = np.unique(self.labels[mask])
        remap = np.full(len(self.identities), -1, np.int64)
        remap[kept_labels] = np.arange(len(kept_labels))
        idx = np.flatnonzero(mask)
        return ImageIndex([self.paths[i] for i in idx.tolist()], remap[self.labels[idx]].astype(np.int32),
                          [self.identities[i] for i in kept_labels.tolist()],
                          None if self.pillow is None else self.pillow[idx])


@dataclass
class DataReport:
    """What `inspect_data` found: counts, bad files (path, reason), filters applied."""

    source: str
    root: str
    identities: int = 0            # identity folders with at least one image file
    images: int = 0                # image files found
    ignored_files: int = 0         # files without an image extension, or directly in the root
    bad_files: list = field(default_factory=list)  # [(path, reason)]
    checked: bool = False
    check_seconds: float = 0.0
    cached_checks: int = 0
    selected_identities: Optional[int] = None  # after identities_file / exclude file
    missing_listed: list = field(default_factory=list)  # listed names not found in the data
    excluded_identities: int = 0
    usable_identities: int = 0     # >= min_images_per_identity readable images
    usable_images: int = 0
    identities_with_two: int = 0   # selected identities with >= 2 readable images
    min_images_per_identity: int = 2
    max_bad_fraction: float = 0.01
    image_sizes: dict = field(default_factory=dict)  # "HxW" -> count, over the usable images
    size_of: dict = field(default_factory=dict, repr=False)  # path -> "HxW" (folder check)
    notes: list = field(default_factory=list)

    @property
    def bad_fraction(self) -> float:
        return len(self.bad_files) / self.images if self.images else 0.0

    def summary_lines(self, max_bad: Optional[int] = None) -> list[str]:
        lines = [f"data: {self.source} {self.root}",
                 f"identities: {self.identities:,}   images: {self.images:,}"
                 + (f"   (other files ignored: {self.ignored_files:,})" if self.ignored_files else "")]
        if self.checked:
            lines.append(f"unreadable images: {len(self.bad_files):,} ({self.bad_fraction:.2%}; limit "
                         f"data.max_bad_fraction {self.max_bad_fraction:.2%})")
            shown = self.bad_files if max_bad is None else self.bad_files[:max_bad]
            for path, reason in shown:
                lines.append(f"  {display_path(path)}: {reason}")
            if len(shown) < len(self.bad_files):
                lines.append(f"  ... and {len(self.bad_files) - len(shown):,} more")
        else:
            lines.append("unreadable images: not checked")
        if self.selected_identities is not None:
            text = f"selected identities: {self.selected_identities:,}"
            if self.excluded_identities:
                text += f" ({self.excluded_identities:,} excluded)"
            if self.missing_listed:
                text += (f"; {len(self.missing_listed):,} listed names not in the data (e.g. "
                         f"{', '.join(self.missing_listed[:3])})")
            lines.append(text)
        lines.append(f"usable identities (>= {self.min_images_per_identity} images): "
                     f"{self.usable_identities:,} with {self.usable_images:,} images")
        if self.image_sizes:
            common = sorted(self.image_sizes.items(), key=lambda kv: -kv[1])
            text = ", ".join(f"{k} ({v:,})" for k, v in common[:3])
            if len(common) > 3:
                text += f", ... ({len(common)} sizes)"
            lines.append(f"image sizes (usable images): {text}")
        if self.checked and self.check_seconds:
            lines.append(f"checked {self.images:,} images in {self.check_seconds:.1f} s "
                         f"({self.cached_checks:,} from the check cache)")
        lines.extend(self.notes)
        return lines


# --------------------------------------------------------------------------- identity lists


def read_identity_list(path: str, folds: Optional[list] = None, key: str = "data.identities_file") -> list[str]:
    """Names from a plain list (one per line) or an LFW ``people.txt`` (folds; 1-based `folds`)."""
    if not os.path.isfile(path):
        raise UserError(f"{key}: file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        lines = [line.rstrip("\n\r") for line in fh]
    stripped = [line.strip() for line in lines]
    folds_layout = _parse_people(stripped)
    if folds_layout is None:
        if folds:
            raise UserError(f"data.identities_folds: needs an LFW people.txt as {key} (a fold count, then "
                            f"per fold a count line and name<TAB>images lines); {path} is a plain list")
        return [s for s in stripped if s and not s.startswith("#")]
    if not folds:
        return [name for fold in folds_layout for name in fold]
    names = []
    for f in folds:
        if isinstance(f, bool) or not isinstance(f, int) or not 1 <= f <= len(folds_layout):
            raise UserError(f"data.identities_folds: expected fold numbers 1..{len(folds_layout)} of {path}, "
                            f"received {folds!r}")
        names.extend(folds_layout[f - 1])
    return names


def _parse_people(lines: list[str]) -> Optional[list[list[str]]]:
    """Folds of an LFW people.txt, or None when `lines` is not in that format."""
    body = [s for s in lines if s]
    if not body or not body[0].isdigit():
        return None
    n_folds, pos, folds = int(body[0]), 1, []
    try:
        for _ in range(n_folds):
            count = int(body[pos])
            pos += 1
            fold = []
            for line in body[pos:pos + count]:
                name, images = line.split("\t") if "\t" in line else line.rsplit(None, 1)
                int(images)
                fold.append(name.strip())
            if len(fold) != count:
                return None
            pos += count
            folds.append(fold)
    except (ValueError, IndexError):
        return None
    return folds if pos == len(body) else None


# --------------------------------------------------------------------------- sources


def _folder_index(data_cfg, check: bool, report: DataReport, full: bool = False) -> ImageIndex:
    root = data_cfg.path
    if not root:
        raise UserError("data.path: required when data.source is 'folder', received None")
    if not os.path.exists(root):
        raise UserError(f"data.path: folder not found: {root}")
    if not os.path.isdir(root):
        raise UserError(f"data.path: not a folder: {root} (data.source is 'folder')")
    skipped: list = []
    files, stats, report.ignored_files = scan_folder(root, skipped)
    if skipped:
        report.notes.append(f"folders skipped by the scan: {len(skipped):,}")
        report.notes.extend(f"  {display_path(p)}: {why}" for p, why in skipped[:20])
        if len(skipped) > 20:
            report.notes.append(f"  ... and {len(skipped) - 20:,} more")
    if not files:
        raise UserError(f"data.path: no images in {root} (expected one sub-folder of images per identity)")
    report.identities = len(files)
    report.images = sum(len(v) for v in files.values())
    paths = [p for name in files for p in files[name]]
    pillow = np.array([decode.route_by_extension(p) == decode.ROUTE_PILLOW for p in paths], bool)
    good = np.ones(len(paths), bool)
    if check:
        result = decode.check_files(paths, getattr(data_cfg, "check_cache", None), root=root, stats=stats,
                                    max_pixels=getattr(data_cfg, "max_pixels", decode.DEFAULT_MAX_PIXELS),
                                    use_cache=not full)
        report.checked = True
        report.check_seconds = result.seconds
        report.cached_checks = result.cached
        for i, p in enumerate(paths):
            r = result.results[p]
            if r.ok:
                pillow[i] = r.route == decode.ROUTE_PILLOW
                report.size_of[p] = f"{r.height}x{r.width}"
            else:
                good[i] = False
                report.bad_files.append((p, r.reason))
    identities = list(files)
    labels = np.repeat(np.arange(len(identities)), [len(files[n]) for n in identities])
    index = ImageIndex(paths, labels, identities, pillow)
    return index.select_images(good) if not good.all() else index


def _synthetic_index(data_cfg, report: DataReport) -> ImageIndex:
    n_ids, n_img = data_cfg.synthetic_identities, data_cfg.synthetic_images_per_identity
    report.root = (f"({n_ids} identities x {n_img} images, seed {data_cfg.synthetic_seed}, "
                   f"nuisance {data_cfg.synthetic_nuisance:g})")
    report.identities, report.images, report.checked = n_ids, n_ids * n_img, True
    report.notes.append("synthetic images are rendered on the fly (nothing to decode)")
    paths = [synthetic.image_key(i, j) for i in range(n_ids) for j in range(n_img)]
    labels = np.repeat(np.arange(n_ids), n_img)
    report.image_sizes = {f"{data_cfg.image_size}x{data_cfg.image_size}": n_ids * n_img}
    return ImageIndex(paths, labels, [synthetic.identity_name(i) for i in range(n_ids)],
                      np.zeros(n_ids * n_img, bool))


def _tfrecord_index(data_cfg, check: bool, report: DataReport, full: bool = False) -> ImageIndex:
    """ImageIndex of the selected shards (keys ``tfrecord:<shard>:<record>``) from the manifest.

    With `check`, the shards are trusted as `prepare` wrote them (`tfrecord.verify_shards`:
    checksum, sizes, record counts); `full` decodes every record instead."""
    import time

    man = tfrecord.load_manifest(data_cfg.path)
    report.root = f"{data_cfg.path} ({len(man.selected)} of {len(man.shards)} shards, {man.path})"
    bad: set = set()
    if check:
        t0 = time.perf_counter()
        tfrecord.verify_shards(man)
        if full:
            for s, r, reason in tfrecord.decode_records(man, getattr(data_cfg, "max_pixels", decode.DEFAULT_MAX_PIXELS)):
                bad.add((s, r))
                report.bad_files.append((f"{tfrecord.KEY_PREFIX}{s}:{r} ({man.files[s]})", reason))
        report.check_seconds = time.perf_counter() - t0
    keys: list[str] = []
    labels: list[int] = []
    for s in man.selected:
        r = 0
        for label, count in man.shards[s]["runs"]:
            keys.extend(f"{tfrecord.KEY_PREFIX}{s}:{j}" for j in range(r, r + count))
            labels.extend([label] * count)
            r += count
    labels_arr = np.asarray(labels, np.int64)
    if bad:
        good = np.array([tfrecord.parse_key(k) not in bad for k in keys], bool)
        keys = [k for k, g in zip(keys, good.tolist()) if g]
        labels_arr = labels_arr[good]
    present = np.unique(labels_arr)
    remap = np.full(len(man.identities), -1, np.int64)
    remap[present] = np.arange(len(present))
    order = np.argsort(labels_arr, kind="stable")
    index = ImageIndex([keys[i] for i in order.tolist()], remap[labels_arr[order]].astype(np.int32),
                       [man.identities[i] for i in present.tolist()], np.zeros(len(keys), bool))
    report.identities = len(present)
    report.images = len(keys) + len(bad)
    report.checked = True
    report.image_sizes = dict(man.data.get("image_sizes", {})) if len(man.selected) == len(man.shards) else {}
    skipped = man.data.get("bad_files", [])
    if full:
        report.notes.append(f"decoded every record of {len(man.selected)} shards (--full)")
    else:
        report.notes.append("images were decoded by `mbembed prepare` when it wrote the shards; trusted: "
                            "manifest checksum, shard sizes and record counts verified (`data check --full` "
                            "decodes every record)"
                            + (f"; it skipped {len(skipped)} unreadable files (listed in {man.path})" if skipped else ""))
    return index


def inspect_data(data_cfg, check: bool = True, full: bool = False) -> tuple[ImageIndex, DataReport]:
    """Index of the configured source with identity filters applied, and its report.

    `full`: decode every image again: folder, ignoring the check cache; tfrecord, every record of
    the shards instead of trusting the manifest `prepare` wrote (`data check --full`).

    Raises UserError only for a missing/empty data path or a bad identities file; the
    thresholds (bad fraction, usable identities) are `validate_report`'s job.
    """
    report = DataReport(source=data_cfg.source, root=str(data_cfg.path),
                        min_images_per_identity=data_cfg.min_images_per_identity,
                        max_bad_fraction=data_cfg.max_bad_fraction)
    if data_cfg.source == "folder":
        index = _folder_index(data_cfg, check, report, full)
    elif data_cfg.source == "synthetic":
        index = _synthetic_index(data_cfg, report)
    elif data_cfg.source == "tfrecord":
        index = _tfrecord_index(data_cfg, check, report, full)
    else:  # pragma: no cover - the config validates choices
        raise UserError(f"data.source: unknown source {data_cfg.source!r}")

    names = list(index.identities)
    if data_cfg.identities_file or data_cfg.identities_folds:
        if not data_cfg.identities_file:
            raise UserError("data.identities_folds: needs data.identities_file (an LFW people.txt)")
        listed = read_identity_list(data_cfg.identities_file, data_cfg.identities_folds)
        present = set(names)
        report.missing_listed = [n for n in dict.fromkeys(listed) if n not in present]
        listed_set = set(listed)
        names = [n for n in names if n in listed_set]
    if data_cfg.exclude_identities_file:
        excluded = set(read_identity_list(data_cfg.exclude_identities_file,
                                          key="data.exclude_identities_file"))
        before = len(names)
        names = [n for n in names if n not in excluded]
        report.excluded_identities = before - len(names)
    if len(names) != len(index.identities):
        report.selected_identities = len(names)
        index = index.subset(names)
    elif data_cfg.identities_file or data_cfg.exclude_identities_file:
        report.selected_identities = len(names)

    counts = index.counts()
    report.identities_with_two = int((counts >= 2).sum())
    usable = counts >= data_cfg.min_images_per_identity
    report.usable_identities = int(usable.sum())
    report.usable_images = int(counts[usable].sum())
    if not usable.all():
        index = index.subset([n for n, u in zip(index.identities, usable.tolist()) if u])
    if report.size_of:
        report.image_sizes = dict(collections.Counter(report.size_of[p] for p in index.paths))
    return index, report


def validate_report(report: DataReport, data_cfg) -> None:
    """The errors that stop training: too many bad images, nothing usable."""
    where = f"data.path {report.root}" if report.source != "synthetic" else "data.source synthetic"
    if report.checked and report.images and report.bad_fraction > data_cfg.max_bad_fraction:
        raise UserError(f"{where}: {len(report.bad_files):,} of {report.images:,} images "
                        f"({report.bad_fraction:.2%}) are unreadable, more than data.max_bad_fraction "
                        f"({data_cfg.max_bad_fraction:g}); `mbembed data check` lists them")
    if report.identities_with_two == 0:
        raise UserError(f"{where}: no identity has 2 or more readable images (triplets need at least 2)")
    if report.usable_identities == 0:
        raise UserError(f"{where}: no identity has data.min_images_per_identity "
                        f"({data_cfg.min_images_per_identity}) readable images")


def build_index(data_cfg, check: bool = True) -> tuple[ImageIndex, DataReport]:
    """Index of usable images (filters applied, bad files excluded) and the report; raises
    UserError for a missing or empty data path, no usable identity, or too many bad files."""
    index, report = inspect_data(data_cfg, check=check)
    validate_report(report, data_cfg)
    return index, report


def split_identities(index: ImageIndex, fraction: float, seed: int) -> tuple[ImageIndex, ImageIndex]:
    """(train, held-out): a seeded ``round(fraction * identities)`` of the identities that have
    >= 2 images go to the held-out side (at least one when fraction > 0); both relabelled 0..n-1.
    """
    counts = index.counts()
    candidates = [name for name, c in zip(index.identities, counts.tolist()) if c >= 2]
    n_val = min(len(candidates), int(round(fraction * len(index.identities))))
    if fraction > 0 and candidates:
        n_val = max(n_val, 1)
    rng = np.random.default_rng([int(seed), 0x5B117])
    chosen = {candidates[i] for i in rng.permutation(len(candidates))[:n_val].tolist()}
    train = [n for n in index.identities if n not in chosen]
    val = [n for n in index.identities if n in chosen]
    return index.subset(train), index.subset(val)

