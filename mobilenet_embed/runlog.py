"""Training progress and logs: tqdm bar or plain lines, TensorBoard events, metrics.jsonl.

- On a terminal (``stream.isatty()``): one tqdm bar per epoch showing loss, active-triplet
  fraction, images/s and the ETA. Elsewhere (batch jobs, pipes, CliRunner): one plain line
  every ``train.log_every_steps`` steps::

    step 120/1000 epoch 2/10 loss 0.1523 active 0.412 pos 0.611 neg 1.240 lr 1.0e-03 img/s 412.3 eta 0:03:05

- ``<run_dir>/metrics.jsonl``: one JSON object per logging step (``"kind": "train"``) and per
  validation (``"kind": "validation"``). On resume, lines past the resumed step (written after
  the checkpoint a killed run restarts from) are dropped, so every step appears once.
- ``<run_dir>/tensorboard``: the same scalars as TensorBoard events (``train/...``, ``val/...``).

Only the chief writes files; other workers log nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import IO, Optional

from mobilenet_embed.atomic import write_text
from mobilenet_embed.records import jsonable

TRAIN_KEYS = ("loss", "head_loss", "head_weight", "triplet_loss", "margin", "active_fraction", "mean_pos_dist",
              "mean_neg_dist", "embedding_spread", "learning_rate", "grad_norm", "images_per_second")
VAL_KEYS = ("accuracy", "accuracy_std", "val", "far", "auc", "eer", "threshold")


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (``1:02:03``)."""
    seconds = int(round(max(seconds, 0.0)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def plain_line(step: int, total: int, epoch: int, epochs: int, values: dict, eta: Optional[float]) -> str:
    """The non-terminal log line of one logging step."""
    parts = [f"step {step}/{total}", f"epoch {epoch}/{epochs}", f"loss {values['loss']:.4f}"]
    if "head_loss" in values and "triplet_loss" in values:
        weight = f" x {values['head_weight']:.2f}" if "head_weight" in values else ""
        parts.append(f"(head {values['head_loss']:.4f}{weight} triplet {values['triplet_loss']:.4f})")
    if "margin" in values:
        parts.append(f"margin {values['margin']:.3f}")
    if "active_fraction" in values:
        parts.append(f"active {values['active_fraction']:.3f}")
    if "mean_pos_dist" in values:
        parts.append(f"pos {values['mean_pos_dist']:.3f}")
    if "mean_neg_dist" in values:
        parts.append(f"neg {values['mean_neg_dist']:.3f}")
    if "learning_rate" in values:
        parts.append(f"lr {values['learning_rate']:.1e}")
    if "images_per_second" in values:
        parts.append(f"img/s {values['images_per_second']:.1f}")
    if eta is not None:
        parts.append(f"eta {format_duration(eta)}")
    return " ".join(parts)


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drop the lines of `path` whose ``step`` is past `last_step` (after a resume)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                if int(json.loads(line).get("step", 0)) > last_step:
                    continue
            except (ValueError, AttributeError):
                continue  # a line cut short by a kill
            kept.append(line if line.endswith("\n") else line + "\n")
    write_text(path, "".join(kept))


class RunLog:
    """Progress display plus metrics.jsonl and TensorBoard, for steps `start_step+1 .. total_steps`."""

    def __init__(self, run_dir: Optional[str], total_steps: int, steps_per_epoch: int, start_step: int,
                 log_every: int, is_chief: bool = True, stream: Optional[IO[str]] = None,
                 tty: Optional[bool] = None):
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(tty if tty is not None else (hasattr(self.stream, "isatty") and self.stream.isatty()))
        self.is_chief = is_chief
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.epochs = max(1, math.ceil(total_steps / steps_per_epoch))
        self.log_every = log_every
        self._bar = None
        self._bar_epoch = None
        self._writer = None
        self._jsonl: Optional[IO[str]] = None
        self._t0 = time.perf_counter()
        self._start_step = start_step
        self._seconds_per_step: Optional[float] = None
        self._postfix: dict = {}
        if run_dir is not None and is_chief:
            import tensorflow as tf

            path = os.path.join(run_dir, "metrics.jsonl")
            truncate_jsonl(path, start_step)
            self._jsonl = open(path, "a", encoding="utf-8")
            self._writer = tf.summary.create_file_writer(os.path.join(run_dir, "tensorboard"))

    # ------------------------------------------------------------------ display

    def epoch_of(self, step: int) -> int:
        """1-based epoch that step `step` (1-based) belongs to."""
        return (max(step, 1) - 1) // self.steps_per_epoch + 1

    def eta(self, step: int) -> Optional[float]:
        """Seconds left at the measured time per step (None before it is measured)."""
        if not self._seconds_per_step:
            return None
        return (self.total_steps - step) * self._seconds_per_step

    def write(self, text: str) -> None:
        """A message that does not break the progress bar."""
        if not self.is_chief:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def advance(self, step: int, seconds_per_step: Optional[float] = None) -> None:
        """Step `step` (1-based) finished; `seconds_per_step` measured so far (for the ETA)."""
        self._seconds_per_step = seconds_per_step
        if not (self.tty and self.is_chief):
            return
        epoch = self.epoch_of(step)
        if self._bar is None or self._bar_epoch != epoch:
            self._close_bar()
            from tqdm import tqdm

            done_before = (epoch - 1) * self.steps_per_epoch
            total = min(self.steps_per_epoch, self.total_steps - done_before)
            import shutil

            # a terminal that reports 0 columns (some ptys) would get an empty bar
            sized = shutil.get_terminal_size((0, 0)).columns > 0
            self._bar = tqdm(total=total, initial=step - 1 - done_before, desc=f"epoch {epoch}/{self.epochs}",
                             file=self.stream, dynamic_ncols=sized, ncols=None if sized else 110,
                             nrows=None if sized else 40, leave=True,
                             unit="step")
            self._bar_epoch = epoch
        self._bar.update(1)
        if self._postfix:
            self._bar.set_postfix(self._postfix, refresh=False)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------ logging steps

    def log_train(self, step: int, values: dict) -> None:
        """One logging step: metrics.jsonl, TensorBoard, and the bar's postfix or a plain line."""
        if not self.is_chief:
            return
        epoch = self.epoch_of(step)
        record = {"kind": "train", "step": step, "epoch": epoch,
                  "time": round(time.perf_counter() - self._t0, 3)}
        self._record(record, "train", step, {k: float(v) for k, v in values.items()})
        if self.tty:
            self._postfix = {"loss": f"{values['loss']:.4f}"}
            if "active_fraction" in values:
                self._postfix["active"] = f"{values['active_fraction']:.3f}"
            if "images_per_second" in values:
                self._postfix["img/s"] = f"{values['images_per_second']:.1f}"
            if self._bar is not None:
                self._bar.set_postfix(self._postfix)
        else:
            print(plain_line(step, self.total_steps, epoch, self.epochs, values,
                             self.eta(step)), file=self.stream, flush=True)

    def _record(self, record: dict, tag: str, step: int, values: dict) -> None:
        """One metrics.jsonl line (`record` plus `values`) and the same scalars under `tag/` in
        TensorBoard."""
        record.update({k: jsonable(v) for k, v in values.items()})
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._writer is not None:
            import tensorflow as tf

            with self._writer.as_default(step=step):
                for key, value in values.items():
                    tf.summary.scalar(f"{tag}/{key}", value)

    def log_validation(self, step: int, metrics: dict, seconds: float, n_pairs: int) -> None:
        if not self.is_chief:
            return
        values = {k: float(metrics[k]) for k in VAL_KEYS if k in metrics}
        record = {"kind": "validation", "step": step, "epoch": self.epoch_of(step),
                  "time": round(time.perf_counter() - self._t0, 3), "pairs": n_pairs,
                  "seconds": round(seconds, 3)}
        self._record(record, "val", step, values)
        if self._writer is not None:
            self._writer.flush()
        line = (f"validation step {step} epoch {self.epoch_of(step)}: accuracy "
                f"{values.get('accuracy', float('nan')):.4f} +- {values.get('accuracy_std', float('nan')):.4f}")
        if "val" in values:
            from mobilenet_embed.metrics import val_text

            line += ", " + val_text({**metrics, **values})
        if "auc" in values:
            line += f", AUC {values['auc']:.4f}"
        line += f" ({n_pairs} pairs, {seconds:.1f} s)"
        self.write(line)

    def close(self) -> None:
        self._close_bar()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
