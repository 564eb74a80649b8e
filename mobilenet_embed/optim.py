"""Optimizers and learning-rate schedules of `mbembed train`, built from the `train` config section.

Schedules are `keras.optimizers.schedules.LearningRateSchedule` subclasses keyed on the global
optimizer step (``optimizer.iterations``), registered for Keras serialisation, with
``steps_per_epoch`` baked in so that epochs in the config become steps:

- ``constant``: ``train.learning_rate`` throughout.
- ``piecewise``: ``train.lr_piecewise = [[epoch, lr], ...]`` as FaceNet's learning-rate schedule
  file: at (fractional) epoch ``e = step / steps_per_epoch`` the rate is the ``lr`` of the last
  entry whose ``epoch <= e``; before the first entry, the first entry's ``lr``.
  ``train.learning_rate`` is not used. (FaceNet's ``-1`` "stop here" marker is refused: set
  ``train.epochs`` instead.)
- ``cosine``: linear warm-up over ``train.warmup_epochs`` from ``lr / warmup_steps`` to
  ``train.learning_rate`` (step ``s`` of the warm-up uses ``lr * (s + 1) / warmup_steps``), then
  half a cosine down to 0 at the last step of training.

Weight decay (``train.weight_decay``) is Keras' decoupled form for every optimizer:
``w <- w - lr * weight_decay * w`` each step, applied to convolution and dense kernels only
(batch-norm scales and offsets are excluded). Gradient clipping (``train.clip_norm``) is done by the
training step itself, on the gradient of the *global* batch after the cross-replica sum, not by the
optimizer (Keras' ``global_clipnorm`` would clip each replica's partial gradient).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import keras
import tensorflow as tf

from mobilenet_embed.errors import UserError

if TYPE_CHECKING:
    from mobilenet_embed.config import TrainConfig


@keras.saving.register_keras_serializable(package="mbembed")
class ConstantSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The same learning rate at every step (a schedule object, so the optimizer logs it alike)."""

    def __init__(self, learning_rate: float):
        self.learning_rate = float(learning_rate)

    def __call__(self, step):
        return tf.constant(self.learning_rate, tf.float32)

    def get_config(self) -> dict:
        return {"learning_rate": self.learning_rate}


@keras.saving.register_keras_serializable(package="mbembed")
class PiecewiseEpochSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """FaceNet's schedule file as a schedule: ``[[epoch, lr], ...]``, epochs ascending.

    >>> s = PiecewiseEpochSchedule([[0, 0.1], [2, 0.01]], steps_per_epoch=10)
    >>> [round(float(s(t)), 4) for t in (0, 19, 20, 35)]
    [0.1, 0.1, 0.01, 0.01]
    """

    def __init__(self, points: list, steps_per_epoch: int):
        points = [[float(e), float(lr)] for e, lr in points]
        if not points:
            raise UserError("train.lr_piecewise: expected at least one [epoch, lr] entry, received []")
        epochs = [e for e, _ in points]
        if any(b < a for a, b in zip(epochs, epochs[1:])):
            raise UserError(f"train.lr_piecewise: epochs must be ascending, received {points}")
        for e, lr in points:
            if e < 0:
                raise UserError(f"train.lr_piecewise: epochs must be >= 0, received {points}")
            if not lr > 0:
                raise UserError(
                    f"train.lr_piecewise: learning rates must be > 0 (to stop at an epoch, set "
                    f"train.epochs instead of FaceNet's -1 marker), received {points}")
        if steps_per_epoch < 1:
            raise UserError(f"train.steps_per_epoch: expected an integer >= 1, received {steps_per_epoch}")
        self.points = points
        self.steps_per_epoch = int(steps_per_epoch)

    def __call__(self, step):
        epoch = tf.cast(step, tf.float32) / float(self.steps_per_epoch)
        boundaries = tf.constant([e for e, _ in self.points], tf.float32)
        values = tf.constant([lr for _, lr in self.points], tf.float32)
        # index of the last entry with boundary <= epoch; before the first one, the first.
        idx = tf.searchsorted(boundaries, tf.reshape(epoch, [1]), side="right")[0] - 1
        return tf.gather(values, tf.maximum(idx, 0))

    def get_config(self) -> dict:
        return {"points": self.points, "steps_per_epoch": self.steps_per_epoch}


@keras.saving.register_keras_serializable(package="mbembed")
class WarmupCosineSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up for `warmup_steps`, then cosine decay to `final_learning_rate` at `total_steps`.

    >>> s = WarmupCosineSchedule(1.0, total_steps=10, warmup_steps=2)
    >>> [round(float(s(t)), 4) for t in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """

    def __init__(self, learning_rate: float, total_steps: int, warmup_steps: int = 0,
                 final_learning_rate: float = 0.0):
        if total_steps < 1:
            raise UserError(f"cosine schedule: total steps must be >= 1, received {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise UserError(f"train.warmup_epochs: the warm-up ({warmup_steps} steps) is longer than "
                            f"training ({total_steps} steps)")
        self.learning_rate = float(learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.final_learning_rate = float(final_learning_rate)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        base, final = self.learning_rate, self.final_learning_rate
        warm = float(self.warmup_steps)
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        progress = tf.clip_by_value((step - warm) / decay_steps, 0.0, 1.0)
        cosine = final + 0.5 * (base - final) * (1.0 + tf.cos(math.pi * progress))
        if self.warmup_steps == 0:
            return cosine
        warmup = base * tf.minimum(step + 1.0, warm) / warm
        return tf.where(step < warm, warmup, cosine)

    def get_config(self) -> dict:
        return {"learning_rate": self.learning_rate, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "final_learning_rate": self.final_learning_rate}


def build_schedule(train_cfg: "TrainConfig") -> keras.optimizers.schedules.LearningRateSchedule:
    """The learning-rate schedule the `train` section describes (see the module docstring)."""
    steps_per_epoch = train_cfg.steps_per_epoch
    if train_cfg.lr_schedule == "constant":
        return ConstantSchedule(train_cfg.learning_rate)
    if train_cfg.lr_schedule == "piecewise":
        return PiecewiseEpochSchedule(train_cfg.lr_piecewise, steps_per_epoch)
    if train_cfg.lr_schedule == "cosine":
        total = train_cfg.epochs * steps_per_epoch
        warmup = int(round(train_cfg.warmup_epochs * steps_per_epoch))
        if warmup > total:
            raise UserError(f"train.warmup_epochs: expected at most train.epochs ({train_cfg.epochs}), "
                            f"received {train_cfg.warmup_epochs:g}")
        return WarmupCosineSchedule(train_cfg.learning_rate, total, warmup)
    raise UserError(f"train.lr_schedule: expected one of constant, piecewise, cosine, "
                    f"received {train_cfg.lr_schedule!r}")


OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adagrad")


def _skip_cross_replica_sum(optimizer_cls: type) -> type:
    """`optimizer_cls` whose apply() does not sum gradients across replicas, and whose
    `scale_learning_rate(var_list, multiplier)` gives some variables their own rate.

    Keras' TensorFlow optimizers all-reduce (sum) the gradients they are given when called in a
    replica context. The train step sums them itself, once, so that it can clip the norm of the
    global gradient and so that a loss-scale optimizer sees the same finite/non-finite verdict on
    every replica; a second sum would multiply the update by the replica count.
    """

    class PreReduced(optimizer_cls):  # type: ignore[misc, valid-type]
        def _all_reduce_sum_gradients(self, grads_and_vars):
            return list(grads_and_vars)

        def scale_learning_rate(self, var_list: list, multiplier: float) -> None:
            """Step `var_list` at `multiplier` times the schedule's rate (a PyTorch parameter
            group's own ``lr``); call before the first step. Decoupled weight decay keeps the
            schedule's rate, as Keras computes it apart from the step."""
            if not multiplier > 0:
                raise ValueError(f"learning-rate multiplier must be > 0, received {multiplier}")
            scaled = getattr(self, "_lr_multipliers", {})
            scaled.update({self._var_key(v): float(multiplier) for v in var_list})
            self._lr_multipliers = scaled

        def update_step(self, gradient, variable, learning_rate):
            multiplier = getattr(self, "_lr_multipliers", {}).get(self._var_key(variable), 1.0)
            if multiplier != 1.0:
                learning_rate = learning_rate * multiplier
            return super().update_step(gradient, variable, learning_rate)

    PreReduced.__name__ = optimizer_cls.__name__
    PreReduced.__qualname__ = optimizer_cls.__qualname__
    return PreReduced


def build_optimizer(train_cfg: "TrainConfig", model: keras.Model | None = None,
                    schedule: keras.optimizers.schedules.LearningRateSchedule | None = None,
                    loss_scale: bool = False) -> keras.optimizers.Optimizer:
    """The optimizer of the `train` section, driven by `schedule` (default: `build_schedule`).

    Gradients handed to it must already be summed over replicas (the train step does this).
    `model`, when given, is used to exclude batch-norm variables from weight decay. With
    `loss_scale` (mixed_float16), the optimizer is wrapped in a dynamic
    `keras.optimizers.LossScaleOptimizer`.
    """
    lr = schedule if schedule is not None else build_schedule(train_cfg)
    wd = train_cfg.weight_decay or None
    name = train_cfg.optimizer
    if name == "adam":
        opt = _skip_cross_replica_sum(keras.optimizers.Adam)(learning_rate=lr, weight_decay=wd)
    elif name == "adamw":
        opt = _skip_cross_replica_sum(keras.optimizers.AdamW)(learning_rate=lr, weight_decay=wd or 0.0)
    elif name == "sgd":
        opt = _skip_cross_replica_sum(keras.optimizers.SGD)(
            learning_rate=lr, momentum=train_cfg.momentum, nesterov=train_cfg.nesterov, weight_decay=wd)
    elif name == "rmsprop":
        opt = _skip_cross_replica_sum(keras.optimizers.RMSprop)(
            learning_rate=lr, momentum=train_cfg.momentum, weight_decay=wd)
    elif name == "adagrad":
        opt = _skip_cross_replica_sum(keras.optimizers.Adagrad)(learning_rate=lr, weight_decay=wd)
    else:
        raise UserError(f"train.optimizer: expected one of {', '.join(OPTIMIZERS)}, received {name!r}")
    if wd and model is not None:
        excluded = [v for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
                    for v in layer.trainable_weights]
        opt.exclude_from_weight_decay(var_list=excluded)
    if loss_scale:
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The learning rate the next step will use (reads the schedule at `optimizer.iterations`)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    lr = inner._learning_rate  # the schedule or the variable, never evaluated at a stale step
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        return float(lr(inner.iterations))
    return float(keras.ops.convert_to_numpy(lr))
