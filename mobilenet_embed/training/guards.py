"""Guards on a running training: the non-finite loss / gradient stop and the collapse warning."""

from __future__ import annotations

import math
from typing import Callable, Optional

from mobilenet_embed.errors import UserError


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint."""


def check_finite(step: int, loss: float, grad_norm: float, manager, learning_rate: float,
                 clip_norm: Optional[float]) -> None:
    """Raise `TrainingDiverged` when `loss` or `grad_norm` of `step` is not finite (a non-finite
    gradient would poison the weights the step wrote); the message names the latest checkpoint of
    `manager` (a `mobilenet_embed.checkpoints.CheckpointManager`), which stays intact."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    kept = manager.latest()
    where = (f"the last good checkpoint (step {kept.step}) is intact in {manager.directory}" if kept
             else "no checkpoint was written")
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
    raise TrainingDiverged(
        f"step {step}: {what} (not finite); training stopped, {where}. Try a "
        f"lower train.learning_rate (now {learning_rate:g})"
        + (", or train.clip_norm" if not clip_norm else ""))


class CollapseWatch:
    """Warn once (per run directory: `warned` is checkpointed) when the mean anchor-negative
    distance stays under `distance` for `patience` logging steps in a row."""

    def __init__(self, distance: float, patience: int, warned: bool = False):
        self.distance = float(distance)
        self.patience = int(patience)
        self.warned = bool(warned)
        self.run = 0

    def observe(self, step: int, values: dict, write: Callable[[str], None]) -> None:
        """Feed one logging step's values; `write` prints the warning."""
        if "mean_neg_dist" in values and values["mean_neg_dist"] < self.distance:
            self.run += 1
        else:
            self.run = 0
        if self.run >= self.patience and not self.warned:
            self.warned = True
            write(f"warning: the embedding looks collapsed: mean anchor-negative distance "
                  f"{values['mean_neg_dist']:.2e} < {self.distance:g} for {self.run} "
                  f"logging steps (step {step}); try a lower learning rate or another loss")
