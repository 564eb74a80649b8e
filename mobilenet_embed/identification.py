"""Identification (1:N) protocol and metrics: closed-set rank-k / CMC, open-set DIR@FPIR, DET.

Pure NumPy on a distance matrix ``dist [P, G]`` (probe x gallery identity; an identity's
distance is that of its best gallery image, or of its template) and ``labels [P]`` (the probe's
gallery identity, or -1 for a distractor: a person not enrolled). As in `mbembed eval`, a
comparison is accepted where ``distance < threshold``.

* **rank** of a mated probe: ``1 + #{identities strictly closer than its own}``;
  **CMC(r)**: fraction of mated probes with rank <= r (closed set: distractors not used);
* **FPIR** (false-positive identification rate, the "FAR" of IJB-C / MegaFace open-set
  search) at threshold t: fraction of distractor probes whose best distance is < t;
* **DIR** (detection and identification rate) at t: fraction of mated probes whose own
  identity is at rank 1 with distance < t. FNIR = 1 - DIR; the DET curve is FNIR over FPIR.
* **threshold at a false-alarm rate f** (`threshold_at_rate`): the largest t with
  ``#{d < t} <= f * M`` over M impostor distances: the ``floor(f M) + 1``-th smallest of them,
  no interpolation. The achieved rate is reported beside the target: it can only be below it,
  and it is 0 whenever ``f < 1 / M``.

Protocol files (`write_protocol` / `read_protocol`): a folder with ``gallery.txt``,
``probes.txt`` and ``distractors.txt``, one image per line, ``identity<TAB>path`` with the
path relative to the image root; ``#`` lines are comments. `make_protocol` draws one from
``{identity: [paths]}`` (seeded); `lfw_people_fold` lists a fold of LFW's ``people.txt``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Optional, Sequence

import numpy as np

from mobilenet_embed.errors import UserError

PROTOCOL_FILES = ("gallery.txt", "probes.txt", "distractors.txt")


# --------------------------------------------------------------------------- metrics


def _check(dist: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dist = np.asarray(dist, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if dist.ndim != 2 or labels.shape != (dist.shape[0],):
        raise ValueError(f"expected dist [P, G] and labels [P], received {dist.shape} and {labels.shape}")
    if np.any(labels >= dist.shape[1]):
        raise ValueError("a label is not a gallery identity (labels must be < G, or -1)")
    return dist, labels


def true_match_ranks(dist: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1-based rank of each mated probe's own identity (`labels` >= 0), in probe order."""
    dist, labels = _check(dist, labels)
    mated = labels >= 0
    d = dist[mated]
    own = d[np.arange(len(d)), labels[mated]]
    return 1 + np.count_nonzero(d < own[:, None], axis=1)


def cmc_curve(dist: np.ndarray, labels: np.ndarray, max_rank: Optional[int] = None) -> np.ndarray:
    """CMC: element r-1 is the fraction of mated probes with rank <= r, for r = 1..max_rank (default G)."""
    ranks = true_match_ranks(dist, labels)
    max_rank = int(max_rank or np.asarray(dist).shape[1])
    if len(ranks) == 0:
        return np.zeros(max_rank)
    return np.array([np.mean(ranks <= r) for r in range(1, max_rank + 1)])


def threshold_at_rate(impostor: Sequence[float], rate: float) -> float:
    """The largest threshold t with at most ``floor(rate * M)`` of the M `impostor` distances < t.

    inf when `rate` allows all of them (``floor(rate M) >= M``, also when there is none).
    """
    d = np.sort(np.asarray(impostor, dtype=np.float64))
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"false-alarm rate: expected a number in [0, 1], received {rate}")
    allowed = int(np.floor(rate * len(d) + 1e-9))
    return float(d[allowed]) if allowed < len(d) else float("inf")


def _split(dist: np.ndarray, labels: np.ndarray):
    """(own distance of mated probes, whether their own identity is at rank 1, distractors' best)."""
    dist, labels = _check(dist, labels)
    mated = labels >= 0
    d = dist[mated]
    own = d[np.arange(len(d)), labels[mated]]
    rank1 = np.count_nonzero(d < own[:, None], axis=1) == 0
    best_distractor = dist[~mated].min(axis=1) if dist.shape[1] else np.full(np.count_nonzero(~mated), np.inf)
    return own, rank1, best_distractor


def dir_at_fpir(dist: np.ndarray, labels: np.ndarray, fpir_targets: Iterable[float]) -> list[dict]:
    """Open-set DIR at each false-positive identification rate target (rank 1).

    Returns one dict per target: ``fpir_target``, ``threshold`` (`threshold_at_rate` on the
    distractors' best distances), ``fpir`` (achieved), ``dir``, ``n_mated``, ``n_distractors``.
    """
    own, rank1, best = _split(dist, labels)
    out = []
    for target in fpir_targets:
        t = threshold_at_rate(best, float(target))
        out.append({
            "fpir_target": float(target),
            "threshold": t,
            "fpir": float(np.mean(best < t)) if len(best) else 0.0,
            "dir": float(np.mean(rank1 & (own < t))) if len(own) else 0.0,
            "n_mated": int(len(own)),
            "n_distractors": int(len(best)),
        })
    return out


def det_curve(dist: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """FPIR and FNIR (= 1 - DIR) at every distinct distance as threshold (plus 0 and inf)."""
    own, rank1, best = _split(dist, labels)
    thresholds = np.unique(np.concatenate([[0.0], own, best, [np.inf]]))
    best_sorted = np.sort(best)
    accepted = np.sort(own[rank1])
    fpir = np.searchsorted(best_sorted, thresholds, side="left") / max(len(best), 1)
    dir_ = np.searchsorted(accepted, thresholds, side="left") / max(len(own), 1)
    return {"thresholds": thresholds, "fpir": fpir, "fnir": 1.0 - dir_}


def identification_metrics(dist: np.ndarray, labels: np.ndarray, ranks: Sequence[int] = (1, 5, 10),
                           fpir_targets: Sequence[float] = (1e-3, 1e-2, 1e-1)) -> dict:
    """Closed-set rank-k accuracies and CMC, open-set DIR@FPIR: a JSON-ready dict."""
    dist, labels = _check(dist, labels)
    cmc = cmc_curve(dist, labels)
    n_gallery = dist.shape[1]
    return {
        "n_gallery_identities": int(n_gallery),
        "n_mated_probes": int(np.count_nonzero(labels >= 0)),
        "n_distractor_probes": int(np.count_nonzero(labels < 0)),
        "rank_accuracy": {str(r): float(cmc[min(r, n_gallery) - 1]) if n_gallery else 0.0 for r in ranks},
        "cmc": [float(v) for v in cmc],
        "open_set": dir_at_fpir(dist, labels, fpir_targets),
    }


# --------------------------------------------------------------------------- protocol


@dataclasses.dataclass
class Protocol:
    """Three lists of (identity, path): enrolled images, mated probes, distractor probes."""

    gallery: list
    probes: list
    distractors: list

    def identities(self) -> list[str]:
        """Gallery identities in order of first appearance."""
        return list(dict.fromkeys(name for name, _ in self.gallery))


def make_protocol(identity_to_paths: dict, gallery_per_identity: int = 1, seed: int = 0) -> Protocol:
    """Identities with more than `gallery_per_identity` images: that many of them (drawn, seeded)
    enrolled, the rest as probes; every other identity's images: distractors (not enrolled)."""
    if gallery_per_identity < 1:
        raise UserError(f"--gallery-per-identity: expected an integer >= 1, received {gallery_per_identity}")
    rng = np.random.default_rng(seed)
    gallery, probes, distractors = [], [], []
    for name in sorted(identity_to_paths):
        paths = list(identity_to_paths[name])
        if len(paths) > gallery_per_identity:
            chosen = set(rng.choice(len(paths), gallery_per_identity, replace=False).tolist())
            for i, path in enumerate(paths):
                (gallery if i in chosen else probes).append((name, path))
        else:
            distractors.extend((name, path) for path in paths)
    if not gallery:
        raise UserError(f"no identity has more than {gallery_per_identity} image(s): nothing to enrol")
    return Protocol(gallery, probes, distractors)


def lfw_people_fold(people_txt: str, fold: int) -> dict[str, list[str]]:
    """``{name: ["name/name_0001.jpg", ...]}`` of fold `fold` (1-based) of an LFW ``people.txt``."""
    try:
        with open(people_txt, encoding="utf-8") as fh:
            lines = [ln.strip() for ln in fh if ln.strip()]
        n_folds, pos, folds = int(lines[0]), 1, []
        for _ in range(n_folds):
            count = int(lines[pos])
            rows = [ln.split("\t") for ln in lines[pos + 1:pos + 1 + count]]
            folds.append({name: int(n) for name, n in rows})
            pos += 1 + count
    except (OSError, ValueError, IndexError) as exc:
        raise UserError(f"{people_txt}: not an LFW people.txt ({exc.__class__.__name__})") from None
    if not 1 <= fold <= len(folds):
        raise UserError(f"--fold: expected 1..{len(folds)} for {people_txt}, received {fold}")
    return {name: [f"{name}/{name}_{i:04d}.jpg" for i in range(1, n + 1)]
            for name, n in folds[fold - 1].items()}


def write_protocol(protocol: Protocol, folder: str, header: str = "") -> list[str]:
    """Write ``gallery.txt``, ``probes.txt``, ``distractors.txt`` into `folder` (paths as given;
    pass paths relative to the image root); return the three paths."""
    os.makedirs(folder, exist_ok=True)
    written = []
    for name, rows in zip(PROTOCOL_FILES, (protocol.gallery, protocol.probes, protocol.distractors)):
        path = os.path.join(folder, name)
        lines = [f"# {line}" for line in header.splitlines()]
        lines.append(f"# {name}: {len(rows)} images of {len({n for n, _ in rows})} identities")
        lines += [f"{identity}\t{rel}" for identity, rel in rows]
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
        written.append(path)
    return written


def read_protocol(folder: str, root: str) -> Protocol:
    """The protocol files of `folder`, with paths joined to the image `root` (each checked to exist)."""
    lists = []
    for name in PROTOCOL_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise UserError(f"{path}: protocol file not found (expected {', '.join(PROTOCOL_FILES)} in {folder})")
        rows = []
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                line = line.rstrip("\n")
                if not line.strip() or line.startswith("#"):
                    continue
                parts = line.split("\t")
                if len(parts) != 2 or not parts[0] or not parts[1]:
                    raise UserError(f"{path}:{number}: expected 'identity<TAB>path', received {line!r}")
                image = os.path.join(root, parts[1])
                if not os.path.isfile(image):
                    raise UserError(f"{path}:{number}: image not found: {image}")
                rows.append((parts[0], image))
        lists.append(rows)
    protocol = Protocol(*lists)
    if not protocol.gallery:
        raise UserError(f"{folder}/gallery.txt: no image to enrol")
    enrolled = set(protocol.identities())
    bad = [n for n, _ in protocol.distractors if n in enrolled]
    if bad:
        raise UserError(f"{folder}/distractors.txt: {bad[0]} is enrolled in gallery.txt "
                        "(distractors must be people not enrolled)")
    bad = [n for n, _ in protocol.probes if n not in enrolled]
    if bad:
        raise UserError(f"{folder}/probes.txt: {bad[0]} is not enrolled in gallery.txt "
                        "(people not enrolled belong in distractors.txt)")
    return protocol
