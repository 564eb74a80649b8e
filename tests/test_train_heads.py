"""Training with every margin head: a few steps, resume, centres in the checkpoint only."""

from __future__ import annotations

import io

import numpy as np
import pytest

from mobilenet_embed.config import MARGIN_HEADS, load_config
from mobilenet_embed.errors import UserError
from mobilenet_embed.train import train

TINY = [
    "data.source=synthetic", "data.image_size=32", "data.synthetic_identities=12",
    "data.synthetic_images_per_identity=4", "data.val_identities=0",
    "model.alpha=0.25", "model.embedding_size=16",
    "train.identities_per_batch=4", "train.images_per_identity=2", "train.epochs=1",
    "train.steps_per_epoch=2", "train.log_every_steps=1", "train.checkpoint_every_steps=1",
]

# every head once; softmax with uniform sampling, CosFace with a margin warm-up, ArcFace with a
# triplet term and Partial FC sampling
VARIANTS = [
    ["loss.name=softmax", "loss.softmax.scale=16", "data.sampling=uniform"],
    ["loss.name=cosface", "loss.cosface.scale=16", "loss.margin_warmup_epochs=1"],
    ["loss.name=arcface", "loss.arcface.scale=16", "loss.triplet_weight=0.5", "loss.sample_rate=0.5"],
    ["loss.name=subcenter_arcface", "loss.subcenter_arcface.scale=16"],
]
assert {v[0].split("=")[1] for v in VARIANTS} == set(MARGIN_HEADS)


def _centres(run_dir, step):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(f"{run_dir}/checkpoints/ckpt-{step:08d}/ckpt")
    return reader.get_tensor("head/centres/.ATTRIBUTES/VARIABLE_VALUE")


def _train_records(run_dir):
    import json

    with open(f"{run_dir}/metrics.jsonl", encoding="utf-8") as fh:
        return [r for r in map(json.loads, fh) if r["kind"] == "train"]


def _check_loss_terms(run_dir, overrides):
    """With a triplet term each logged step holds both unweighted terms, and loss is their weighted
    sum; without one there are no term keys."""
    steps = _train_records(run_dir)
    assert len(steps) == 2
    weight = next((float(o.split("=")[1]) for o in overrides if o.startswith("loss.triplet_weight=")), 0.0)
    for record in steps:
        if weight:
            head = record.get("head_weight", 1.0) * record["head_loss"]
            assert record["head_loss"] > 0 and record["triplet_loss"] >= 0
            assert record["loss"] == pytest.approx(head + weight * record["triplet_loss"], rel=1e-5)
        else:
            assert "head_loss" not in record and "triplet_loss" not in record


@pytest.mark.slow
@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: o[0].split("=")[1])
def test_every_head_trains_and_resumes(tmp_path, overrides):
    import keras

    run = str(tmp_path / "run")
    first = train(load_config(None, TINY + overrides), run_dir=run, stream=io.StringIO())
    assert first.steps == 2
    k = 3 if "subcenter" in overrides[0] else 1
    at_2 = _centres(run, 2)
    assert at_2.shape == (12 * k, 16) and at_2.dtype == np.float32
    assert not np.allclose(at_2, _centres(run, 1))  # the centres are trained
    _check_loss_terms(run, overrides)
    # model.keras is the embedding model alone
    saved = keras.models.load_model(first.paths["model"])
    assert all(tuple(w.shape) != (12 * k, 16) for w in saved.weights)
    log = io.StringIO()
    again = train(load_config(None, TINY + overrides + ["train.epochs=2"]), run_dir=run, stream=log)
    assert again.resumed_from == 2 and again.steps == 4, log.getvalue()
    assert np.isfinite(_centres(run, 4)).all()
    assert "loss" in log.getvalue() and "nan" not in log.getvalue()
    # CosFace's margin (0.4) warms up over epoch 1 (2 steps), read from the step: the resumed steps have it all
    margins = [r.get("margin") for r in _train_records(run)]
    warm = any(o.startswith("loss.margin_warmup_epochs=") for o in overrides)
    assert margins == (pytest.approx([0.0, 0.2, 0.4, 0.4]) if warm else [None] * 4)
    assert ("margin 0.400" in log.getvalue()) == warm


@pytest.mark.slow
def test_resume_with_other_identities_is_refused(tmp_path):
    run = str(tmp_path / "run")
    base = TINY + ["loss.name=softmax", "loss.softmax.scale=16"]
    train(load_config(None, base), run_dir=run, stream=io.StringIO())
    with pytest.raises(UserError) as err:
        train(load_config(None, base + ["data.synthetic_identities=10", "train.epochs=2"]), run_dir=run,
              stream=io.StringIO())
    message = str(err.value)
    assert "cannot resume" in message and "12 identities" in message and "10 x 1" in message
    assert "\n" not in message


@pytest.mark.slow
def test_head_fades_into_the_triplet_term_and_resumes_on_schedule(tmp_path):
    run = str(tmp_path / "run")
    fade = TINY + ["loss.name=cosface", "loss.cosface.scale=16", "loss.triplet_weight=1",
                   "loss.head_fade_epochs=[0, 1]"]
    log = io.StringIO()
    train(load_config(None, fade), run_dir=run, stream=log)
    assert "(head " in log.getvalue() and " x 1.00 triplet" in log.getvalue()
    # a resumed run reads the weight from the restored step: steps 3 and 4 are past the fade
    train(load_config(None, fade + ["train.epochs=2"]), run_dir=run, stream=io.StringIO())
    records = _train_records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["head_weight"] for r in records] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    for r in records:
        assert r["loss"] == pytest.approx(r["head_weight"] * r["head_loss"] + r["triplet_loss"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_centre_lr_multiplier_scales_the_centres_step_only(tmp_path):
    """One Adam step at loss.centre_lr_multiplier 10 moves the class centres ten times as far as at
    1 and leaves the model's step as it was (its gradient does not depend on the centres' update)."""
    import keras

    from mobilenet_embed.heads import head_from_config

    base = TINY + ["loss.name=arcface", "loss.arcface.scale=16", "train.steps_per_epoch=1",
                   "train.lr_schedule=constant", "train.learning_rate=0.001"]
    runs = {}
    for k in (1, 10):
        run = str(tmp_path / f"k{k}")
        train(load_config(None, base + [f"loss.centre_lr_multiplier={k}"]), run_dir=run, stream=io.StringIO())
        model = keras.models.load_model(f"{run}/model.keras")
        runs[k] = (_centres(run, 1), [w.numpy() for w in model.weights])
    cfg = load_config(None, base)
    start = head_from_config(cfg.loss, 12, 16, seed=cfg.seed).full_centres().numpy()
    moved_1, moved_10 = runs[1][0] - start, runs[10][0] - start
    big = np.abs(moved_1) > 1e-4  # centres with a gradient (Adam's first step is ~lr per element)
    assert big.sum() > 16
    np.testing.assert_allclose(moved_10[big], 10 * moved_1[big], rtol=1e-3)
    for a, b in zip(runs[1][1], runs[10][1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
