"""The step loop: batches through the train step, logging, guards, validation and checkpoints,
until the last step or a stop signal."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from mobilenet_embed.records import jsonable
from mobilenet_embed.training.guards import CollapseWatch, check_finite
from mobilenet_embed.training.setup import head_state


@dataclass
class Throughput:
    """Step timing. The first call of each step variant (with / without statistics) includes its
    tracing and is not timed; `window_*` count since the last logging step."""

    batch_images: int  # global batch
    seconds: float = 0.0
    steps: int = 0
    window_steps: int = 0
    window_seconds: float = 0.0
    traced: set = field(default_factory=set)

    def add(self, variant: bool, seconds: float) -> None:
        if variant in self.traced:
            self.seconds += seconds
            self.steps += 1
            self.window_steps += 1
            self.window_seconds += seconds
        self.traced.add(variant)

    def seconds_per_step(self) -> Optional[float]:
        return self.seconds / self.steps if self.steps else None

    def take_window(self) -> Optional[float]:
        """Images per second since the last call (None when nothing was timed); starts a new window."""
        rate = self.window_steps * self.batch_images / self.window_seconds if self.window_seconds > 0 else None
        self.window_steps, self.window_seconds = 0, 0.0
        return rate

    def images_per_second(self) -> float:
        return self.steps * self.batch_images / self.seconds if self.seconds > 0 else 0.0


class TrainLoop:
    """Runs steps ``start_step + 1 .. total_steps`` (see `run`)."""

    def __init__(self, cfg, parts, step_fn, validator, log, counters, *, num_workers: int,
                 say: Callable[[str], None], collapse_warned: bool = False):
        tcfg = cfg.train
        self.tcfg, self.parts, self.step_fn, self.validator, self.log = tcfg, parts, step_fn, validator, log
        self.counters, self.num_workers, self.say = counters, num_workers, say
        self.steps_per_epoch = tcfg.steps_per_epoch
        self.total_steps = tcfg.epochs * tcfg.steps_per_epoch
        self.collapse = CollapseWatch(tcfg.collapse_distance, tcfg.collapse_patience, collapse_warned)
        self.throughput = Throughput(tcfg.identities_per_batch * tcfg.images_per_identity)
        self.steps_done = 0
        self.interrupted = False

    def checkpoint_state(self) -> dict:
        """The state stored beside each checkpoint (validation bests, collapse warning, head shape)."""
        return jsonable({**self.validator.state(), "collapse_warned": self.collapse.warned,
                         **head_state(self.parts.head)})

    def run(self, step: int, batches, stop) -> int:
        """Train from `step` until the last step or `stop` (a `signals.StopSignals`); the step reached."""
        if step >= self.total_steps:
            self.say(f"already at step {step} of {self.total_steps}: nothing to train (raise train.epochs to train "
                     "longer, or --fresh --force to start over)")
        while step < self.total_steps and not stop:
            step = self._one_step(step + 1, batches)
            self._after_step(step)
        if stop and step < self.total_steps:
            self._interrupt(step, stop.name)
        return step

    def _one_step(self, step: int, batches) -> int:
        """Step `step`: train, stop on a non-finite loss, time it, log it."""
        log_now = step % self.tcfg.log_every_steps == 0 or step == self.total_steps
        t0 = time.perf_counter()
        images, labels = next(batches)
        result = self.step_fn(images, labels, with_stats=log_now)
        loss = float(result["loss"])
        dt = time.perf_counter() - t0
        # A non-finite gradient (finite loss) would poison the weights this step wrote: stop too,
        # unless a loss-scale optimizer skips such steps by design (mixed_float16).
        grad_norm = float(result["grad_norm"]) if not self.step_fn.loss_scaled else 0.0
        check_finite(step, loss, grad_norm, self.parts.manager, self.tcfg.learning_rate, self.tcfg.clip_norm)
        self.steps_done += 1
        self.throughput.add(log_now, dt)
        self.log.advance(step, self.throughput.seconds_per_step())
        if log_now:
            self._log_values(step, result)
        return step

    def _log_values(self, step: int, result: dict) -> None:
        from mobilenet_embed.optim import current_learning_rate

        values = {k: float(v) for k, v in result.items()}
        values["learning_rate"] = current_learning_rate(self.parts.optimizer)
        skipped = int(self.counters.skipped_batches.numpy())
        if skipped:
            values["skipped_batches"] = skipped
        rate = self.throughput.take_window()
        if rate is not None:
            values["images_per_second"] = rate
        self.log.log_train(step, values)
        self.collapse.observe(step, values, self.log.write)

    def _after_step(self, step: int) -> None:
        """Validation at the epoch ends it is due, checkpoints every ``checkpoint_every_steps`` and at epoch ends."""
        if self.validator.due(step, self.total_steps, self.steps_per_epoch):
            self.validator(step)
        epoch_end = step % self.steps_per_epoch == 0 or step == self.total_steps
        if epoch_end or step % self.tcfg.checkpoint_every_steps == 0:
            self.parts.manager.save(step, self.checkpoint_state())

    def _interrupt(self, step: int, signal_name: str) -> None:
        self.interrupted = True
        self.log.close()
        if self.num_workers > 1:
            self.say(f"{signal_name}: stopped at step {step}; the last periodic checkpoint stands (no checkpoint "
                     "is written on interrupt with several workers)")
        else:
            self.parts.manager.save(step, self.checkpoint_state())
            self.say(f"{signal_name}: stopped at step {step}; checkpoint written. Run the same command to resume.")
