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
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Optional

from mobilenet_embed import atomic
from mobilenet_embed.config import Config
from mobilenet_embed.errors import UserError
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

    def table(self) -> str:
        """The short table `mbembed eval` prints."""
        m = self.metrics
        rows = [
            ("pairs", f"{self.n_pairs} ({m['n_same']} same, {m['n_diff']} different), {m['n_folds']} folds"),
            ("accuracy", f"{m['accuracy']:.4f} +- {m['accuracy_std']:.4f}"),
            (f"VAL@FAR={m['far_target']:g}", f"{m['val']:.4f} +- {m['val_std']:.4f} (FAR {m['far']:.5f})"),
            ("AUC", f"{m['auc']:.4f}"),
            ("EER", f"{m['eer']:.4f}"),
            ("threshold", f"{m['threshold']:.4f} ({m['distance']})"),
            ("images", f"{self.n_images} embedded in {self.seconds:.1f} s "
                       f"({self.images_per_second:.1f} img/s)"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


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
                  out_dir: str, log: Callable[[str], None]) -> tuple[list, str]:
    """The pairs to verify: a pairs file (LFW View 1 / View 2 or mbembed format), or `make_pairs_n`
    same and as many different pairs drawn (seeded by `cfg.seed`) from the identity folders of
    `root`, written to `out_dir/pairs.txt` for reuse. Which folds of which file are used is
    logged (`pairs_folds_for`)."""
    from mobilenet_embed.pairs import identity_folders, make_pairs, read_pairs, write_pairs

    if make_pairs_n is not None:
        if pairs_file:
            raise UserError("--make-pairs and --pairs (or eval.pairs) exclude each other: "
                            "--make-pairs draws new pairs")
        folders = identity_folders(root)
        pairs = make_pairs(folders, make_pairs_n, n_folds=cfg.eval.folds, seed=cfg.seed)
        written = os.path.join(out_dir, "pairs.txt")
        fmt = write_pairs(pairs, written, root, n_folds=cfg.eval.folds)
        log(f"drew {make_pairs_n} same and {make_pairs_n} different pairs from {root} "
            f"(seed {cfg.seed}), written to {written} ({fmt} format)")
        return read_pairs(written, root), written
    if not pairs_file:
        raise UserError("eval.pairs: no pairs file (give --pairs FILE, set eval.pairs, "
                        "or draw pairs with --make-pairs N)")
    if not os.path.isfile(pairs_file):
        raise UserError(f"{pairs_file}: pairs file not found")
    folds = pairs_folds_for(cfg, pairs_file, log)
    pair_list = read_pairs(pairs_file, root, folds=folds)
    which = f"folds {', '.join(map(str, folds))} (eval.pairs_folds)" if folds else "all folds"
    log(f"pairs: {pairs_file}, {which}: {len(pair_list)} pairs")
    return pair_list, pairs_file


def evaluate(cfg: Config, checkpoint: Optional[str] = None, model: Optional[str] = None,
             pairs: Optional[str] = None, pairs_root: Optional[str] = None, out_dir: Optional[str] = None,
             make_pairs: Optional[int] = None, num_threads: Optional[int] = None, align: bool = False,
             log: Callable[[str], None] = lambda line: None) -> EvalResult:
    """Verify pairs with a checkpoint (`checkpoint`: file, checkpoint dir or run dir) or an
    exported model (`model`: SavedModel dir, `.tflite` or `.keras`) and write the results.

    The pairs are `pairs` (else `cfg.eval.pairs`) under the image root `pairs_root` (else
    `cfg.eval.data`, else `cfg.data.path`), or `make_pairs` pairs drawn from that root.
    Writes `metrics.json`, `roc.png` and `pair_distances.csv` into `out_dir` (default: the
    run directory's `eval/` folder). Images are preprocessed as the model records
    (`model_data_config`); `align`: the images are raw photos, aligned on the fly to the
    model's ``data.align_template`` / ``data.align_size`` (photos without a face are
    centre-cropped, counted in ``metrics.json["align"]``).
    """
    from mobilenet_embed.align.inference import align_line, align_summary, aligned_source
    from mobilenet_embed.preprocessing_metadata import model_data_config
    from mobilenet_embed.embedders import load_embedder
    from mobilenet_embed.verification import evaluate_pairs
    from mobilenet_embed.pairs import write_pair_distances_csv
    from mobilenet_embed.plots import plot_roc_from_metrics

    if (checkpoint is None) == (model is None):
        raise UserError("mbembed eval: give exactly one of --checkpoint PATH and --model PATH")
    root = pairs_root or cfg.eval.data or cfg.data.path
    if not root:
        raise UserError("eval.data: no image folder for the pairs (give --pairs-root DIR, set eval.data or data.path)")
    if not os.path.isdir(root):
        raise UserError(f"{root}: image folder not found")
    out_dir = out_dir or _default_out_dir(cfg, checkpoint, model)
    os.makedirs(out_dir, exist_ok=True)

    source = checkpoint or model
    embedder = load_embedder(source, cfg, num_threads=num_threads, batch_size=cfg.eval.batch_size)
    pair_list, pairs_file = resolve_pairs(cfg, root, pairs or cfg.eval.pairs, make_pairs, out_dir, log)
    if len(pair_list) < cfg.eval.folds:
        raise UserError(f"{pairs_file}: {len(pair_list)} pairs cannot make {cfg.eval.folds} folds (eval.folds)")
    data_cfg = dataclasses.replace(model_data_config(cfg, embedder, log), source="folder", path=root,
                                   augment=False)
    crop = data_cfg.crop_fraction
    batches, counts = aligned_source(data_cfg, align, cfg.eval.batch_size, log)
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
                    "align": None if counts is None else align_summary(data_cfg, counts)})
    files = {name: os.path.join(out_dir, name) for name in ("metrics.json", "roc.png", "pair_distances.csv")}

    atomic.write_json(files["metrics.json"], summary, indent=2)
    atomic.atomic_write(files["roc.png"], lambda tmp: plot_roc_from_metrics(
        metrics, tmp, title=f"ROC: {os.path.basename(os.path.normpath(str(source)))} on {os.path.basename(pairs_file)}"))
    atomic.atomic_write(files["pair_distances.csv"], lambda tmp: write_pair_distances_csv(
        tmp, pair_list, distances, metrics["threshold"]))
    return EvalResult(metrics=summary, out_dir=out_dir, files=files, model=str(source),
                      pairs_file=str(pairs_file), n_pairs=len(pair_list), n_images=n_images,
                      seconds=seconds, images_per_second=n_images * (2 if cfg.eval.flip else 1) / max(seconds, 1e-9))

