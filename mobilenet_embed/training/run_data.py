"""The run's data: the checked image index, and the validation pairs (``eval.pairs`` or held-out identities)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from mobilenet_embed.config import Config
from mobilenet_embed.errors import UserError


@dataclass
class TrainData:
    """The image index to train on and the validation pairs (with where they come from)."""

    train_index: Any
    val_pairs: list
    val_source: str
    report_lines: list


def validation_pairs(cfg: Config, index, log: Callable[[str], None]) -> tuple[Any, list, str]:
    """(index to train on, validation pairs, where they come from)."""
    from mobilenet_embed.data import split_identities

    if cfg.eval.pairs:
        from mobilenet_embed.pairs import read_pairs

        root = cfg.eval.data or cfg.data.path
        if not root:
            raise UserError("eval.data: required with eval.pairs when data.path is not set (the image "
                            "folder the pairs refer to)")
        pairs = read_pairs(cfg.eval.pairs, root, folds=cfg.eval.pairs_folds)
        return index, pairs, f"{cfg.eval.pairs} ({len(pairs)} pairs)"
    if cfg.data.val_identities <= 0:
        return index, [], "none"
    from mobilenet_embed.pairs import make_pairs

    train_index, val_index = split_identities(index, cfg.data.val_identities, cfg.seed)
    by_identity = {name: paths for name, paths in val_index.identity_to_paths().items() if paths}
    folds = cfg.eval.folds
    sizes = [len(v) for v in by_identity.values()]
    possible_same = sum(n * (n - 1) // 2 for n in sizes)
    possible_diff = (sum(sizes) ** 2 - sum(n * n for n in sizes)) // 2
    n_pairs = min(cfg.train.val_pairs // 2, possible_same, possible_diff)
    n_pairs -= n_pairs % folds
    if len(by_identity) < 2:  # different pairs need two held-out identities
        n_total = len(index.identities)
        advice = (f"raise data.val_identities to at least {2 / n_total:.3g} (2 of {n_total} identities)"
                  if n_total - 2 >= cfg.train.identities_per_batch else
                  f"the {n_total} identities are too few to hold two out beside train.identities_per_batch "
                  f"({cfg.train.identities_per_batch}): set data.val_identities to 0 or give eval.pairs")
        raise UserError(f"data.val_identities: {len(by_identity)} held-out identity gives no different "
                        f"pairs for validation; {advice}")
    if n_pairs < folds:
        raise UserError(f"data.val_identities: the {len(by_identity)} held-out identities "
                        f"({sum(sizes)} images) give too few pairs for {folds}-fold validation; "
                        "raise data.val_identities or set it to 0")
    if n_pairs < cfg.train.val_pairs // 2 - folds:
        log(f"note: held-out identities give {2 * n_pairs} validation pairs, fewer than train.val_pairs "
            f"({cfg.train.val_pairs})")
    pairs = make_pairs(by_identity, n_pairs, n_folds=folds, seed=cfg.seed)
    return train_index, pairs, (f"{len(by_identity)} held-out identities ({2 * n_pairs} pairs)")


def load_data(cfg: Config, log: Callable[[str], None]) -> TrainData:
    """The index (checked), the alignment notes and the validation pairs; `log` prints notes."""
    from mobilenet_embed.align.folder import check_config_alignment
    from mobilenet_embed.data import build_index

    for note in check_config_alignment(cfg.data):  # data.align_* must agree with mbembed align's report
        log(note)
    index, report = build_index(cfg.data, check=True)
    lines = list(report.summary_lines())
    train_index, pairs, source = validation_pairs(cfg, index, log)
    n_ids = len(train_index.identities)
    if n_ids < cfg.train.identities_per_batch:
        raise UserError(f"train.identities_per_batch: {cfg.train.identities_per_batch} identities per batch, "
                        f"but only {n_ids} identities are left to train on")
    return TrainData(train_index, pairs, source, lines)


def worker_batches(cfg: Config, index, start_step: int, info, counters):
    """This worker's P x K batches from `start_step` (`info`: `mobilenet_embed.distribute.WorkerInfo`).

    `pk_batches` draws P identities per worker (distinct identity groups and seeds per worker);
    the global batch is P x K, so each worker asks for its share P / num_workers.
    """
    from mobilenet_embed.data import pk_batches

    tcfg = cfg.train
    worker_cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        tcfg, identities_per_batch=tcfg.identities_per_batch // info.num_workers))
    return pk_batches(worker_cfg, index=index, start_step=start_step, num_replicas=info.local_replicas,
                      worker_index=info.index, num_workers=info.num_workers, counters=counters)
