"""`mbembed eval --protocol identification`: rank-k, CMC and open-set DIR@FPIR of a model.

A protocol (`mobilenet_embed.identification`: gallery, mated probes, distractor probes) is
read from a folder, or drawn from an identity folder (`make_protocol`, seeded by ``seed``) and
written to ``OUT/protocol/``. Every image is embedded once, with the preprocessing (crop,
``eval.flip``) `mbembed enroll` would use; the gallery is built as `mbembed enroll` builds it
(``images`` or ``templates``); distances are exact (`search.identity_distance_matrix`).
Writes ``identification.json``, ``cmc.png``, ``det.png`` and ``probe_ranks.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np

from mobilenet_embed.config import Config
from mobilenet_embed.errors import UserError

FPIR_TARGETS = (1e-3, 1e-2, 1e-1)


@dataclasses.dataclass
class IdentificationResult:
    metrics: dict
    files: dict

    def table(self) -> str:
        m = self.metrics
        rows = [("gallery", f"{m['n_gallery_identities']} identities, {m['n_gallery_images']} images "
                            f"({m['gallery_mode']})"),
                ("probes", f"{m['n_mated_probes']} mated, {m['n_distractor_probes']} distractors"),
                ("rank-1", f"{m['rank_accuracy']['1']:.4f}"),
                ("rank-5", f"{m['rank_accuracy']['5']:.4f}"),
                ("rank-10", f"{m['rank_accuracy']['10']:.4f}")]
        for p in m["open_set"]:
            rows.append((f"DIR@FPIR={p['fpir_target']:g}",
                         f"{p['dir']:.4f} (FPIR {p['fpir']:.4f}, threshold {p['threshold']:.4f})"))
        rows.append(("images", f"{m['n_images']} embedded in {m['seconds']:.1f} s"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def resolve_protocol(cfg: Config, root: str, protocol_dir: Optional[str], make: bool, gallery_per_identity: int,
                     out_dir: str, log: Callable[[str], None]):
    """The protocol of `protocol_dir`, or one drawn from the identity folder `root` and written
    to ``out_dir/protocol`` (paths relative to `root`)."""
    from mobilenet_embed.identification import make_protocol, read_protocol, write_protocol
    from mobilenet_embed.pairs import identity_folders

    if make:
        if protocol_dir:
            raise UserError("--make-id-protocol and --id-protocol exclude each other")
        folders = identity_folders(root)
        rel = {name: [os.path.relpath(p, root) for p in paths] for name, paths in folders.items()}
        protocol = make_protocol(rel, gallery_per_identity, seed=cfg.seed)
        protocol_dir = os.path.join(out_dir, "protocol")
        write_protocol(protocol, protocol_dir, header=f"drawn from {root} by mbembed eval --make-id-protocol, "
                                                      f"seed {cfg.seed}, {gallery_per_identity} gallery image(s) "
                                                      "per identity")
        log(f"drew an identification protocol from {root} (seed {cfg.seed}), written to {protocol_dir}")
    if not protocol_dir:
        raise UserError("--protocol identification: give --id-protocol DIR (gallery.txt, probes.txt, "
                        "distractors.txt) or --make-id-protocol")
    return read_protocol(protocol_dir, root), protocol_dir


def evaluate_identification(cfg: Config, checkpoint: Optional[str] = None, model: Optional[str] = None,
                            protocol: Optional[str] = None, data: Optional[str] = None,
                            out_dir: Optional[str] = None, make_protocol: bool = False,
                            gallery_per_identity: int = 1, gallery_mode: str = "images",
                            fpir_targets: Sequence[float] = FPIR_TARGETS, align: bool = False,
                            log: Callable[[str], None] = lambda line: None) -> IdentificationResult:
    """Identification metrics of a checkpoint or exported model on a protocol (see the module doc).
    `align`: the images are raw photos, aligned on the fly as `mbembed enroll --align` does
    (`gallery.load_model`); photos without a face are centre-cropped and counted in
    ``identification.json["align"]``."""
    from mobilenet_embed.evaluate import _default_out_dir
    from mobilenet_embed.atomic import atomic_write
    from mobilenet_embed.gallery import Gallery, add_to_gallery, embed_images, load_model
    from mobilenet_embed.identification import det_curve, identification_metrics
    from mobilenet_embed.identification_plots import plot_cmc, plot_det
    from mobilenet_embed.search import identity_distance_matrix

    if (checkpoint is None) == (model is None):
        raise UserError("mbembed eval: give exactly one of --checkpoint PATH and --model PATH")
    root = data or cfg.eval.data or cfg.data.path
    if not root or not os.path.isdir(root):
        raise UserError(f"eval.data: image folder not found: {root} (give --data DIR)")
    out_dir = out_dir or os.path.join(_default_out_dir(cfg, checkpoint, model), "identification")
    os.makedirs(out_dir, exist_ok=True)
    proto, protocol_dir = resolve_protocol(cfg, root, protocol, make_protocol, gallery_per_identity, out_dir, log)

    source = checkpoint or model
    loaded = load_model(cfg, source, align=align, log=log)
    everything = [p for _, p in proto.gallery + proto.probes + proto.distractors]
    unique = list(dict.fromkeys(everything))
    info = loaded.info
    log(f"embedding {len(unique)} images with {info['kind']} model {source} ({info['image_size']}x"
        f"{info['image_size']}, crop {info['crop_fraction']:g}{', flip' if info['flip'] else ''}"
        f"{', aligned on the fly' if align else ''})")
    start = time.perf_counter()
    emb = embed_images(loaded, unique, cfg.eval.batch_size)
    seconds = time.perf_counter() - start
    if loaded.align_counts is not None:
        log(loaded.align_line())
    by_path = dict(zip(unique, emb))

    gallery = Gallery(np.zeros((0, info["embedding_size"]), np.float32), [], gallery_mode, info)
    add_to_gallery(gallery, proto.gallery, np.stack([by_path[p] for _, p in proto.gallery]))
    row_labels, names = gallery.labels()
    position = {n: i for i, n in enumerate(names)}
    probes = proto.probes + proto.distractors
    labels = np.array([position[n] for n, _ in proto.probes] + [-1] * len(proto.distractors), np.int64)
    queries = np.stack([by_path[p] for _, p in probes])
    dist = identity_distance_matrix(gallery.embeddings, row_labels, queries, len(names), info["distance"])

    metrics = identification_metrics(dist, labels, ranks=(1, 5, 10), fpir_targets=fpir_targets)
    metrics.update({"model": str(source), "model_kind": info["kind"], "model_sha256": info["sha256"],
                    "protocol": protocol_dir, "image_root": root, "gallery_mode": gallery_mode,
                    "n_gallery_images": len(proto.gallery), "distance": info["distance"],
                    "image_size": info["image_size"], "crop_fraction": info["crop_fraction"], "flip": info["flip"],
                    "n_images": len(unique), "seconds": round(seconds, 2), "align": loaded.align_summary()})
    det = det_curve(dist, labels)
    files = {name: os.path.join(out_dir, name) for name in
             ("identification.json", "cmc.png", "det.png", "probe_ranks.csv")}
    name = os.path.basename(os.path.normpath(str(source)))

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({**metrics, "det": {k: [float(x) for x in v] for k, v in det.items()}}, fh, indent=1)

    atomic_write(files["identification.json"], write_json)
    atomic_write(files["cmc.png"], lambda tmp: plot_cmc(metrics["cmc"], tmp, title=f"CMC: {name}"))
    atomic_write(files["det.png"], lambda tmp: plot_det(det["fpir"], det["fnir"], tmp, title=f"DET: {name}",
                                                        points=metrics["open_set"]))
    atomic_write(files["probe_ranks.csv"], lambda tmp: _write_probe_csv(tmp, probes, labels, dist, names))
    return IdentificationResult(metrics, files)


def _write_probe_csv(path: str, probes: list, labels: np.ndarray, dist: np.ndarray, names: list) -> None:
    """One row per probe: path, identity, mated, rank of its own identity, best identity and distance."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["probe", "identity", "mated", "rank", "own_distance", "best_identity", "best_distance"])
        for (name, path_), label, row in zip(probes, labels, dist):
            best = int(np.argmin(row))
            if label >= 0:
                rank, own = int(1 + np.count_nonzero(row < row[label])), repr(float(row[label]))
            else:
                rank, own = "", ""
            writer.writerow([path_, name, int(label >= 0), rank, own, names[best], repr(float(row[best]))])
