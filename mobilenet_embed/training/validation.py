"""Validation during training: score the pairs, log them, keep the best checkpoint by accuracy."""

from __future__ import annotations

import time
from typing import Optional

from mobilenet_embed.config import Config

SCALARS = ("accuracy", "accuracy_std", "val", "val_std", "far", "auc", "eer", "threshold", "far_target",
           "val_defined", "val_different_pairs_needed")


class Validator:
    """Scores `pairs` with the model; the best accuracy so far is saved with ``manager.save_best``.

    The tracked values (``best_accuracy``, ``best_step``, ``best_metrics``, ``last_validation``)
    come from and go to the checkpoint's state (`state`), so a resumed run goes on comparing
    with the best of the earlier ones.
    """

    def __init__(self, cfg: Config, model, pairs: list, manager, log, state: Optional[dict] = None):
        state = state or {}
        self.cfg, self.model, self.pairs, self.manager, self.log = cfg, model, pairs, manager, log
        self.best_accuracy = state.get("best_accuracy")
        self.best_step = state.get("best_step")
        self.best_metrics = state.get("best_metrics")
        self.last = state.get("last_validation")

    def state(self) -> dict:
        """What a checkpoint records of the validations so far."""
        return {"best_accuracy": self.best_accuracy, "best_step": self.best_step, "best_metrics": self.best_metrics,
                "last_validation": self.last}

    def due(self, step: int, total_steps: int, steps_per_epoch: int) -> bool:
        """Whether `step` ends an epoch on which validation runs (every ``train.val_every_epochs``, and the last)."""
        if step % steps_per_epoch and step != total_steps:
            return False
        epoch = (step - 1) // steps_per_epoch + 1
        return epoch % self.cfg.train.val_every_epochs == 0 or step == total_steps

    def __call__(self, step: int) -> Optional[dict]:
        """Validate at `step` (None without pairs); a new best accuracy writes the best checkpoint."""
        if not self.pairs:
            return None
        from mobilenet_embed.verification import evaluate_pairs

        ev = self.cfg.eval
        t0 = time.perf_counter()
        metrics = evaluate_pairs(self.model, self.cfg.data, self.pairs, batch_size=ev.batch_size, flip=ev.flip,
                                 n_folds=ev.folds, far_target=ev.far_target, distance=ev.distance)
        seconds = time.perf_counter() - t0
        scalars = {k: float(metrics[k]) for k in SCALARS if k in metrics}
        scalars["step"] = step
        self.log.log_validation(step, scalars, seconds, len(self.pairs))
        self.last = scalars
        if self.best_accuracy is None or scalars["accuracy"] > self.best_accuracy:
            self.best_accuracy, self.best_step, self.best_metrics = scalars["accuracy"], step, scalars
            self.manager.save_best(step, scalars)
        return scalars
