"""`mbembed eval`: face verification of a checkpoint or an exported model on pairs (LFW protocol).

One code path for every kind of model: `embedders.load_embedder` gives an Embedder for a
checkpoint, a run directory, a `.keras` file, a SavedModel or a `.tflite` file; each distinct
image is decoded and embedded once (`verification.evaluate_pairs`); `metrics.verification_metrics`
computes the numbers exactly as FaceNet's `lfw.py`. Results go to `metrics.json`, `roc.png` and
`pair_distances.csv`.

Images are preprocessed as the model records (`preprocessing_metadata.model_data_config`: an
exported file's own metadata, a checkpoint's run config, with ``--set data.*`` applied and
reported); with ``align=True`` raw photos are aligned on the fly first
(`align.inference.aligned_batches`, the code of `mbembed align`).

Unreadable images never stop an evaluation: ``--make-pairs`` draws only images that pass the
decode check of ``mbembed data check`` (`pairs.readable_identity_folders`), and a pair of a pairs
file that names an unreadable image is skipped (`pairs.drop_unreadable_pairs`; ``strict_pairs``
refuses instead);
both are counted in the table and in `metrics.json`. A failed evaluation leaves no ``--out``
folder it created (`mobilenet_embed.out_folder.created_folder`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Optional

from mobilenet_embed import atomic
from mobilenet_embed.config import Config
from mobilenet_embed.errors import UserError
from mobilenet_embed.out_folder import created_folder
from mobilenet_embed.records import jsonable


@dataclasses.dataclass
class EvalResult:
    """What `evaluate` measured and where it wrote it."""

    metrics: dict  # JSON-ready: accuracy, accuracy_std, val, val_std, far, auc, eer, threshold, ...
    out_dir: str
    files: dict
    model: str
    pairs_file: str
    n_pairs: int
    n_images: int
    seconds: float
    images_per_second: float
    image_root: str = ""
    skipped_pairs: list = dataclasses.field(default_factory=list)  # [{"line", "image", "reason"}]
    left_out_images: list = dataclasses.field(default_factory=list)  # [(path, reason)], --make-pairs

    def table(self) -> str:
        """The short table `mbembed eval` prints."""
        m = self.metrics
        rows = [
            ("pairs", f"{self.n_pairs} ({m['n_same']} same, {m['n_diff']} different), {m['n_folds']} folds"),
            ("accuracy", f"{m['accuracy']:.4f} +- {m['accuracy_std']:.4f}"),
            (f"VAL@FAR={m['far_target']:g}", val_cell(m)),
            ("AUC", f"{m['auc']:.4f}"),
            ("EER", f"{m['eer']:.4f}"),
            ("threshold", f"{m['threshold']:.4f} ({m['distance']})"),
            ("images", f"{self.n_images} embedded in {self.seconds:.1f} s "
                       f"({self.images_per_second:.1f} img/s)"),
        ]
        from mobilenet_embed.pairs import left_out_text, skipped_pairs_text

        if self.skipped_pairs:
            rows.append(("skipped", skipped_pairs_text(self.skipped_pairs, self.image_root)))
        if self.left_out_images:
            rows.append(("not drawn", left_out_text(self.left_out_images, self.image_root)))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def val_cell(metrics: dict) -> str:
    """The VAL@FAR cell of the table: ``0.9800 +- 0.0100 (FAR 0.00100)``, or ``n/a`` with the
    reason when the pairs hold too few different pairs to measure that FAR (`val_defined`)."""
    if metrics.get("val_defined", True):
        return f"{metrics['val']:.4f} +- {metrics['val_std']:.4f} (FAR {metrics['far']:.5f})"
    return (f"n/a: too few pairs (needs >= {int(metrics['val_different_pairs_needed']):,} different pairs, "
            f"has {metrics['n_diff']:,})")


def _default_out_dir(cfg: Config, checkpoint: Optional[str], model: Optional[str]) -> str:
    """The run directory of a checkpoint (else the config's run_dir), subfolder `eval`."""
    from mobilenet_embed.checkpoints import run_config_path

    source = checkpoint or model
    found = run_config_path(source) if source else None
    run_dir = os.path.dirname(found) if found else cfg.run_dir
    return os.path.join(run_dir, "eval")


def pairs_folds_for(cfg: Config, pairs_file: str, log: Callable[[str], None]) -> Optional[list]:
    """The folds of `pairs_file` to use: ``eval.pairs_folds`` when it was written for that file
    (it is the config's ``eval.pairs``, or the config names none) or given with ``--set``; else
    all folds, and a line to `log` says why the config's selection is not used."""
    from mobilenet_embed.config import given_settings

    folds = cfg.eval.pairs_folds
    if folds is None or "eval.pairs_folds" in given_settings(cfg)["set"] or not cfg.eval.pairs:
        return folds
    if os.path.abspath(cfg.eval.pairs) == os.path.abspath(pairs_file):
        return folds
    log(f"note: eval.pairs_folds {list(folds)} selects folds of the config's eval.pairs ({cfg.eval.pairs}), "
        f"not of {pairs_file}: all its folds are used (--set eval.pairs_folds=[...] to select some)")
    return None


def resolve_pairs(cfg: Config, root: str, pairs_file: Optional[str], make_pairs_n: Optional[int],
                  out_dir: str, log: Callable[[str], None], strict_pairs: bool = False
                  ) -> tuple[list, str, list[dict], list[tuple[str, str]]]:
    """The pairs to verify, their file, the pairs skipped and the images not drawn for being
    unreadable: a pairs file (LFW View 1 / View 2 or mbembed format; a pair naming an unreadable
    image skipped, or with `strict_pairs` refused: `pairs.drop_unreadable_pairs`), or
    `make_pairs_n` same and as many different pairs drawn (seeded by `cfg.seed`) from the
    readable images of the identity folders of `root` (`pairs.readable_identity_folders`),
    written to `out_dir/pairs.txt` for reuse."""
    from mobilenet_embed.pairs import (drop_unreadable_pairs, left_out_text, make_pairs, read_pairs,
                                       readable_identity_folders, skipped_pairs_text, write_pairs)

    if make_pairs_n is not None:
        if pairs_file:
            raise UserError("--make-pairs and --pairs (or eval.pairs) exclude each other: "
                            "--make-pairs draws new pairs")
        if strict_pairs:
            raise UserError("--strict-pairs applies to a pairs file: --make-pairs draws readable images only")
        folders, left_out = readable_identity_folders(cfg.data, root)
        if left_out:
            log(f"not drawn: {left_out_text(left_out, root)}")
        pairs = make_pairs(folders, make_pairs_n, n_folds=cfg.eval.folds, seed=cfg.seed)
        written = os.path.join(out_dir, "pairs.txt")
        fmt = write_pairs(pairs, written, root, n_folds=cfg.eval.folds)
        log(f"drew {make_pairs_n} same and {make_pairs_n} different pairs from {root} "
            f"(seed {cfg.seed}), written to {written} ({fmt} format)")
        return read_pairs(written, root), written, [], left_out
    if not pairs_file:
        raise UserError("eval.pairs: no pairs file (give --pairs FILE, set eval.pairs, "
                        "or draw pairs with --make-pairs N)")
    if not os.path.isfile(pairs_file):
        raise UserError(f"{pairs_file}: pairs file not found")
    folds = pairs_folds_for(cfg, pairs_file, log)
    pairs, skipped = drop_unreadable_pairs(read_pairs(pairs_file, root, folds=folds), root,
                                           pairs_file, strict_pairs, cfg.data.check_cache)
    which = f"folds {', '.join(map(str, folds))} (eval.pairs_folds)" if folds else "all folds"
    log(f"pairs: {pairs_file}, {which}: {len(pairs)} pairs")
    if skipped:
        log(f"skipped {skipped_pairs_text(skipped, root)} (--strict-pairs refuses such pairs)")
    return pairs, pairs_file, skipped, []


def evaluate(cfg: Config, checkpoint: Optional[str] = None, model: Optional[str] = None,
             pairs: Optional[str] = None, pairs_root: Optional[str] = None, out_dir: Optional[str] = None,
             make_pairs: Optional[int] = None, num_threads: Optional[int] = None, align: bool = False,
             strict_pairs: bool = False, log: Callable[[str], None] = lambda line: None) -> EvalResult:
    """Verify pairs with a checkpoint (`checkpoint`: file, checkpoint dir or run dir) or an
    exported model (`model`: SavedModel dir, `.tflite` or `.keras`) and write the results.

    The pairs are `pairs` (else `cfg.eval.pairs`) under the image root `pairs_root` (else
    `cfg.eval.data`, else `cfg.data.path`), or `make_pairs` pairs drawn from that root.
    A pair naming an unreadable image is skipped and counted (`strict_pairs`: an error).
    Writes `metrics.json`, `roc.png` and `pair_distances.csv` into `out_dir` (default: the
    run directory's `eval/` folder); `out_dir` must be a folder, and one this call creates is
    removed again when the evaluation fails. Images are preprocessed as the model records
    (`model_data_config`); `align`: the images are raw photos, aligned on the fly to the
    model's ``data.align_template`` / ``data.align_size`` (photos without a face are
    centre-cropped, counted in ``metrics.json["align"]``).
    """
    if (checkpoint is None) == (model is None):
        raise UserError("mbembed eval: give exactly one of --checkpoint PATH and --model PATH")
    root = pairs_root or cfg.eval.data or cfg.data.path
    if not root:
        raise UserError("eval.data: no image folder for the pairs (give --pairs-root DIR, set eval.data or data.path)")
    if not os.path.isdir(root):
        raise UserError(f"{root}: image folder not found")
    out_dir = out_dir or _default_out_dir(cfg, checkpoint, model)
    with created_folder(out_dir):
        return _evaluate_into(cfg, checkpoint or model, root, pairs or cfg.eval.pairs, out_dir, make_pairs,
                              num_threads, align, strict_pairs, log)


def _evaluate_into(cfg: Config, source: str, root: str, pairs: Optional[str], out_dir: str,
                   make_pairs: Optional[int], num_threads: Optional[int], align: bool, strict_pairs: bool,
                   log: Callable[[str], None]) -> EvalResult:
    """`evaluate` once the image root and the output folder are settled."""
    from mobilenet_embed.align.inference import align_line, align_summary, aligned_source
    from mobilenet_embed.preprocessing_metadata import model_data_config
    from mobilenet_embed.embedders import load_embedder
    from mobilenet_embed.verification import evaluate_pairs
    from mobilenet_embed.pairs import write_pair_distances_csv
    from mobilenet_embed.plots import plot_roc_from_metrics

    embedder = load_embedder(source, cfg, num_threads=num_threads, batch_size=cfg.eval.batch_size)
    pair_list, pairs_file, skipped, left_out = resolve_pairs(cfg, root, pairs, make_pairs, out_dir, log,
                                                             strict_pairs)
    if len(pair_list) < cfg.eval.folds:
        raise UserError(f"{pairs_file}: {len(pair_list)} pairs cannot make {cfg.eval.folds} folds (eval.folds)"
                        + (f" ({len(skipped)} skipped for unreadable images)" if skipped else ""))
    data_cfg = dataclasses.replace(model_data_config(cfg, embedder, log), source="folder", path=root,
                                   augment=False)
    crop = data_cfg.crop_fraction
    # the pairs' images were decode-checked when the pairs were read (drop_unreadable_pairs) or drawn
    batches, counts = aligned_source(data_cfg, align, cfg.eval.batch_size, log, check=False)
    n_images = len({p for pair in pair_list for p in (pair.path_a, pair.path_b)})
    log(f"embedding {n_images} images of {len(pair_list)} pairs with {embedder.kind} model {source} "
        f"({embedder.image_size}x{embedder.image_size}, crop {crop:g}{', flip' if cfg.eval.flip else ''}"
        f"{', aligned on the fly' if align else ''})")
    start = time.perf_counter()
    metrics = evaluate_pairs(embedder, data_cfg, pair_list, batch_size=cfg.eval.batch_size,
                             flip=cfg.eval.flip, n_folds=cfg.eval.folds, far_target=cfg.eval.far_target,
                             distance=cfg.eval.distance, batches=batches)
    seconds = time.perf_counter() - start
    if counts is not None:
        log(align_line(align_summary(data_cfg, counts)))

    distances = metrics.pop("distances")
    metrics.pop("issame")
    summary = jsonable(metrics)
    summary.update({"model": str(source), "model_kind": embedder.kind, "pairs_file": str(pairs_file),
                    "image_root": str(root), "image_size": embedder.image_size, "crop_fraction": crop,
                    "flip": cfg.eval.flip, "n_images": n_images, "seconds": round(seconds, 2),
                    "n_skipped_pairs": len(skipped), "skipped_pairs": skipped,
                    "unreadable_images_not_drawn": [{"image": p, "reason": r} for p, r in left_out],
                    "align": None if counts is None else align_summary(data_cfg, counts)})
    files = {name: os.path.join(out_dir, name) for name in ("metrics.json", "roc.png", "pair_distances.csv")}

    atomic.write_json(files["metrics.json"], summary, indent=2)
    atomic.atomic_write(files["roc.png"], lambda tmp: plot_roc_from_metrics(
        metrics, tmp, title=f"ROC: {os.path.basename(os.path.normpath(str(source)))} on {os.path.basename(pairs_file)}"))
    atomic.atomic_write(files["pair_distances.csv"], lambda tmp: write_pair_distances_csv(
        tmp, pair_list, distances, metrics["threshold"]))
    return EvalResult(metrics=summary, out_dir=out_dir, files=files, model=str(source),
                      pairs_file=str(pairs_file), n_pairs=len(pair_list), n_images=n_images,
                      seconds=seconds, images_per_second=n_images * (2 if cfg.eval.flip else 1) / max(seconds, 1e-9),
                      image_root=str(root), skipped_pairs=skipped, left_out_images=left_out)
