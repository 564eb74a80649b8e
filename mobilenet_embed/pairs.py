"""Verification pairs: read and write LFW pairs files, draw pairs from an identity folder.

Formats `read_pairs` accepts (detected from the first line):

* **LFW View 2** (``pairs.txt``): header ``n_folds n_per_fold`` (``10 300``), then for
  each fold `n_per_fold` same-person lines ``name n1 n2`` followed by `n_per_fold`
  different-person lines ``name1 n1 name2 n2``;
* **LFW View 1** (``pairsDevTrain.txt``, ``pairsDevTest.txt``): header ``N``, then N
  same-person lines and N different-person lines;
* **mbembed pairs v1**: header ``# mbembed pairs v1``, then ``path_a<TAB>path_b<TAB>same``
  lines (same: 1 or 0; paths relative to the image root unless absolute; blank lines
  and ``#`` comments skipped). `write_pairs` falls back to it when the images are
  not named ``<name>/<name>_NNNN.<ext>``, which the LFW formats cannot express.

In the LFW formats ``name n`` means ``<root>/name/name_000n.<ext>`` (n zero-padded to
4 digits). Fields are separated by any whitespace; blank lines are skipped; line
numbers in errors count every physical line from 1.

Names in LFW files are identity folders directly under the image root: ``..``, ``.``, a name with
a path separator or an absolute path is refused (``<file>:<line>: ...``); a relative path of the
mbembed format must stay under the root (absolute paths are taken as written).

Unreadable images (`readable_identity_folders`, `drop_unreadable_pairs`) are found by the decode
check of ``mbembed data check``, so pairs are never drawn from them and a pair naming one is
skipped and counted rather than stopping an evaluation.

Pure Python + NumPy at import; the two functions above call the data check (TensorFlow) when used.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from mobilenet_embed import atomic
from mobilenet_embed.errors import UserError
from mobilenet_embed.image_files import IMAGE_EXTENSIONS, scan_folder

if TYPE_CHECKING:
    from mobilenet_embed.config import DataConfig

#: first line of the mbembed pairs format
MBEMBED_HEADER = "# mbembed pairs v1"

_MALFORMED = "expected 'name n1 n2' or 'name1 n1 name2 n2', received '{}'"
_LFW_FILE = re.compile(r"^(?P<name>[^\s/\\]+)_(?P<num>\d{4,})(?P<ext>\.[^.\s/\\]+)$")


@dataclass(frozen=True)
class Pair:
    """Two image paths, whether they show one person, and the pairs-file line (1-based).

    For pairs drawn by `make_pairs`, `line` is the line `write_pairs` puts them on.
    `fold` is the 1-based View 2 fold, None where the format has no folds.
    """

    path_a: str
    path_b: str
    issame: bool
    line: int
    fold: Optional[int] = None


# --------------------------------------------------------------------------- image lookup


class _ImageIndex:
    """Image files of each identity folder by stem, listed once per folder."""

    def __init__(self, root: str):
        self.root = root
        self._dirs: dict[str, dict[str, list[str]]] = {}

    def stems(self, name: str) -> dict[str, list[str]]:
        if name not in self._dirs:
            folder = os.path.join(self.root, name)
            by_stem: dict[str, list[str]] = {}
            try:
                entries = sorted(os.listdir(folder))
            except OSError:
                entries = []
            for entry in entries:
                stem, ext = os.path.splitext(entry)
                if ext.lower() in IMAGE_EXTENSIONS:
                    by_stem.setdefault(stem, []).append(entry)
            for files in by_stem.values():
                files.sort(key=lambda f: IMAGE_EXTENSIONS.index(os.path.splitext(f)[1].lower()))
            self._dirs[name] = by_stem
        return self._dirs[name]

    def candidates(self, name: str, stem: str) -> list[str]:
        return [os.path.join(self.root, name, f) for f in self.stems(name).get(stem, [])]


def _normalize_ext(ext: Optional[str]) -> Optional[str]:
    if ext is None or ext == "":
        return None
    return ext if ext.startswith(".") else "." + ext


# --------------------------------------------------------------------------- reading


def _lfw_pair_tokens(tokens: list[str]):
    """(name_a, n_a, name_b, n_b, issame) or None when malformed."""

    def number(text: str) -> Optional[int]:
        if not text.isdigit():
            return None
        value = int(text)
        return value if value >= 1 else None

    if len(tokens) == 3:
        name, a, b = tokens[0], number(tokens[1]), number(tokens[2])
        if a is None or b is None:
            return None
        return name, a, name, b, True
    if len(tokens) == 4:
        name_a, a, name_b, b = tokens[0], number(tokens[1]), tokens[2], number(tokens[3])
        if a is None or b is None or name_a == name_b:
            return None
        return name_a, a, name_b, b, False
    return None


def _read_lines(pairs_file: str) -> list[str]:
    if not os.path.isfile(pairs_file):
        raise UserError(f"{pairs_file}: pairs file not found")
    try:
        with open(pairs_file, encoding="utf-8") as fh:
            return fh.read().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{pairs_file}: not a text (UTF-8) file") from None


def _parse_header(pairs_file: str, header: str) -> tuple[str, int, int]:
    """('view2', n_folds, n_per_fold) or ('view1', 1, n) or ('mbembed', 0, 0)."""
    if header.strip() == MBEMBED_HEADER:
        return "mbembed", 0, 0
    tokens = header.split()
    if 1 <= len(tokens) <= 2 and all(t.isdigit() and int(t) >= 1 for t in tokens):
        if len(tokens) == 2:
            return "view2", int(tokens[0]), int(tokens[1])
        return "view1", 1, int(tokens[0])
    raise UserError(
        f"{pairs_file}:1: expected a header 'n_folds n_per_fold' (LFW View 2), 'n_pairs' "
        f"(LFW View 1) or '{MBEMBED_HEADER}', received '{header.strip()}'"
    )


def read_pairs(
    pairs_file: str,
    root: str,
    ext: Optional[str] = None,
    folds: Optional[Sequence[int]] = None,
) -> list[Pair]:
    """The pairs of `pairs_file` (LFW View 1 or View 2, or mbembed v1), in file order.

    `root` is the image folder (``<root>/<name>/<name>_NNNN.<ext>``). `ext` (``"jpg"``
    or ``".jpg"``) fixes the extension; None finds the one image whose stem matches
    among `IMAGE_EXTENSIONS` (several matches are an error: pass `ext`). `folds`
    (1-based, View 2 only) keeps only those folds. A View 1 file or a selection of folds
    comes back with same and different pairs interleaved (see `interleave_same_different`).

    Raises `UserError` ``"<pairs_file>:<line>: ..."`` for a bad header, a malformed
    line, a count that disagrees with the header, or a missing image (the first one
    reported, with how many more lines miss images).
    """
    pairs_file = str(pairs_file)
    root = str(root)
    if not os.path.isdir(root):
        raise UserError(f"{root}: image folder not found (the root of {pairs_file})")
    ext = _normalize_ext(ext)
    lines = _read_lines(pairs_file)
    numbered = [(i + 1, text) for i, text in enumerate(lines) if text.strip()]
    if not numbered:
        raise UserError(f"{pairs_file}: empty pairs file")
    first_line, header = numbered[0]
    if first_line != 1:
        raise UserError(f"{pairs_file}:1: expected a header line, the file starts with a blank line")
    kind, n_folds, n_per_fold = _parse_header(pairs_file, header)
    body = numbered[1:]

    if folds is not None and kind != "view2":
        raise UserError(f"{pairs_file}: fold selection {list(folds)} needs an LFW View 2 file (header 'n_folds n_per_fold')")

    wanted: Optional[set[int]] = None
    if folds is not None:
        for f in folds:
            if not isinstance(f, (int, np.integer)) or not 1 <= f <= n_folds:
                raise UserError(f"{pairs_file}: fold {f} does not exist; the file holds folds 1 to {n_folds}")
        wanted = {int(f) for f in folds}

    if kind == "mbembed":
        pairs = _read_mbembed(pairs_file, root, body)
    else:  # only the wanted folds' images need to exist
        pairs = _read_lfw(pairs_file, root, ext, kind, n_folds, n_per_fold, body, wanted)
    if kind == "view1" or (folds is not None and len(set(folds)) < n_folds):
        pairs = interleave_same_different(pairs)
    return pairs


def interleave_same_different(pairs: Sequence[Pair]) -> list[Pair]:
    """Alternate same and different pairs (same order within each kind).

    An LFW fold is 300 same pairs followed by 300 different ones, and a View 1 file is all
    its same pairs then all its different ones. The 10-fold protocol over such a block would
    give sub-folds of one kind only (accuracy and ROC meaningless), so `read_pairs` interleaves
    a View 1 file or a selection of View 2 folds: every contiguous sub-fold is then balanced.
    A full View 2 file keeps its order, which is already balanced fold by fold.
    """
    same = [p for p in pairs if p.issame]
    diff = [p for p in pairs if not p.issame]
    out = [p for two in zip(same, diff) for p in two]
    longer = same if len(same) > len(diff) else diff
    return out + longer[min(len(same), len(diff)):]


def _check_lfw_name(pairs_file: str, line: int, name: str, root: str) -> None:
    """An LFW name is one identity folder directly under `root`: never ``..``, a path or absolute."""
    if name in (".", "..") or "/" in name or "\\" in name or os.path.isabs(name):
        raise UserError(f"{pairs_file}:{line}: '{name}' is not an identity folder name: names in an LFW "
                        f"pairs file are folders directly under the image root {root} (paths are refused)")


def _under_root(pairs_file: str, line: int, rel: str, root: str) -> str:
    """`rel` joined to `root`; a relative path that climbs out of `root` (``../x``) is refused."""
    if os.path.isabs(rel):
        return rel
    normal = os.path.normpath(rel)
    if normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise UserError(f"{pairs_file}:{line}: '{rel}' lies outside the image root {root}; relative paths "
                        "must stay under it (write an absolute path to use an image elsewhere)")
    return os.path.join(root, rel)


def _read_lfw(pairs_file, root, ext, kind, n_folds, n_per_fold, body, wanted=None) -> list[Pair]:
    expected = 2 * n_folds * n_per_fold
    if len(body) != expected:
        promise = f"'{n_folds} {n_per_fold}'" if kind == "view2" else f"'{n_per_fold}'"
        raise UserError(
            f"{pairs_file}:1: header {promise} announces {expected} pairs, the file holds {len(body)}"
        )
    index = _ImageIndex(root)

    def resolve(name: str, n: int, line: int) -> Optional[str]:
        stem = f"{name}_{n:04d}"
        if ext is not None:
            path = os.path.join(root, name, stem + ext)
            return path if os.path.isfile(path) else None
        found = index.candidates(name, stem)
        if len(found) > 1:
            raise UserError(
                f"{pairs_file}:{line}: several images match {os.path.join(root, name, stem)}.*: "
                f"{', '.join(os.path.basename(f) for f in found)}; set the image extension"
            )
        return found[0] if found else None

    pairs: list[Pair] = []
    missing: list[tuple[int, str]] = []
    for k, (line, text) in enumerate(body):
        parsed = _lfw_pair_tokens(text.split())
        if parsed is None:
            raise UserError(f"{pairs_file}:{line}: " + _MALFORMED.format(text.strip()))
        name_a, n_a, name_b, n_b, issame = parsed
        for name in (name_a, name_b):
            _check_lfw_name(pairs_file, line, name, root)
        fold = k // (2 * n_per_fold) + 1 if kind == "view2" else None
        if wanted is not None and fold not in wanted:
            continue
        paths = []
        for name, n in ((name_a, n_a), (name_b, n_b)):
            path = resolve(name, n, line)
            if path is None:
                shown = os.path.join(root, name, f"{name}_{n:04d}") + (ext or ".*")
                missing.append((line, shown))
            paths.append(path or "")
        pairs.append(Pair(paths[0], paths[1], issame, line, fold))
    _raise_missing(pairs_file, missing)
    return pairs


def _read_mbembed(pairs_file, root, body) -> list[Pair]:
    pairs: list[Pair] = []
    missing: list[tuple[int, str]] = []
    for line, text in body:
        if text.lstrip().startswith("#"):
            continue
        fields = text.rstrip("\r\n").split("\t")
        if len(fields) != 3 or fields[2].strip() not in ("0", "1") or not fields[0] or not fields[1]:
            raise UserError(
                f"{pairs_file}:{line}: expected 'path_a<TAB>path_b<TAB>same' (same: 1 or 0), "
                f"received '{text.strip()}'"
            )
        paths = []
        for rel in fields[:2]:
            path = _under_root(pairs_file, line, rel, root)
            if not os.path.isfile(path):
                missing.append((line, path))
            paths.append(path)
        pairs.append(Pair(paths[0], paths[1], fields[2].strip() == "1", line))
    if not pairs:
        raise UserError(f"{pairs_file}: no pairs after the header")
    _raise_missing(pairs_file, missing)
    return pairs


def _raise_missing(pairs_file: str, missing: list[tuple[int, str]]) -> None:
    if not missing:
        return
    line, path = missing[0]
    more = len({ln for ln, _ in missing}) - 1
    suffix = f" ({more} more lines miss images)" if more else ""
    raise UserError(f"{pairs_file}:{line}: image not found: {path}{suffix}")


# --------------------------------------------------------------------------- drawing


def identity_folders(root: str) -> dict[str, list[str]]:
    """``{identity: [image paths]}`` of an identity folder, as training sees it: the images of each
    sub-folder of `root` and below (`mobilenet_embed.image_files.scan_folder`: sorted, hidden
    entries and folders without images skipped, extensions matched case-insensitively)."""
    root = str(root)
    if not os.path.isdir(root):
        raise UserError(f"{root}: image folder not found")
    files, _, _ = scan_folder(root)
    return files


# --------------------------------------------------------------------------- unreadable images


def _shown(path: str, root: str) -> str:
    rel = os.path.relpath(path, root) if root else path
    return path if rel.startswith(os.pardir) else rel


def _listed(paths: Sequence[str], root: str, limit: int = 3) -> str:
    shown = ", ".join(_shown(p, root) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def skipped_pairs_text(skipped: Sequence[dict], root: str) -> str:
    """``1 pair: unreadable image x.jpg (truncated JPEG)`` (the reason when one image is named)."""
    images = list(dict.fromkeys(s["image"] for s in skipped))
    reason = f" ({skipped[0]['reason']})" if len(images) == 1 else ""
    return (f"{len(skipped)} pair{'s' if len(skipped) != 1 else ''}: unreadable "
            f"image{'s' if len(images) != 1 else ''} {_listed(images, root)}{reason}")


def left_out_text(left_out: Sequence[tuple[str, str]], root: str) -> str:
    """``2 unreadable images: a.jpg, b.jpg (mbembed data check lists them)``."""
    return (f"{len(left_out)} unreadable image{'s' if len(left_out) != 1 else ''}: "
            f"{_listed([p for p, _ in left_out], root)} (mbembed data check lists them)")


def readable_identity_folders(data_cfg: "DataConfig", root: str
                              ) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """``{identity: [readable image paths]}`` of the identity folder `root` and its unreadable
    images ``[(path, reason)]``, found by the scan and decode check of ``mbembed data check``
    (`mobilenet_embed.data.inspect_data`, with the check cache of `data_cfg`); every
    identity kept, the training filters (identity lists, minimum images) not applied."""
    from mobilenet_embed.data import inspect_data

    data_cfg = dataclasses.replace(data_cfg, source="folder", path=root, identities_file=None,
                                   exclude_identities_file=None, identities_folds=None,
                                   min_images_per_identity=1)
    index, report = inspect_data(data_cfg, check=True)
    return index.identity_to_paths(), list(report.bad_files)


def drop_unreadable_pairs(pairs: Sequence[Pair], root: str, pairs_file: str, strict: bool = False,
                          cache_dir: Optional[str] = None) -> tuple[list[Pair], list[dict]]:
    """The pairs whose two images decode, and ``[{"line", "image", "reason"}]`` for the others.

    Images are checked as ``mbembed data check`` checks them (`decode.check_files`, cached in
    `cache_dir`). With `strict`, a pair naming an unreadable image is a `UserError` naming the
    pairs file, its line and the image instead.
    """
    from mobilenet_embed.data.decode import check_files

    paths = list(dict.fromkeys(p for pair in pairs for p in (pair.path_a, pair.path_b)))
    results = check_files(paths, cache_dir, root=root).results if paths else {}
    bad = {p: r.reason for p, r in results.items() if not r.ok}
    kept: list[Pair] = []
    skipped: list[dict] = []
    for pair in pairs:
        image = next((p for p in (pair.path_a, pair.path_b) if p in bad), None)
        if image is None:
            kept.append(pair)
        else:
            skipped.append({"line": pair.line, "image": image, "reason": bad[image]})
    if skipped and strict:
        first, more = skipped[0], len(skipped) - 1
        raise UserError(f"{pairs_file}:{first['line']}: unreadable image {first['image']} ({first['reason']})"
                        + (f"; {more} more pair{'s' if more != 1 else ''} name unreadable images" if more else "")
                        + " (--strict-pairs refuses such pairs; without it they are skipped and counted)")
    return kept, skipped


def _check_pair_counts(ids: dict[str, list[str]], names: list[str], multi: list[str], n_pairs: int,
                       n_folds: int) -> None:
    """`n_pairs` same and different pairs in `n_folds` balanced folds must be possible."""
    if n_folds < 1:
        raise UserError(f"make_pairs: n_folds must be at least 1, received {n_folds}")
    if n_pairs < 1 or n_pairs % n_folds:
        raise UserError(
            f"make_pairs: the number of pairs ({n_pairs}) must be a positive multiple of the "
            f"{n_folds} folds, so that every fold holds as many same as different pairs"
        )
    possible_same = sum(len(ids[n]) * (len(ids[n]) - 1) // 2 for n in multi)
    if possible_same < n_pairs:
        raise UserError(
            f"make_pairs: {len(multi)} identities with 2+ images give {possible_same} distinct "
            f"same-person pairs, fewer than the {n_pairs} asked for"
        )
    sizes = np.array([len(ids[n]) for n in names], dtype=np.int64)
    possible_diff = int((sizes.sum() ** 2 - (sizes**2).sum()) // 2)
    if len(names) < 2 or possible_diff < n_pairs:
        raise UserError(
            f"make_pairs: {len(names)} identities give {possible_diff} distinct different-person "
            f"pairs, fewer than the {n_pairs} asked for"
        )


def _draw_distinct(draw, n_pairs: int, seen: set, what: str) -> list[tuple[str, str]]:
    """`n_pairs` results of ``draw()`` whose (unordered) pair is not in `seen` yet (added to it)."""
    max_tries = 100 * n_pairs + 10_000
    drawn: list[tuple[str, str]] = []
    tries = 0
    while len(drawn) < n_pairs:
        tries += 1
        if tries > max_tries:
            raise UserError(f"make_pairs: drew only {len(drawn)} distinct {what} pairs of {n_pairs} "
                            f"in {max_tries} tries; ask for fewer pairs")
        pa, pb = draw()
        key = (min(pa, pb), max(pa, pb))
        if key not in seen:
            seen.add(key)
            drawn.append((pa, pb))
    return drawn


def _different_drawer(ids: dict[str, list[str]], names: list[str], rng: np.random.Generator):
    """A ``draw()`` of one different-person pair: two identities uniformly, then one image of each."""

    def draw() -> tuple[str, str]:
        a, b = rng.choice(len(names), size=2, replace=False)
        paths_a, paths_b = ids[names[a]], ids[names[b]]
        return paths_a[int(rng.integers(len(paths_a)))], paths_b[int(rng.integers(len(paths_b)))]

    return draw


def _fold_layout(same: list[tuple[str, str]], diff: list[tuple[str, str]], n_folds: int) -> list[Pair]:
    """LFW View 2 order: per fold its share of same pairs, then as many different pairs."""
    per_fold = len(same) // n_folds
    pairs: list[Pair] = []
    for fold in range(n_folds):
        block = [(p, True) for p in same[fold * per_fold:(fold + 1) * per_fold]]
        block += [(p, False) for p in diff[fold * per_fold:(fold + 1) * per_fold]]
        for (pa, pb), issame in block:
            pairs.append(Pair(pa, pb, issame, line=len(pairs) + 2, fold=fold + 1))
    return pairs


def make_pairs(
    identity_to_paths: dict[str, list[str]],
    n_pairs: int,
    n_folds: int = 10,
    seed: int = 0,
) -> list[Pair]:
    """Draw `n_pairs` same-person and `n_pairs` different-person pairs (2 * n_pairs in all).

    Deterministic for a seed, whatever the dict's order (names and paths are sorted).
    Same pairs: an identity with 2+ images uniformly, then two of its images; different
    pairs: two identities uniformly, then one image of each; no pair (in either order)
    is drawn twice. Laid out like LFW View 2 for the 10-fold protocol: `n_folds` folds,
    each `n_pairs / n_folds` same pairs then as many different pairs, so `n_pairs` must
    be a multiple of `n_folds`. `Pair.line` is the line `write_pairs` writes it on,
    `Pair.fold` its 1-based fold.
    """
    ids = {name: sorted(set(paths)) for name, paths in identity_to_paths.items() if paths}
    names = sorted(ids)
    multi = [name for name in names if len(ids[name]) >= 2]
    _check_pair_counts(ids, names, multi, n_pairs, n_folds)
    rng = np.random.default_rng(seed)
    seen: set = set()

    def draw_same() -> tuple[str, str]:
        paths = ids[multi[int(rng.integers(len(multi)))]]
        i, j = rng.choice(len(paths), size=2, replace=False)
        return paths[i], paths[j]

    same = _draw_distinct(draw_same, n_pairs, seen, "same-person")
    diff = _draw_distinct(_different_drawer(ids, names, rng), n_pairs, seen, "different-person")
    return _fold_layout(same, diff, n_folds)


# --------------------------------------------------------------------------- writing


def _lfw_layout(pairs: Sequence[Pair], n_folds: int) -> Optional[int]:
    """n_per_fold when `pairs` are laid out as View 2 folds (same block, then different block)."""
    if n_folds < 1 or not pairs or len(pairs) % (2 * n_folds):
        return None
    per_fold = len(pairs) // (2 * n_folds)
    for k, pair in enumerate(pairs):
        if pair.issame != (k % (2 * per_fold) < per_fold):
            return None
    return per_fold


def _lfw_tokens(pair: Pair, root: str, index: _ImageIndex) -> Optional[str]:
    """The LFW line of `pair`, or None when its paths cannot be written (and read back) that way."""
    parts = []
    for path in (pair.path_a, pair.path_b):
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
        pieces = rel.split(os.sep)
        if len(pieces) != 2:
            return None
        folder, filename = pieces
        match = _LFW_FILE.match(filename)
        if not match or match["name"] != folder or match["ext"].lower() not in IMAGE_EXTENSIONS:
            return None
        number = int(match["num"])
        if number < 1 or f"{number:04d}" != match["num"]:
            return None
        # read back with ext=None, the stem must name this one image
        if len(index.candidates(folder, f"{folder}_{match['num']}")) > 1:
            return None
        parts.append((folder, number))
    (name_a, n_a), (name_b, n_b) = parts
    if pair.issame:
        return f"{name_a}\t{n_a}\t{n_b}" if name_a == name_b else None
    return f"{name_a}\t{n_a}\t{name_b}\t{n_b}" if name_a != name_b else None


def write_pairs(pairs: Sequence[Pair], path: str, root: str, n_folds: int = 10) -> str:
    """Write `pairs` to `path` so that ``read_pairs(path, root)`` gives them back; return the format.

    LFW View 2 (header ``n_folds n_per_fold``; returns ``"lfw"``) when the pairs are laid
    out in View 2 folds (as `make_pairs` draws them) and every image is
    ``<root>/<name>/<name>_NNNN.<ext>`` with a stem no other image shares; otherwise the
    mbembed format (``"mbembed"``): ``# mbembed pairs v1`` then
    ``path_a<TAB>path_b<TAB>same`` lines, paths relative to `root` where they lie under it.
    Either way pair k lands on line k + 2. The file is replaced atomically.
    """
    path = str(path)
    root = str(root)
    pairs = list(pairs)
    if not pairs:
        raise ValueError("write_pairs: no pairs to write")
    lines: Optional[list[str]] = None
    per_fold = _lfw_layout(pairs, n_folds)
    if per_fold is not None:
        index = _ImageIndex(root)
        body = [_lfw_tokens(p, root, index) for p in pairs]
        if all(line is not None for line in body):
            lines = [f"{n_folds}\t{per_fold}"] + body  # type: ignore[operator]
            kind = "lfw"
    if lines is None:
        kind = "mbembed"
        lines = [MBEMBED_HEADER]
        root_abs = os.path.abspath(root)
        for pair in pairs:
            fields = []
            for p in (pair.path_a, pair.path_b):
                rel = os.path.relpath(os.path.abspath(p), root_abs)
                shown = os.path.abspath(p) if rel.startswith(os.pardir) else rel
                if "\t" in shown or "\n" in shown or "\r" in shown:
                    raise UserError(f"{p}: a path with a tab or line break cannot be written to a pairs file")
                fields.append(shown)
            fields.append("1" if pair.issame else "0")
            lines.append("\t".join(fields))
    atomic.write_text(path, "\n".join(lines) + "\n", newline="\n")
    return kind


def write_pair_distances_csv(
    path: str, pairs: Sequence[Pair], distances: Sequence[float], threshold: float
) -> None:
    """``pair_distances.csv`` for error analysis: one row per pair, in order.

    Columns: ``pair`` (0-based index), ``line`` (pairs-file line), ``path_a``, ``path_b``,
    ``distance``, ``same`` (1/0), ``predicted`` (1 where ``distance < threshold``, the
    metrics' rule), ``correct`` (1/0).
    """
    distances = np.asarray(distances, dtype=np.float64)
    if len(distances) != len(pairs):
        raise ValueError(f"{len(pairs)} pairs but {len(distances)} distances")
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["pair", "line", "path_a", "path_b", "distance", "same", "predicted", "correct"])
        for k, (pair, d) in enumerate(zip(pairs, distances)):
            predicted = bool(d < threshold)
            writer.writerow(
                [k, pair.line, pair.path_a, pair.path_b, repr(float(d)), int(pair.issame),
                 int(predicted), int(predicted == pair.issame)]
            )


# --------------------------------------------------------------------------- held-out sets


def exhaustive_pairs(
    identity_to_paths: dict[str, list[str]],
    max_same_per_identity: int = 100,
    n_folds: int = 10,
    seed: int = 0,
) -> list[Pair]:
    """Every same-person pair of each identity (at most `max_same_per_identity` of them, drawn
    seeded where an identity has more) and as many different-person pairs, in View 2 folds.

    A larger verification set than View 2's 600 pairs a fold, for a standard error under one
    point: on LFW's fold-10 people (609 people, 181 with 2+ images) the cap of 100 gives about
    4,000 pairs. The cap keeps one prolific person (George W. Bush: 530 images, 140,185 pairs)
    from being the whole test. Different pairs: two distinct identities uniformly, then one image
    of each, no pair twice. The same count is trimmed to a multiple of `n_folds`.
    """
    ids = {name: sorted(set(paths)) for name, paths in identity_to_paths.items() if paths}
    names = sorted(ids)
    rng = np.random.default_rng(seed)
    same: list[tuple[str, str]] = []
    for name in names:
        paths = ids[name]
        every = [(paths[i], paths[j]) for i in range(len(paths)) for j in range(i + 1, len(paths))]
        if len(every) > max_same_per_identity:
            keep = np.sort(rng.choice(len(every), size=max_same_per_identity, replace=False))
            every = [every[k] for k in keep]
        same.extend(every)
    n_pairs = len(same) - len(same) % n_folds
    if n_pairs < n_folds:
        raise UserError(f"exhaustive_pairs: {len(same)} same-person pairs, fewer than the {n_folds} folds")
    same = [same[k] for k in rng.permutation(len(same))[:n_pairs]]
    multi = [name for name in names if len(ids[name]) >= 2]
    _check_pair_counts(ids, names, multi, n_pairs, n_folds)
    seen = {(min(a, b), max(a, b)) for a, b in same}
    diff = _draw_distinct(_different_drawer(ids, names, rng), n_pairs, seen, "different-person")
    return _fold_layout(same, diff, n_folds)
