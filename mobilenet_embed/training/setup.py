"""The model, optimizer, margin head and checkpoint of a run, built under the strategy's scope,
and resumed from the run's latest checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from mobilenet_embed.config import Config
from mobilenet_embed.errors import UserError


@dataclass
class TrainParts:
    """What a run trains and checkpoints, and the loss pieces the step needs."""

    model: Any
    optimizer: Any
    head: Any  # the margin head (class centres) or None
    step_var: Any  # the global step, a tf.Variable in the checkpoint
    manager: Any  # mobilenet_embed.checkpoints.CheckpointManager
    loss_fn: Callable  # the triplet loss (the whole loss without a head, the triplet term with one)
    triplet_options: Any  # its options: also the mining statistics' margin and distance


@dataclass
class Resumed:
    """Where training starts: the restored checkpoint's step and state (empty when from scratch)."""

    start_step: int
    resumed_from: Optional[int]
    checkpoint_name: Optional[str]
    state: dict = field(default_factory=dict)


def head_state(head) -> dict:
    """What a checkpoint records of the margin head, to refuse resuming with other identities."""
    return {"head_identities": head.num_classes, "head_subcenters": head.subcenters} if head is not None else {}


def check_head_resumable(state: dict, head, ckpt_dir: str) -> None:
    """One-line refusal when the checkpoint's class centres are for another number of identities."""
    saved = (state.get("head_identities"), state.get("head_subcenters"))
    if saved[0] is None:
        return  # no head in that checkpoint (e.g. a triplet run): the centres start fresh
    if saved != (head.num_classes, head.subcenters):
        raise UserError(f"{ckpt_dir}: cannot resume: its class centres are for {saved[0]} identities x "
                        f"{saved[1]} sub-centres, this run has {head.num_classes} x {head.subcenters}; train on "
                        "the same identities, or start over with --fresh --force")


def _build_model(cfg: Config, sync_batch_norm: bool):
    """The embedding model under the precision policy (set around its construction only)."""
    import keras

    from mobilenet_embed.model import build_model_from_config

    tcfg = cfg.train
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(tcfg.precision)
    try:
        model = build_model_from_config(cfg.model, cfg.data.image_size)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            if sync_batch_norm:
                layer.synchronized = True
            if tcfg.bn_momentum is not None:
                layer.momentum = tcfg.bn_momentum
    return model


def build_parts(cfg: Config, strategy, num_replicas: int, num_identities: int, ckpt_dir: str,
                is_chief: bool, say: Optional[Callable[[str], None]] = None) -> TrainParts:
    """Model, optimizer, step variable and (with a margin ``loss.name``) the head, under the
    strategy's scope; the checkpoint manager of `ckpt_dir` over all of them (its notes, a
    rebuilt index or a damaged checkpoint skipped, go to `say`)."""
    import keras
    import tensorflow as tf

    from mobilenet_embed.checkpoints import CheckpointManager
    from mobilenet_embed.config import LOSS_REGISTRY
    from mobilenet_embed.heads import head_from_config
    from mobilenet_embed.losses import triplet_loss_from_config
    from mobilenet_embed.optim import build_optimizer, build_schedule

    tcfg = cfg.train
    with_head = LOSS_REGISTRY[cfg.loss.name].kind == "margin"
    triplet_name = cfg.loss.triplet_term if with_head else cfg.loss.name
    loss_obj = triplet_loss_from_config(cfg.loss, triplet_name)
    keras.utils.set_random_seed(cfg.seed)
    with strategy.scope():
        model = _build_model(cfg, tcfg.sync_batch_norm and num_replicas > 1)
        optimizer = build_optimizer(tcfg, model, build_schedule(tcfg), loss_scale=tcfg.precision == "mixed_float16")
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        # the margin head's class centres: trained and checkpointed with the model, never exported
        head = (head_from_config(cfg.loss, num_identities, cfg.model.embedding_size, seed=cfg.seed, step=step_var,
                                 steps_per_epoch=tcfg.steps_per_epoch)
                if with_head else None)
        optimizer.build(list(model.trainable_variables) + (list(head.trainable_variables) if head else []))
        if head is not None:
            if cfg.loss.centre_lr_multiplier != 1.0:
                getattr(optimizer, "inner_optimizer", optimizer).scale_learning_rate(
                    head.trainable_variables, cfg.loss.centre_lr_multiplier)
            head.track_optimizer_slots(optimizer)  # sharded centres: their moments are saved whole too
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var,
                                     **({"head": head} if head is not None else {}))
    manager = CheckpointManager(ckpt_dir, checkpoint, keep=tcfg.keep_checkpoints, is_chief=is_chief, log=say)
    return TrainParts(model, optimizer, head, step_var, manager, loss_obj.call, getattr(cfg.loss, triplet_name))


def resume(parts: TrainParts, ckpt_dir: str) -> Resumed:
    """Restore the latest checkpoint of the run, if any (refusing other head identities)."""
    latest = parts.manager.latest()
    if latest is None:
        return Resumed(int(parts.step_var.numpy()), None, None)
    if parts.head is not None:
        check_head_resumable(latest.state, parts.head, ckpt_dir)
    latest = parts.manager.restore(latest)  # a damaged latest falls back to an older one
    step = int(parts.step_var.numpy())
    return Resumed(step, step, os.path.basename(latest.path), dict(latest.state))


def make_step(cfg: Config, strategy, parts: TrainParts, num_replicas: int, local_replicas: int,
              say: Callable[[str], None]):
    """The `TrainStep` of the run (XLA turned off, with a note, under several replicas)."""
    from mobilenet_embed.training.step import TrainStep

    tcfg = cfg.train
    jit = tcfg.jit_compile
    if jit and num_replicas > 1:
        # XLA-compiled replica functions cannot reach the other replicas' variables on TF 2.21
        # (measured with two logical CPU devices); Keras' jit_compile="auto" turns XLA off under
        # tf.distribute for the same reason.
        say("note: train.jit_compile is not used with several replicas (XLA under tf.distribute)")
        jit = False
    return TrainStep(strategy, parts.model, parts.optimizer, parts.loss_fn, margin=parts.triplet_options.margin,
                     distance=parts.triplet_options.distance, cross_replica_mining=tcfg.cross_replica_mining,
                     clip_norm=tcfg.clip_norm, jit_compile=jit, local_replicas=local_replicas,
                     step_variable=parts.step_var, head=parts.head, triplet_weight=cfg.loss.triplet_weight,
                     head_fade=tuple(int(round(e * tcfg.steps_per_epoch)) for e in cfg.loss.head_fade_epochs) or None)
