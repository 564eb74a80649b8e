"""Learning-rate schedules and optimizers of `mbembed train` (mobilenet_embed.optim)."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from mobilenet_embed.config import TrainConfig, load_config
from mobilenet_embed.errors import UserError
from mobilenet_embed.optim import (PiecewiseEpochSchedule, WarmupCosineSchedule, build_optimizer,
                                   build_schedule, current_learning_rate)


def _train_cfg(**kwargs) -> TrainConfig:
    cfg = TrainConfig()
    for key, value in kwargs.items():
        setattr(cfg, key, value)
    return cfg


def _values(schedule, steps):
    return [float(schedule(s)) for s in steps]


def test_constant_schedule():
    s = build_schedule(_train_cfg(learning_rate=0.05))
    assert _values(s, [0, 10, 10_000]) == pytest.approx([0.05] * 3)


def test_piecewise_schedule_follows_facenet_schedule_file():
    # FaceNet's learning_rate_schedule_classifier_casia.txt: "0: 0.05, 60: 0.005, 80: 0.0005"
    cfg = _train_cfg(lr_schedule="piecewise", lr_piecewise=[[0, 0.05], [60, 0.005], [80, 0.0005]],
                     steps_per_epoch=100, learning_rate=123.0)
    s = build_schedule(cfg)
    steps = [0, 5999, 6000, 7999, 8000, 1_000_000]
    assert _values(s, steps) == pytest.approx([0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005])


def test_piecewise_before_first_entry_and_fractional_epochs():
    s = PiecewiseEpochSchedule([[1, 0.1], [2.5, 0.01]], steps_per_epoch=10)
    assert _values(s, [0, 9, 10, 24, 25]) == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.01])


@pytest.mark.parametrize("points, words", [([[0, 0.1], [5, -1]], "train.epochs"),
                                           ([[3, 0.1], [1, 0.01]], "ascending")])
def test_piecewise_refuses_bad_entries(points, words):
    with pytest.raises(UserError, match=words):
        PiecewiseEpochSchedule(points, steps_per_epoch=10)


def test_cosine_with_linear_warmup_values():
    cfg = _train_cfg(lr_schedule="cosine", learning_rate=0.1, epochs=3, steps_per_epoch=10, warmup_epochs=1)
    s = build_schedule(cfg)
    assert isinstance(s, WarmupCosineSchedule)
    assert (s.total_steps, s.warmup_steps) == (30, 10)
    # warm-up: lr * (step + 1) / warmup_steps
    assert _values(s, [0, 4, 9]) == pytest.approx([0.01, 0.05, 0.1], rel=1e-6)
    # then cosine from 0.1 at step 10 to 0 at step 30, 0.05 half-way
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 20)) for t in (10, 15, 20, 25, 30)]
    assert _values(s, [10, 15, 20, 25, 30]) == pytest.approx(expected, abs=1e-7)
    assert float(s(45)) == pytest.approx(0.0, abs=1e-7)


def test_cosine_without_warmup_starts_at_base():
    s = build_schedule(_train_cfg(lr_schedule="cosine", learning_rate=0.2, epochs=1, steps_per_epoch=4))
    assert _values(s, [0, 2, 4]) == pytest.approx([0.2, 0.1, 0.0], abs=1e-7)


def test_warmup_longer_than_training_is_a_config_error():
    with pytest.raises(UserError, match="train.warmup_epochs"):
        build_schedule(_train_cfg(lr_schedule="cosine", epochs=1, warmup_epochs=2))


def test_schedules_serialise_with_keras():
    for s in (build_schedule(_train_cfg()),
              PiecewiseEpochSchedule([[0, 0.1], [2, 0.01]], 7),
              WarmupCosineSchedule(0.1, 100, 10)):
        again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(s))
        assert type(again) is type(s)
        assert _values(again, [0, 9, 50]) == pytest.approx(_values(s, [0, 9, 50]))


@pytest.mark.parametrize("name, cls, extra", [
    ("adam", keras.optimizers.Adam, {}),
    ("adamw", keras.optimizers.AdamW, {"weight_decay": 1e-4}),
    ("sgd", keras.optimizers.SGD, {"momentum": 0.8, "nesterov": True}),
    ("rmsprop", keras.optimizers.RMSprop, {"momentum": 0.5}),
    ("adagrad", keras.optimizers.Adagrad, {}),
])
def test_every_optimizer_builds_and_steps(name, cls, extra):
    cfg = _train_cfg(optimizer=name, learning_rate=0.01, **extra)
    var = keras.Variable(np.ones(3, np.float32))
    opt = build_optimizer(cfg)
    assert isinstance(opt, cls)
    if name == "sgd":
        assert opt.momentum == pytest.approx(0.8) and opt.nesterov
    opt.apply([keras.ops.convert_to_tensor(np.ones(3, np.float32))], [var])
    assert np.all(keras.ops.convert_to_numpy(var) < 1.0)
    assert current_learning_rate(opt) == pytest.approx(0.01)


def test_weight_decay_spares_batch_norm():
    cfg = _train_cfg(optimizer="sgd", momentum=0.0, learning_rate=0.1, weight_decay=0.5)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(2, name="dense")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, x)
    opt = build_optimizer(cfg, model)
    kernel = model.get_layer("dense").kernel
    gamma = model.get_layer("bn").gamma
    before_k, before_g = kernel.numpy().copy(), gamma.numpy().copy()
    zeros = [keras.ops.zeros(v.shape) for v in model.trainable_variables]
    opt.apply(zeros, model.trainable_variables)
    np.testing.assert_allclose(kernel.numpy(), before_k * (1 - 0.1 * 0.5), rtol=1e-6)  # decayed
    np.testing.assert_allclose(gamma.numpy(), before_g)  # not decayed


def test_mixed_float16_wraps_in_loss_scale_optimizer():
    opt = build_optimizer(_train_cfg(), loss_scale=True)
    assert isinstance(opt, keras.optimizers.LossScaleOptimizer)


def test_config_schedule_keys_round_trip():
    cfg = load_config(None, ["train.lr_schedule=piecewise", "train.lr_piecewise=[[0, 0.1], [10, 0.01]]",
                             "train.steps_per_epoch=5"])
    assert float(build_schedule(cfg.train)(50)) == pytest.approx(0.01)


@pytest.mark.parametrize("name", ["adam", "sgd", "rmsprop"])
@pytest.mark.parametrize("loss_scale", [False, True])
def test_scaled_variables_step_at_their_multiple_of_the_rate(name, loss_scale):
    """Two variables with the same gradient: the scaled one moves `multiplier` times as far, over
    several steps (momentum and moments included), the other as without any scaling."""
    cfg = _train_cfg(optimizer=name, learning_rate=0.01, momentum=0.9)
    plain, scaled, alone = (keras.Variable(np.ones(4, np.float32)) for _ in range(3))
    opt = build_optimizer(cfg, loss_scale=loss_scale)
    inner = getattr(opt, "inner_optimizer", opt)
    inner.scale_learning_rate([scaled], 5.0)
    reference = build_optimizer(cfg, loss_scale=loss_scale)
    opt.build([plain, scaled])
    reference.build([alone])
    for step in range(3):
        grad = np.array([1.0, -2.0, 0.5, 3.0], np.float32) * (step + 1)
        if loss_scale:  # the loss-scale optimizer is handed scaled gradients and unscales them
            grad = grad * float(keras.ops.convert_to_numpy(opt.dynamic_scale))
        grad = keras.ops.convert_to_tensor(grad)
        opt.apply([grad, grad], [plain, scaled])
        reference.apply([grad], [alone])
    moved_plain = 1.0 - keras.ops.convert_to_numpy(plain)
    assert np.abs(moved_plain).min() > 1e-3
    np.testing.assert_allclose(keras.ops.convert_to_numpy(plain), keras.ops.convert_to_numpy(alone), rtol=1e-6)
    np.testing.assert_allclose(1.0 - keras.ops.convert_to_numpy(scaled), 5.0 * moved_plain, rtol=1e-4)


def test_scale_learning_rate_refuses_a_non_positive_multiplier():
    opt = build_optimizer(_train_cfg())
    with pytest.raises(ValueError, match="multiplier must be > 0, received 0"):
        opt.scale_learning_rate([keras.Variable(np.ones(2, np.float32))], 0.0)
