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
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Optional


from mobilenet_embed import atomic
from mobilenet_embed.config import Config, config_from_dict, config_to_dict, dump_yaml
from mobilenet_embed.errors import UserError
from mobilenet_embed.records import jsonable, versions

ARTEFACTS = ("config.yaml", "checkpoints", "tensorboard", "metrics.jsonl", "model.keras", "summary.json")

# Keys whose change makes a checkpoint unreadable or meaningless to resume with.
_RESUME_KEYS = ("model.alpha", "model.depth_multiplier", "model.embedding_size", "data.image_size",
                "train.optimizer", "train.precision")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint."""


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


# --------------------------------------------------------------------------- the step


class TrainStep:
    """One optimizer step on a global batch, under any strategy (see the module docstring).

    `loss_fn(labels, embeddings) -> scalar` is the unscaled mean over the batch it is given.
    With a margin `head` (`mobilenet_embed.heads`) the loss is ``head(labels, embeddings)`` plus
    ``triplet_weight * loss_fn(...)`` when that weight is > 0; the head's centres are
    differentiated and updated with the model's variables, and with several replicas the batch
    is always all-gathered (each replica computes the logits of its shard of the classes).
    Calling returns a dict of scalars averaged over replicas: ``loss``, ``grad_norm`` (before
    clipping) and, when `with_stats`, the mining statistics of `mobilenet_embed.losses.mining_stats`.
    """

    def __init__(self, strategy, model, optimizer, loss_fn: Callable, *, margin: float, distance: str,
                 cross_replica_mining: bool = False, clip_norm: Optional[float] = None,
                 jit_compile: bool = False, local_replicas: int = 1, step_variable=None, head=None,
                 triplet_weight: float = 0.0):
        import tensorflow as tf

        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.margin = float(margin)
        self.distance = distance
        self.cross_replica_mining = bool(cross_replica_mining)
        self.clip_norm = clip_norm
        self.local_replicas = int(local_replicas)
        self.step_variable = step_variable
        self.head = head
        self.triplet_weight = float(triplet_weight)
        self.loss_scaled = hasattr(optimizer, "scale_loss") and hasattr(optimizer, "inner_optimizer")
        self._replica_fns = {
            stats: (tf.function(self._make_replica_fn(stats), jit_compile=True) if jit_compile
                    else self._make_replica_fn(stats))
            for stats in (False, True)
        }
        self._steps = {stats: tf.function(self._make_step(stats)) for stats in (False, True)}

    def _make_replica_fn(self, with_stats: bool):
        import tensorflow as tf

        from mobilenet_embed.distribute import gather_replicas
        from mobilenet_embed.losses import mining_stats

        def replica_fn(images, labels):
            ctx = tf.distribute.get_replica_context()
            replicas = ctx.num_replicas_in_sync
            variables = list(self.model.trainable_variables)
            if self.head is not None:
                variables += list(self.head.trainable_variables)
            with tf.GradientTape() as tape:
                embeddings = tf.cast(self.model(images, training=True), tf.float32)
                if (self.cross_replica_mining or self.head is not None) and replicas > 1:
                    embeddings = gather_replicas(ctx, embeddings)
                    labels = gather_replicas(ctx, labels)
                if self.head is None:
                    loss = tf.cast(self.loss_fn(labels, embeddings), tf.float32)
                else:
                    loss = self.head(labels, embeddings)
                    if self.triplet_weight > 0:
                        loss += self.triplet_weight * tf.cast(self.loss_fn(labels, embeddings), tf.float32)
                objective = loss / float(replicas)
                if self.model.losses:
                    objective += tf.add_n([tf.cast(x, tf.float32) for x in self.model.losses]) / float(replicas)
                if self.loss_scaled:
                    objective = self.optimizer.scale_loss(objective)
            grads = tape.gradient(objective, variables)
            grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
            if replicas > 1:
                grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            scale = tf.cast(self.optimizer.dynamic_scale, tf.float32) if self.loss_scaled else 1.0
            grad_norm = tf.linalg.global_norm(grads)
            if self.clip_norm:
                grads, _ = tf.clip_by_global_norm(grads, self.clip_norm * scale, use_norm=grad_norm)
            self.optimizer.apply(grads, variables)
            if replicas > 1:
                self._average_moving_statistics(ctx)
            out = {"loss": loss, "grad_norm": grad_norm / scale}
            if with_stats:
                out.update(mining_stats(labels, embeddings, self.margin, self.distance))
            return out

        return replica_fn

    def _average_moving_statistics(self, ctx) -> None:
        """Average the float non-trainable variables (batch-norm moving mean and variance) over
        replicas after each step. Keras 3 creates them with aggregation "none", so every replica
        would otherwise keep the averages of its own slices and the copies (and the workers) drift
        apart; this is what Keras 2's "mean" aggregation did."""
        import tensorflow as tf

        stats = [v for v in self.model.non_trainable_variables if v.dtype in ("float16", "bfloat16", "float32",
                                                                               "float64")]
        if not stats:
            return
        means = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in stats])
        for var, mean in zip(stats, means):
            var.assign(mean)

    def _make_step(self, with_stats: bool):
        import tensorflow as tf

        from mobilenet_embed.distribute import replica_slices

        replica_fn = self._replica_fns[with_stats]

        def step(images, labels):
            per_replica = replica_slices(self.strategy, images, labels, self.local_replicas)
            out = self.strategy.run(replica_fn, args=per_replica)
            out = {k: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in out.items()}
            if self.step_variable is not None:
                self.step_variable.assign_add(1)
            return out

        return step

    def __call__(self, images, labels, with_stats: bool = True) -> dict:
        return self._steps[bool(with_stats)](images, labels)


# --------------------------------------------------------------------------- run directory


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _compare_with_saved(cfg: Config, path: str) -> list[str]:
    """Keys that changed since the run's saved config; refuse those a resume cannot survive."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            saved = config_from_dict(yaml.safe_load(fh) or {}, source=path)
    except (OSError, yaml.YAMLError):
        return []
    except UserError:
        return []  # written by another mbembed version; the checkpoint restore will tell
    old, new = _flatten(config_to_dict(saved)), _flatten(config_to_dict(cfg))
    changed = [k for k in new if old.get(k) != new[k] and k != "run_dir"]
    fatal = [k for k in changed if k in _RESUME_KEYS]
    if fatal:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in fatal)
        raise UserError(f"{path}: cannot resume this run with a different {details}; "
                        "start over with --fresh --force, or use another --run-dir")
    return [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed]


def _prepare_run_dir(run_dir: str, fresh: bool, force: bool) -> None:
    """Create the run directory; with `fresh`, remove a previous run's artefacts (needs `force`)."""
    present = [a for a in ARTEFACTS if os.path.exists(os.path.join(run_dir, a))]
    if fresh and present:
        if not force:
            raise UserError(f"{run_dir}: a run directory already exists here ({', '.join(present)}); "
                            "add --force to overwrite it with --fresh, or leave out --fresh to resume it")
        for name in present:
            path = os.path.join(run_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    os.makedirs(run_dir, exist_ok=True)


def _save_model_atomic(model, path: str) -> None:
    atomic.atomic_write(path, model.save)


# --------------------------------------------------------------------------- data


@dataclass
class _Data:
    train_index: Any
    val_pairs: list
    val_source: str
    report_lines: list


def _validation_pairs(cfg: Config, index, log: Callable[[str], None]) -> tuple[Any, list, str]:
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


def _load_data(cfg: Config, log: Callable[[str], None]) -> _Data:
    from mobilenet_embed.align.folder import check_config_alignment
    from mobilenet_embed.data import build_index

    for note in check_config_alignment(cfg.data):  # data.align_* must agree with mbembed align's report
        log(note)
    index, report = build_index(cfg.data, check=True)
    lines = list(report.summary_lines())
    train_index, pairs, source = _validation_pairs(cfg, index, log)
    n_ids = len(train_index.identities)
    if n_ids < cfg.train.identities_per_batch:
        raise UserError(f"train.identities_per_batch: {cfg.train.identities_per_batch} identities per batch, "
                        f"but only {n_ids} identities are left to train on")
    return _Data(train_index, pairs, source, lines)


# --------------------------------------------------------------------------- train


def _head_state(head) -> dict:
    """What a checkpoint records of the margin head, to refuse resuming with other identities."""
    return {"head_identities": head.num_classes, "head_subcenters": head.subcenters}


def _check_head_resumable(state: dict, head, ckpt_dir: str) -> None:
    """One-line refusal when the checkpoint's class centres are for another number of identities."""
    saved = (state.get("head_identities"), state.get("head_subcenters"))
    if saved[0] is None:
        return  # no head in that checkpoint (e.g. a triplet run): the centres start fresh
    if saved != (head.num_classes, head.subcenters):
        raise UserError(f"{ckpt_dir}: cannot resume: its class centres are for {saved[0]} identities x "
                        f"{saved[1]} sub-centres, this run has {head.num_classes} x {head.subcenters}; train on "
                        "the same identities, or start over with --fresh --force")


def _set_precision_policy(precision: str):
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    return previous


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
    tcfg = cfg.train

    from mobilenet_embed import distribute

    strategy = distribute.make_strategy(tcfg.strategy)  # first: MultiWorkerMirroredStrategy needs it
    from mobilenet_embed.runlock import RunLock

    lock = RunLock(run_dir, log=lambda text: print(text, file=out, flush=True))  # the chief's alone
    with lock if distribute.worker_info(strategy).is_chief else contextlib.nullcontext():
        return _train_locked(cfg, run_dir, fresh, force, out, t_start, strategy)


def _train_locked(cfg: Config, run_dir: str, fresh: bool, force: bool, out: IO[str], t_start: float,
                  strategy) -> TrainResult:
    """The body of `train`, run while the chief holds the run directory's lock."""
    from mobilenet_embed import distribute

    tcfg = cfg.train
    import keras
    import tensorflow as tf

    from mobilenet_embed.checkpoints import CheckpointManager
    from mobilenet_embed.config import LOSS_REGISTRY
    from mobilenet_embed.heads import head_from_config
    from mobilenet_embed.losses import triplet_loss_from_config
    from mobilenet_embed.model import build_model_from_config
    from mobilenet_embed.optim import build_optimizer, build_schedule, current_learning_rate
    from mobilenet_embed.runlog import RunLog

    info = distribute.worker_info(strategy)
    distribute.check_batch_split(tcfg.identities_per_batch, tcfg.images_per_identity, info.num_replicas)
    chief = info.is_chief

    def say(text: str) -> None:
        if chief:
            print(text, file=out, flush=True)

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    config_path = os.path.join(run_dir, "config.yaml")
    if chief:
        _prepare_run_dir(run_dir, fresh, force)
        if not fresh and os.path.isfile(config_path) and os.path.isdir(ckpt_dir):
            changed = _compare_with_saved(cfg, config_path)
            if changed:
                say("config changed since the last run on this directory: " + "; ".join(changed))
        atomic.write_text(config_path, dump_yaml(cfg, extra={"versions": versions()}))
    distribute.same_on_all_workers(strategy, 0, "start-up")  # barrier: the chief prepared the directory

    if chief and info.num_replicas > 1:
        say(f"strategy: {type(strategy).__name__}, {info.num_replicas} replicas on {info.num_workers} "
            f"worker(s), {tcfg.identities_per_batch // info.num_replicas} identities per replica, "
            f"mining {'over the global batch' if tcfg.cross_replica_mining else 'per replica'}")

    data = _load_data(cfg, say)
    for line in data.report_lines:
        say(line)
    say(f"validation: {data.val_source}")

    # ---- model, optimizer, checkpoint
    steps_per_epoch = tcfg.steps_per_epoch
    total_steps = tcfg.epochs * steps_per_epoch
    with_head = LOSS_REGISTRY[cfg.loss.name].kind == "margin"
    triplet_name = cfg.loss.triplet_term if with_head else cfg.loss.name
    triplet_options = getattr(cfg.loss, triplet_name)  # also the mining statistics' margin and distance
    loss_obj = triplet_loss_from_config(cfg.loss, triplet_name)
    keras.utils.set_random_seed(cfg.seed)
    with strategy.scope():
        previous = _set_precision_policy(tcfg.precision)
        try:
            model = build_model_from_config(cfg.model, cfg.data.image_size)
        finally:
            keras.mixed_precision.set_global_policy(previous)
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                if tcfg.sync_batch_norm and info.num_replicas > 1:
                    layer.synchronized = True
                if tcfg.bn_momentum is not None:
                    layer.momentum = tcfg.bn_momentum
        optimizer = build_optimizer(tcfg, model, build_schedule(tcfg),
                                    loss_scale=tcfg.precision == "mixed_float16")
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        # the margin head's class centres: trained and checkpointed with the model, never exported
        head = (head_from_config(cfg.loss, data.train_index.num_identities, cfg.model.embedding_size,
                                 seed=cfg.seed, step=step_var) if with_head else None)
        optimizer.build(list(model.trainable_variables) + (list(head.trainable_variables) if head else []))
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var,
                                     **({"head": head} if head is not None else {}))
    manager = CheckpointManager(ckpt_dir, checkpoint, keep=tcfg.keep_checkpoints, is_chief=chief)

    latest = manager.latest()
    state: dict = {}
    resumed_from = None
    if latest is not None:
        if head is not None:
            _check_head_resumable(latest.state, head, ckpt_dir)
        manager.restore(latest)
        state = dict(latest.state)
        resumed_from = int(step_var.numpy())
    start_step = int(step_var.numpy())
    distribute.same_on_all_workers(strategy, start_step, "the step to resume from")
    best_acc = state.get("best_accuracy")
    best_step = state.get("best_step")
    best_metrics = state.get("best_metrics")
    last_val = state.get("last_validation")
    collapse_warned = bool(state.get("collapse_warned", False))
    if resumed_from is not None:
        say(f"resuming {run_dir} from step {start_step} (checkpoint {os.path.basename(latest.path)})")
    else:
        say(f"training {run_dir} from scratch: {total_steps} steps ({tcfg.epochs} epochs x {steps_per_epoch})")

    jit = tcfg.jit_compile
    if jit and info.num_replicas > 1:
        # XLA-compiled replica functions cannot reach the other replicas' variables on TF 2.21
        # (measured with two logical CPU devices); Keras' jit_compile="auto" turns XLA off under
        # tf.distribute for the same reason.
        say("note: train.jit_compile is not used with several replicas (XLA under tf.distribute)")
        jit = False
    step_fn = TrainStep(strategy, model, optimizer, loss_obj.call, margin=triplet_options.margin,
                        distance=triplet_options.distance, cross_replica_mining=tcfg.cross_replica_mining,
                        clip_norm=tcfg.clip_norm, jit_compile=jit,
                        local_replicas=info.local_replicas, step_variable=step_var, head=head,
                        triplet_weight=cfg.loss.triplet_weight)

    from mobilenet_embed.data import DataCounters, pk_batches

    # pk_batches draws P identities per worker (distinct identity groups and seeds per worker);
    # the global batch is P x K, so each worker asks for its share P / num_workers.
    worker_cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        tcfg, identities_per_batch=tcfg.identities_per_batch // info.num_workers))
    counters = DataCounters()
    dataset = pk_batches(worker_cfg, index=data.train_index, start_step=start_step,
                         num_replicas=info.local_replicas, worker_index=info.index,
                         num_workers=info.num_workers, counters=counters)
    batch_images = tcfg.identities_per_batch * tcfg.images_per_identity  # global batch

    log = RunLog(run_dir, total_steps, steps_per_epoch, start_step, tcfg.log_every_steps, is_chief=chief,
                 stream=out)

    def current_state() -> dict:
        return jsonable({"best_accuracy": best_acc, "best_step": best_step, "best_metrics": best_metrics,
                         "last_validation": last_val, "collapse_warned": collapse_warned,
                         **(_head_state(head) if head is not None else {})})

    def validate(step: int) -> Optional[dict]:
        nonlocal best_acc, best_step, best_metrics, last_val
        if not data.val_pairs:
            return None
        from mobilenet_embed.verification import evaluate_pairs

        t0 = time.perf_counter()
        metrics = evaluate_pairs(model, cfg.data, data.val_pairs, batch_size=cfg.eval.batch_size,
                                 flip=cfg.eval.flip, n_folds=cfg.eval.folds, far_target=cfg.eval.far_target,
                                 distance=cfg.eval.distance)
        seconds = time.perf_counter() - t0
        scalars = {k: float(metrics[k]) for k in ("accuracy", "accuracy_std", "val", "val_std", "far", "auc",
                                                   "eer", "threshold", "far_target", "val_defined",
                                                   "val_different_pairs_needed") if k in metrics}
        scalars["step"] = step
        log.log_validation(step, scalars, seconds, len(data.val_pairs))
        last_val = scalars
        if best_acc is None or scalars["accuracy"] > best_acc:
            best_acc, best_step, best_metrics = scalars["accuracy"], step, scalars
            manager.save_best(step, scalars)
        return scalars

    # ---- the loop
    interrupted = False
    step = start_step
    steps_done = 0
    train_seconds = 0.0
    window_steps, window_seconds = 0, 0.0
    timed_steps = 0
    traced: set = set()
    collapse_run = 0
    # Ctrl-C / SIGTERM: finish the current step (and its logging), then checkpoint and return.
    # A second signal aborts at once (KeyboardInterrupt); checkpoints are atomic either way.
    stop: list = []
    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        def _on_signal(signum, frame):
            if stop:
                raise KeyboardInterrupt
            stop.append(signal.Signals(signum).name)

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous_handlers[sig] = signal.signal(sig, _on_signal)

    iterator = iter(dataset)
    try:
        if step >= total_steps:
            say(f"already at step {step} of {total_steps}: nothing to train (raise train.epochs to train "
                "longer, or --fresh --force to start over)")
        while step < total_steps and not stop:
            next_step = step + 1
            log_now = next_step % tcfg.log_every_steps == 0 or next_step == total_steps
            t0 = time.perf_counter()
            images, labels = next(iterator)
            result = step_fn(images, labels, with_stats=log_now)
            loss = float(result["loss"])
            dt = time.perf_counter() - t0
            # A non-finite gradient (finite loss) would poison the weights this step wrote: stop too,
            # unless a loss-scale optimizer skips such steps by design (mixed_float16).
            grad_norm = float(result["grad_norm"]) if not step_fn.loss_scaled else 0.0
            if not math.isfinite(loss) or not math.isfinite(grad_norm):
                kept = manager.latest()
                where = (f"the last good checkpoint (step {kept.step}) is intact in {ckpt_dir}" if kept
                         else "no checkpoint was written")
                what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
                raise TrainingDiverged(
                    f"step {next_step}: {what} (not finite); training stopped, {where}. Try a "
                    f"lower train.learning_rate (now {tcfg.learning_rate:g})"
                    + (", or train.clip_norm" if not tcfg.clip_norm else ""))
            step = next_step
            steps_done += 1
            if log_now in traced:
                train_seconds += dt
                timed_steps += 1
                window_steps += 1
                window_seconds += dt
            traced.add(log_now)  # the first call of each step variant includes its tracing
            log.advance(step, train_seconds / timed_steps if timed_steps else None)
            if log_now:
                values = {k: float(v) for k, v in result.items()}
                values["learning_rate"] = current_learning_rate(optimizer)
                skipped = int(counters.skipped_batches.numpy())
                if skipped:
                    values["skipped_batches"] = skipped
                if window_seconds > 0:
                    values["images_per_second"] = window_steps * batch_images / window_seconds
                window_steps, window_seconds = 0, 0.0
                log.log_train(step, values)
                if "mean_neg_dist" in values and values["mean_neg_dist"] < tcfg.collapse_distance:
                    collapse_run += 1
                else:
                    collapse_run = 0
                if collapse_run >= tcfg.collapse_patience and not collapse_warned:
                    collapse_warned = True
                    log.write(f"warning: the embedding looks collapsed: mean anchor-negative distance "
                              f"{values['mean_neg_dist']:.2e} < {tcfg.collapse_distance:g} for {collapse_run} "
                              f"logging steps (step {step}); try a lower learning rate or another loss")
            epoch_end = step % steps_per_epoch == 0 or step == total_steps
            if epoch_end:
                epoch = (step - 1) // steps_per_epoch + 1
                if epoch % tcfg.val_every_epochs == 0 or step == total_steps:
                    validate(step)
            if epoch_end or step % tcfg.checkpoint_every_steps == 0:
                manager.save(step, current_state())
        if stop and step < total_steps:
            interrupted = True
            log.close()
            if info.num_workers > 1:
                say(f"{stop[0]}: stopped at step {step}; the last periodic checkpoint stands (no checkpoint "
                    "is written on interrupt with several workers)")
            else:
                manager.save(step, current_state())
                say(f"{stop[0]}: stopped at step {step}; checkpoint written. Run the same command to resume.")
    finally:
        log.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    # ---- the end
    paths = {"run_dir": run_dir, "config": config_path, "checkpoints": ckpt_dir,
             "tensorboard": os.path.join(run_dir, "tensorboard"), "metrics": os.path.join(run_dir, "metrics.jsonl")}
    best = manager.best()
    if best is not None:
        paths["best_checkpoint"] = best.path
    if not interrupted and chief:
        model_path = os.path.join(run_dir, "model.keras")
        _save_model_atomic(model, model_path)
        paths["model"] = model_path
    elif os.path.isfile(os.path.join(run_dir, "model.keras")):
        paths["model"] = os.path.join(run_dir, "model.keras")
    images_per_second = timed_steps * batch_images / train_seconds if train_seconds > 0 else 0.0
    result = TrainResult(run_dir=run_dir, steps=step, steps_this_run=steps_done,
                         seconds=time.perf_counter() - t_start, images_per_second=images_per_second,
                         final_validation=last_val, best_validation=best_metrics, best_step=best_step,
                         resumed_from=resumed_from, interrupted=interrupted, paths=paths, model=model,
                         val_source=data.val_source)
    if chief:
        atomic.write_json(os.path.join(run_dir, "summary.json"), result.to_json(), indent=1)
    return result
