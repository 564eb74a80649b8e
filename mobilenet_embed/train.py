"""`mbembed train`: one custom training loop for one device, several GPUs and several machines.

    >>> from mobilenet_embed.config import load_config
    >>> result = train(load_config("configs/quickstart.yaml"))        # doctest: +SKIP
    >>> result.steps, result.best_validation["accuracy"]              # doctest: +SKIP

The loop (a custom one, since Keras 3 `fit` fails under MultiWorkerMirroredStrategy on TF 2.21):

1. the strategy (`mobilenet_embed.distribute`), then the run directory: resume from its latest
   checkpoint, or start (``fresh`` starts over and needs ``force`` to overwrite a run);
2. the data: the image index, held-out validation pairs, the P x K batches of this worker
   starting at the resumed step (the sampler position is the global step);
3. under ``strategy.scope()``: the embedding model (precision policy set around its
   construction), the optimizer and its schedule (`mobilenet_embed.optim`), the checkpoint;
4. steps: a `tf.function` calling ``strategy.run`` on each replica's slice of whole identities.
   Per replica: embeddings (float32), the triplet loss over the local batch, or with
   ``train.cross_replica_mining`` over the all-gathered global batch (or, with a margin head,
   `mobilenet_embed.heads`, the head's loss on the all-gathered batch, each replica computing
   the logits of its shard of the identities, plus ``loss.triplet_weight`` x the triplet loss);
   divided by the replica count; gradients summed across replicas once, clipped by their global norm, applied.
   Logging values are averaged over replicas with ``strategy.reduce``;
5. checkpoints every ``train.checkpoint_every_steps`` and at each epoch end, validation every
   ``train.val_every_epochs`` (and at the end), the best checkpoint by validation accuracy;
6. the final ``model.keras`` and ``summary.json``.

Gradient scaling. Without cross-replica mining replica r minimises ``L_r / R`` (``L_r`` the mean
loss of its slice), so the summed gradient is the mean of the replicas' gradients: the
single-device gradient of the global batch whenever the loss's denominator (anchor-positive
pairs, anchors) is the same in every slice, as it is for P x K batches with the semi-hard and
batch-hard losses; mining, however, only sees the local slice. With cross-replica mining every
replica computes the same global loss ``L`` on the gathered batch and minimises ``L / R``; the
gradient of the gather (an all-reduce of zero-padded slices) sums the upstream gradients of all
replicas (R copies of ``dL/dE / R``) and keeps the local slice, so the summed gradient is exactly
the one-device ``dL/dtheta`` (tested to 1e-5). Batch-norm batch statistics are per replica unless
``train.sync_batch_norm``; the moving averages are averaged over replicas after every step, so all
replicas and workers hold the same ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any, Optional

from mobilenet_embed.config import Config
from mobilenet_embed.records import jsonable
from mobilenet_embed.training.guards import TrainingDiverged
from mobilenet_embed.training.run_data import load_data, validation_pairs, worker_batches
from mobilenet_embed.training.run_dir import ARTEFACTS, RunDir
from mobilenet_embed.training.step import TrainStep

__all__ = ["ARTEFACTS", "TrainResult", "TrainStep", "TrainingDiverged", "train"]
_load_data, _validation_pairs = load_data, validation_pairs  # the names tests and scripts import


@dataclass
class TrainResult:
    """What `train` did and where it put things."""

    run_dir: str
    steps: int  # global step reached (all runs on this run directory)
    steps_this_run: int
    seconds: float  # wall time of this call
    images_per_second: float  # training throughput of this call (steps only, all workers)
    final_validation: Optional[dict]
    best_validation: Optional[dict]
    best_step: Optional[int]
    resumed_from: Optional[int]
    interrupted: bool
    paths: dict
    model: Any = field(default=None, repr=False, compare=False)
    val_source: str = "none"  # where validation pairs come from ("none": not configured)

    def summary_lines(self) -> list[str]:
        lines = []
        state = "interrupted" if self.interrupted else "finished"
        resumed = f" (resumed at step {self.resumed_from})" if self.resumed_from else ""
        lines.append(f"training {state} at step {self.steps}{resumed}: {self.steps_this_run} steps in "
                     f"{_duration(self.seconds)}, {self.images_per_second:.1f} images/s")
        if self.final_validation:
            v = self.final_validation
            lines.append(f"final validation accuracy {v['accuracy']:.4f} +- {v.get('accuracy_std', 0.0):.4f} "
                         f"(step {v.get('step', self.steps)})")
        if self.best_validation:
            b = self.best_validation
            lines.append(f"best validation accuracy {b['accuracy']:.4f} at step {self.best_step}")
        if not self.final_validation and not self.best_validation:
            lines.append("no validation (set eval.pairs or data.val_identities > 0)" if self.val_source == "none"
                         else f"no validation yet ({self.val_source}; the run stopped before the first one)")
        for key in ("model", "best_checkpoint", "checkpoints", "tensorboard", "metrics", "config"):
            if self.paths.get(key):
                lines.append(f"{key.replace('_', ' ')}: {self.paths[key]}")
        return lines

    def to_json(self) -> dict:
        data = {k: v for k, v in dataclasses.asdict(dataclasses.replace(self, model=None)).items() if k != "model"}
        return jsonable(data)


def _duration(seconds: float) -> str:
    from mobilenet_embed.runlog import format_duration

    return format_duration(seconds)


def train(cfg: Config, run_dir: Optional[str] = None, fresh: bool = False, force: bool = False,
          stream: Optional[IO[str]] = None) -> TrainResult:
    """Train the configured model; resume from `run_dir`'s latest checkpoint unless `fresh`.

    `run_dir` defaults to ``cfg.run_dir``. `fresh` starts over and, when the directory already
    holds a run, needs `force`. Output goes to `stream` (default stdout): a tqdm bar on a terminal,
    plain lines otherwise. Raises `UserError` on bad config or data, `TrainingDiverged` when the
    loss stops being finite. Ctrl-C (or SIGTERM) writes a checkpoint and returns with
    ``interrupted=True``.
    """
    t_start = time.perf_counter()
    out = stream if stream is not None else sys.stdout
    run_dir = os.path.abspath(run_dir or cfg.run_dir)
    cfg = dataclasses.replace(cfg, run_dir=run_dir)

    from mobilenet_embed import distribute

    strategy = distribute.make_strategy(cfg.train.strategy)  # first: MultiWorkerMirroredStrategy needs it
    from mobilenet_embed.runlock import RunLock

    lock = RunLock(run_dir, log=lambda text: print(text, file=out, flush=True))  # the chief's alone
    with lock if distribute.worker_info(strategy).is_chief else contextlib.nullcontext():
        return _train_locked(cfg, fresh, force, out, t_start, strategy)


def _train_locked(cfg: Config, fresh: bool, force: bool, out: IO[str], t_start: float, strategy) -> TrainResult:
    """The body of `train`, run while the chief holds the run directory's lock: the parts in order."""
    from mobilenet_embed import distribute
    from mobilenet_embed.data import DataCounters
    from mobilenet_embed.runlog import RunLog
    from mobilenet_embed.training import setup
    from mobilenet_embed.training.loop import TrainLoop
    from mobilenet_embed.training.signals import StopSignals
    from mobilenet_embed.training.validation import Validator

    tcfg, info = cfg.train, distribute.worker_info(strategy)
    distribute.check_batch_split(tcfg.identities_per_batch, tcfg.images_per_identity, info.num_replicas)
    say = _printer(out, info.is_chief)
    run = RunDir(cfg.run_dir, info.is_chief)
    run.prepare(cfg, fresh, force, say)
    distribute.same_on_all_workers(strategy, 0, "start-up")  # barrier: the chief prepared the directory
    if info.num_replicas > 1:
        say(f"strategy: {type(strategy).__name__}, {info.num_replicas} replicas on {info.num_workers} "
            f"worker(s), {tcfg.identities_per_batch // info.num_replicas} identities per replica, "
            f"mining {'over the global batch' if tcfg.cross_replica_mining else 'per replica'}")
    data = load_data(cfg, say)
    for line in data.report_lines + [f"validation: {data.val_source}"]:
        say(line)

    parts = setup.build_parts(cfg, strategy, info.num_replicas, data.train_index.num_identities,
                              run.checkpoints, info.is_chief, say)
    resumed = setup.resume(parts, run.checkpoints)
    distribute.same_on_all_workers(strategy, resumed.start_step, "the step to resume from")
    total_steps = tcfg.epochs * tcfg.steps_per_epoch
    say(f"resuming {run.path} from step {resumed.start_step} (checkpoint {resumed.checkpoint_name})"
        if resumed.resumed_from is not None else
        f"training {run.path} from scratch: {total_steps} steps ({tcfg.epochs} epochs x {tcfg.steps_per_epoch})")
    step_fn = setup.make_step(cfg, strategy, parts, info.num_replicas, info.local_replicas, say)

    counters = DataCounters()
    batches = worker_batches(cfg, data.train_index, resumed.start_step, info, counters)
    log = RunLog(run.path, total_steps, tcfg.steps_per_epoch, resumed.start_step, tcfg.log_every_steps,
                 is_chief=info.is_chief, stream=out)
    validator = Validator(cfg, parts.model, data.val_pairs, parts.manager, log, resumed.state)
    loop = TrainLoop(cfg, parts, step_fn, validator, log, counters, num_workers=info.num_workers, say=say,
                     collapse_warned=bool(resumed.state.get("collapse_warned", False)))
    with StopSignals() as stop:
        batches = iter(batches)
        try:
            step = loop.run(resumed.start_step, batches, stop)
        finally:
            log.close()

    if not loop.interrupted:
        run.save_model(parts.model)
    best = parts.manager.best()
    result = TrainResult(run_dir=run.path, steps=step, steps_this_run=loop.steps_done,
                         seconds=time.perf_counter() - t_start, images_per_second=loop.throughput.images_per_second(),
                         final_validation=validator.last, best_validation=validator.best_metrics,
                         best_step=validator.best_step, resumed_from=resumed.resumed_from,
                         interrupted=loop.interrupted, paths=run.paths(best.path if best else None),
                         model=parts.model, val_source=data.val_source)
    run.write_summary(result.to_json())
    return result


def _printer(out: IO[str], is_chief: bool):
    """`say(text)`: a line on `out`, from the chief only."""
    def say(text: str) -> None:
        if is_chief:
            print(text, file=out, flush=True)
    return say
