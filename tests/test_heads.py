"""Margin-softmax heads: values against NumPy, both ArcFace edge branches, precision, Partial FC
sampling, and two replicas (logical CPU devices) equal to one device."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from mobilenet_embed.config import LOSS_REGISTRY, MARGIN_HEADS, load_config
from mobilenet_embed.errors import UserError
from mobilenet_embed.heads import (ArcFaceHead, arcface_target, head_class, head_fade_weight, head_from_config,
                                   margin_softmax_loss, sample_classes, warmed_margin)

REPO = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))


def reference_loss(labels, emb, centres, name, margin=0.0, scale=1.0, easy_margin=False, k=1):
    """Margin-softmax cross-entropy in float64 NumPy, written from the papers' formulas (arccos, not
    the cos/sin expansion the code uses)."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    cos = (e @ w.T).reshape(len(e), -1, k).max(axis=2)
    rows = np.arange(len(e))
    cy = cos[rows, labels]
    theta = np.arccos(np.clip(cy, -1.0, 1.0))
    if name == "softmax":
        ty = cy
    elif name == "cosface":
        ty = cy - margin
    elif easy_margin:
        ty = np.where(cy > 0, np.cos(theta + margin), cy)
    else:
        ty = np.where(theta + margin <= math.pi, np.cos(theta + margin), cy - margin * math.sin(margin))
    logits = scale * cos
    logits[rows, labels] = scale * ty
    top = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(lse - logits[rows, labels]))


def problem(seed=0, b=12, c=10, d=6, k=1):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, size=b)
    return labels, rng.normal(size=(b, d)), rng.normal(size=(c * k, d))


CASES = [
    ("softmax", dict(scale=4.0)),
    ("cosface", dict(margin=0.35, scale=8.0)),
    ("arcface", dict(margin=0.5, scale=16.0)),
    ("arcface", dict(margin=0.5, scale=16.0, easy_margin=True)),
    ("subcenter_arcface", dict(margin=0.3, scale=8.0, k=3)),
]


def _head(name, opts, c, d, **kwargs):
    options = SimpleNamespace(margin=opts.get("margin", 0.0), scale=opts["scale"],
                              easy_margin=opts.get("easy_margin", False), subcenters=opts.get("k", 1))
    return head_class(name)(c, d, options, **kwargs)


@pytest.mark.parametrize("name, opts", CASES)
def test_head_matches_numpy(name, opts):
    k = opts.get("k", 1)
    labels, emb, centres = problem(1, k=k)
    head = _head(name, opts, 10, 6)
    head.centres.assign(centres.astype(np.float32))
    got = float(head(tf.constant(labels), tf.constant(emb, tf.float32)))
    ref = reference_loss(labels, emb, centres, "arcface" if "arcface" in name else name, opts.get("margin", 0.0),
                         opts["scale"], opts.get("easy_margin", False), k)
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert got > 0.1


def test_arcface_branches_theta_plus_margin_beyond_pi():
    """cos near -1 (theta near pi): cos(theta + m) would rise again; the default falls back to
    cos - m sin(m), easy margin keeps cos where cos <= 0; both against the arccos formulas."""
    m = 0.5
    cos = tf.constant([-0.999, -0.95, -0.5, 0.0, 0.3, 0.99, 1.0, -1.0])
    theta = np.arccos(cos.numpy().astype(np.float64))
    default = np.where(theta + m <= math.pi, np.cos(theta + m), cos.numpy() - m * math.sin(m))
    easy = np.where(cos.numpy() > 0, np.cos(theta + m), cos.numpy())
    np.testing.assert_allclose(arcface_target(cos, m).numpy(), default, atol=1e-5)
    np.testing.assert_allclose(arcface_target(cos, m, easy_margin=True).numpy(), easy, atol=1e-5)
    beyond = theta + m > math.pi
    assert beyond.sum() >= 2 and (~beyond).sum() >= 2  # both branches exercised
    # and inside a loss: a true centre opposite its embedding
    labels, emb, centres = problem(2)
    emb[0] = -centres[labels[0]]
    for easy_margin in (False, True):
        head = _head("arcface", dict(margin=m, scale=8.0, easy_margin=easy_margin), 10, 6)
        head.centres.assign(centres.astype(np.float32))
        got = float(head(tf.constant(labels), tf.constant(emb, tf.float32)))
        assert got == pytest.approx(reference_loss(labels, emb, centres, "arcface", m, 8.0, easy_margin), rel=1e-5)


@pytest.mark.parametrize("name", MARGIN_HEADS)
def test_gradients_finite_even_at_cos_one(name):
    labels, emb, centres = problem(3, k=3 if name == "subcenter_arcface" else 1)
    emb[0] = centres[labels[0] * (3 if name == "subcenter_arcface" else 1)]  # cos exactly 1
    head = _head(name, dict(margin=0.5, scale=16.0, k=3 if name == "subcenter_arcface" else 1), 10, 6)
    head.centres.assign(centres.astype(np.float32))
    x = tf.Variable(emb.astype(np.float32))
    with tf.GradientTape() as tape:
        loss = head(tf.constant(labels), x)
    ge, gw = tape.gradient(loss, [x, head.centres.value])
    assert np.isfinite(ge.numpy()).all() and np.isfinite(tf.convert_to_tensor(gw).numpy()).all()
    assert np.abs(ge.numpy()).max() > 1e-4


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_embeddings_give_float32_loss(dtype):
    labels, emb, centres = problem(4)
    head = _head("arcface", dict(margin=0.5, scale=16.0), 10, 6)
    head.centres.assign(centres.astype(np.float32))
    low = tf.cast(tf.constant(emb, tf.float32), dtype)
    loss = head(tf.constant(labels), low)
    assert loss.dtype == tf.float32 and head.centres.dtype == "float32"
    ref = reference_loss(labels, tf.cast(low, tf.float32).numpy().astype(np.float64), centres, "arcface", 0.5, 16.0)
    assert float(loss) == pytest.approx(ref, rel=1e-4)


def test_sample_rate_keeps_every_positive_and_equals_loss_on_kept_classes():
    rng = np.random.default_rng(5)
    c, b = 200, 16
    labels = rng.integers(0, c, size=b)
    emb, centres = rng.normal(size=(b, 8)), rng.normal(size=(c, 8))
    key = tf.constant([7, 11], tf.int64)
    local = tf.constant(labels, tf.int64)
    kept = sample_classes(local, tf.ones([b], tf.bool), tf.constant(c, tf.int64), 20, key).numpy()
    assert len(kept) == 20 and len(set(kept)) == 20 and set(labels) <= set(kept)
    assert (np.diff(kept) > 0).all()
    loss = margin_softmax_loss(local, tf.constant(emb, tf.float32), tf.constant(centres, tf.float32),
                               lambda x: x - 0.3, 8.0, sample_rate=0.1, sample_key=key)
    remap = {cls: i for i, cls in enumerate(kept)}
    ref = reference_loss(np.array([remap[y] for y in labels]), emb, centres[kept], "cosface", 0.3, 8.0)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    # fewer centres than the batch's identities: the positives still all fit
    kept_small = sample_classes(local, tf.ones([b], tf.bool), tf.constant(c, tf.int64), b, key).numpy()
    assert set(labels) <= set(kept_small)
    # another step (key) draws other negatives
    other = sample_classes(local, tf.ones([b], tf.bool), tf.constant(c, tf.int64), 20,
                           tf.constant([7, 12], tf.int64)).numpy()
    assert set(other) != set(kept)


def test_registry_drives_config_and_heads():
    cfg = load_config(None, ["loss.name=arcface", "loss.arcface.margin=0.3", "loss.arcface.scale=30"])
    head = head_from_config(cfg.loss, 5, 4)
    assert isinstance(head, ArcFaceHead) and head.options.margin == 0.3 and head.scale == 30.0
    assert tuple(head.centres.shape) == (5, 4)
    for name in MARGIN_HEADS:
        assert head_class(name).name_ == name
    assert set(MARGIN_HEADS) == {"softmax", "cosface", "arcface", "subcenter_arcface"}
    sub = head_from_config(load_config(None, ["loss.name=subcenter_arcface", "loss.subcenter_arcface.subcenters=2"]).loss,
                           5, 4)
    assert tuple(sub.centres.shape) == (10, 4)
    with pytest.raises(UserError, match="loss.name: expected one of softmax"):
        head_class("triplet_semihard")


@pytest.mark.parametrize("overrides, message", [
    (["loss.name=cosface", "loss.arcface.margin=0.3"], "loss.arcface.margin: not used (loss.name is 'cosface'), received 0.3"),
    (["loss.name=cosface", "loss.cosface.easy_margin=true"], "loss.cosface.easy_margin: unknown key (known here: margin, scale)"),
    (["loss.margin=0.3"], "loss.margin: moved to loss.triplet_semihard.margin"),
    (["loss.name=triplet_hard", "loss.soft=true"], "loss.soft: moved to loss.triplet_hard.soft"),
    (["loss.sample_rate=0.5"], "loss.sample_rate: only applies to a margin head"),
    (["loss.triplet_weight=0.5"], "loss.triplet_weight: only applies to a margin head"),
    (["loss.name=arcface", "loss.triplet_hard.margin=0.5"], "loss.triplet_hard.margin: not used (loss.name is 'arcface')"),
    (["loss.name=arcface", "loss.triplet_semihard.margin=0.5"], "loss.triplet_semihard.margin: not used (loss.triplet_weight is 0)"),
    (["data.sampling=uniform"], "data.sampling: triplet losses mine positives inside P x K batches"),
    (["loss.name=arcface", "loss.triplet_term=triplet_hard"], "loss.triplet_term: not used (loss.triplet_weight is 0)"),
    (["loss.name=arcface", "loss.triplet_weight=1", "data.sampling=uniform"], "data.sampling: triplet losses"),
    (["loss.name=arcface", "loss.sample_rate=0"], "loss.sample_rate: expected a number > 0 and <= 1"),
    (["loss.centre_lr_multiplier=10"], "loss.centre_lr_multiplier: only applies to a margin head"),
    (["loss.margin_warmup_epochs=1"], "loss.margin_warmup_epochs: only applies to a margin head"),
    (["loss.name=softmax", "loss.margin_warmup_epochs=1"], "loss.margin_warmup_epochs: softmax has no margin to warm up"),
    (["loss.name=arcface", "train.epochs=2", "loss.margin_warmup_epochs=3"],
     "loss.margin_warmup_epochs: the warm-up is longer than the run (train.epochs 2), so the margin would never "
     "reach loss.arcface.margin; received 3"),
    (["loss.name=arcface", "loss.centre_lr_multiplier=0"], "loss.centre_lr_multiplier: expected a number > 0"),
    (["loss.head_fade_epochs=[0, 1]"], "loss.head_fade_epochs: fades a margin head into its triplet term, so it "
                                       "needs a head and loss.triplet_weight > 0 (loss.name is 'triplet_semihard')"),
    (["loss.name=cosface", "loss.head_fade_epochs=[0, 1]"], "needs a head and loss.triplet_weight > 0 "
                                                            "(loss.triplet_weight is 0), received [0, 1]"),
    (["loss.name=cosface", "loss.triplet_weight=1", "loss.head_fade_epochs=[2, 1]"],
     "loss.head_fade_epochs: expected [start, end] epochs with 0 <= start <= end, received [2, 1]"),
    (["loss.name=cosface", "loss.triplet_weight=1", "loss.head_fade_epochs=[1]"], "expected [start, end] epochs"),
    (["loss.name=cosface", "loss.triplet_weight=1", "loss.head_fade_epochs=[a, 2]"], "expected [start, end] epochs"),
    (["loss.name=cosface", "loss.triplet_weight=1", "train.epochs=3", "loss.head_fade_epochs=[3, 4]"],
     "loss.head_fade_epochs: the fade would start at epoch 3, when the run has ended (train.epochs 3)"),
])
def test_loss_config_errors_are_one_line(overrides, message):
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_head_fade_weight_falls_linearly_then_stays_at_zero():
    weights = [float(head_fade_weight(tf.constant(step), 2, 6)) for step in range(9)]
    assert weights == pytest.approx([1, 1, 1, 0.75, 0.5, 0.25, 0, 0, 0])
    # start == end: a switch at that step
    assert [float(head_fade_weight(tf.constant(step, tf.int64), 3, 3)) for step in range(5)] == [1, 1, 1, 0, 0]


def test_warmed_margin_grows_linearly_then_stays():
    margins = [float(warmed_margin(tf.constant(step, tf.int64), 0.4, 4)) for step in range(7)]
    assert margins == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4])


@pytest.mark.parametrize("easy_margin", [False, True])
def test_arcface_target_takes_a_tensor_margin(easy_margin):
    cos = tf.constant([-0.999, -0.95, -0.5, 0.0, 0.3, 0.99, 1.0, -1.0])
    for m in (0.0, 0.2, 0.5):
        np.testing.assert_allclose(arcface_target(cos, tf.constant(m), easy_margin).numpy(),
                                   arcface_target(cos, m, easy_margin).numpy(), atol=1e-6)


@pytest.mark.parametrize("name, opts", [("cosface", dict(margin=0.35, scale=8.0)),
                                        ("arcface", dict(margin=0.5, scale=16.0, easy_margin=True))])
def test_margin_warmup_starts_as_softmax_and_ends_at_the_margin(name, opts):
    """With a 4-step warm-up the head's loss at step 0 is the normalised softmax's, at step 2 that
    of half the margin, and from step 4 on the full margin's (NumPy reference throughout)."""
    labels, emb, centres = problem(4)
    step = tf.Variable(0, dtype=tf.int64)
    head = _head(name, opts, 10, 6, step=step, margin_warmup_steps=4)
    head.centres.assign(centres.astype(np.float32))
    args = (tf.constant(labels), tf.constant(emb, tf.float32))
    for at, margin in ((0, 0.0), (2, opts["margin"] / 2), (4, opts["margin"]), (9, opts["margin"])):
        step.assign(at)
        ref = reference_loss(labels, emb, centres, name, margin, opts["scale"], opts.get("easy_margin", False))
        assert float(tf.function(head.loss)(*args)) == pytest.approx(ref, rel=1e-5)
    assert reference_loss(labels, emb, centres, name, 0.0, opts["scale"]) < ref  # the margin matters here
    with pytest.raises(ValueError, match="needs a head with a margin and the step variable"):
        _head(name, opts, 10, 6, margin_warmup_steps=4)


def test_margin_warmup_epochs_become_steps():
    cfg = load_config(None, ["loss.name=arcface", "train.epochs=2", "loss.margin_warmup_epochs=1.5"])
    head = head_from_config(cfg.loss, 5, 4, step=tf.Variable(0, dtype=tf.int64), steps_per_epoch=10)
    assert head.margin_warmup_steps == 15
    with pytest.raises(UserError, match="loss.margin_warmup_epochs: 1.5 epochs of 0 steps is less than one step"):
        head_from_config(cfg.loss, 5, 4, step=tf.Variable(0, dtype=tf.int64))


def test_triplet_term_options_used_with_weight():
    cfg = load_config(None, ["loss.name=cosface", "loss.triplet_weight=0.5", "loss.triplet_term=triplet_hard",
                             "loss.triplet_hard.margin=0.3", "data.sampling=pk"])
    assert cfg.loss.triplet_hard.margin == 0.3
    assert set(LOSS_REGISTRY) >= set(MARGIN_HEADS)


# --------------------------------------------------------------------------- two replicas

SHARDED_SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np
    import tensorflow as tf
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    from types import SimpleNamespace
    from mobilenet_embed.distribute import gather_replicas
    from mobilenet_embed.heads import head_class, margin_softmax_loss, arcface_target, shard_bounds

    rng = np.random.default_rng(9)
    B, C, D = 16, 11, 6                                   # 11 classes: shards of 6 and 5
    labels = rng.integers(0, C, size=B).astype(np.int64)
    emb = rng.normal(size=(B, D)).astype(np.float32)
    w0 = rng.normal(size=(C * 2, D)).astype(np.float32)   # k = 2 sub-centres
    target = lambda c: arcface_target(c, 0.5)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"],
                                              cross_device_ops=tf.distribute.ReductionToOneDevice())
    out = {"replicas": strategy.num_replicas_in_sync}

    # one device
    e1, w1 = tf.constant(emb), tf.constant(w0)
    with tf.GradientTape() as tape:
        tape.watch([e1, w1])
        loss1 = margin_softmax_loss(labels, e1, w1, target, 16.0, subcenters=2)
    ge1, gw1 = tape.gradient(loss1, [e1, w1])

    # (a) the pure function, each replica holding only its slice of the centres
    def shard(ctx):
        r = ctx.replica_id_in_sync_group
        start, count = 6 * r, (6 if r == 0 else 5)
        return (tf.constant(emb[8 * r:8 * r + 8]), tf.constant(labels[8 * r:8 * r + 8]),
                tf.constant(w0[2 * start:2 * (start + count)]), tf.constant(start, tf.int64))
    args = strategy.experimental_distribute_values_from_function(shard)

    @tf.function
    def step(e, y, w, start):
        ctx = tf.distribute.get_replica_context()
        with tf.GradientTape() as tape:
            tape.watch([e, w])
            loss = margin_softmax_loss(gather_replicas(ctx, y), gather_replicas(ctx, e), w, target, 16.0,
                                       subcenters=2, class_offset=start, ctx=ctx)
            objective = loss / 2.0
        ge, gw = tape.gradient(objective, [e, w])
        return loss, ge, gw

    loss2, ge2, gw2 = strategy.run(step, args=args)
    local = strategy.experimental_local_results
    out["sharded"] = {
        "loss_one": float(loss1), "loss_replicas": [float(v) for v in local(loss2)],
        "grad_e_diff": float(np.abs(np.concatenate([g.numpy() for g in local(ge2)]) - ge1.numpy()).max()),
        "grad_w_diff": float(np.abs(np.concatenate([g.numpy() for g in local(gw2)]) - gw1.numpy()).max()),
        "grad_e_max": float(np.abs(ge1.numpy()).max()), "grad_w_max": float(np.abs(gw1.numpy()).max()),
        "shards": [int(x) for x in [shard_bounds(C, 2, 0)[1], shard_bounds(C, 2, 1)[1]]],
    }

    # (b) the head object as training uses it: each replica stores and scores its shard of W;
    # its gradient is the whole gradient of that shard (no all-reduce)
    opts = SimpleNamespace(margin=0.5, scale=16.0, easy_margin=False, subcenters=2)
    with strategy.scope():
        head = head_class("subcenter_arcface")(C, D, opts)
    head.set_centres(w0)

    @tf.function
    def head_step(e, y):
        ctx = tf.distribute.get_replica_context()
        with tf.GradientTape() as tape:
            tape.watch(e)
            loss = head(gather_replicas(ctx, y), gather_replicas(ctx, e))
            objective = loss / 2.0
        ge, gw = tape.gradient(objective, [e, head.centres.value])
        return loss, ge, tf.convert_to_tensor(gw)

    halves = strategy.experimental_distribute_values_from_function(
        lambda ctx: (tf.constant(emb[8 * ctx.replica_id_in_sync_group:][:8]),
                     tf.constant(labels[8 * ctx.replica_id_in_sync_group:][:8])))
    loss3, ge3, gw3 = strategy.run(head_step, args=halves)
    out["head"] = {
        "loss_replicas": [float(v) for v in local(loss3)],
        "grad_e_diff": float(np.abs(np.concatenate([g.numpy() for g in local(ge3)]) - ge1.numpy()).max()),
        "grad_w_diff": float(np.abs(np.concatenate([g.numpy() for g in local(gw3)])[:2 * C] - gw1.numpy()).max()),
    }
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_two_replicas_sharded_equal_one_device():
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, cwd=REPO,
                            timeout=300, env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3",
                                              "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    s = out["sharded"]
    assert s["shards"] == [6, 5]
    for value in s["loss_replicas"] + out["head"]["loss_replicas"]:
        assert abs(value - s["loss_one"]) < 1e-5
    assert s["grad_e_max"] > 1e-3 and s["grad_w_max"] > 1e-3  # not a comparison of zeros
    assert s["grad_e_diff"] < 1e-5 and s["grad_w_diff"] < 1e-5
    assert out["head"]["grad_e_diff"] < 1e-5 and out["head"]["grad_w_diff"] < 1e-5


@pytest.mark.parametrize("rate", [1.0, 0.3])
def test_xla_equals_eager(rate):
    labels, emb, centres = problem(6, b=8, c=40)
    args = (tf.constant(labels), tf.constant(emb, tf.float32), tf.constant(centres, tf.float32))

    def loss_and_grads(y, e, w):
        with tf.GradientTape() as tape:
            tape.watch([e, w])
            loss = margin_softmax_loss(y, e, w, lambda c: arcface_target(c, 0.5), 16.0, sample_rate=rate,
                                       sample_key=tf.constant([1, 2], tf.int64))
        ge, gw = tape.gradient(loss, [e, w])
        return loss, ge, tf.convert_to_tensor(gw)

    eager = loss_and_grads(*args)
    compiled = tf.function(loss_and_grads, jit_compile=True)(*args)
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)


def test_saved_run_config_with_flat_loss_keys_still_reads(tmp_path):
    """A run directory's config.yaml written before the nested loss options (results/lfw/config.yaml
    has this form) is moved into place; a user's file with flat keys is refused (above)."""
    from mobilenet_embed.config import config_from_dict

    old = {"loss": {"name": "triplet_hard", "margin": 0.3, "distance": "L2", "soft": True}}
    cfg = config_from_dict(old, source="runs/x/config.yaml")
    assert (cfg.loss.triplet_hard.margin, cfg.loss.triplet_hard.distance, cfg.loss.triplet_hard.soft) == (0.3, "L2", True)
    semi = config_from_dict({"loss": {"name": "triplet_semihard", "margin": 0.25, "distance": "L2", "soft": False}})
    assert semi.loss.triplet_semihard.margin == 0.25 and semi.loss.triplet_hard.soft is False


def test_old_run_config_file_reads_as_config_option(tmp_path):
    """`--config RUN/config.yaml` of a run written with flat loss keys (it carries `versions:`)
    reads as written; the same keys in a hand-written file without `versions:` are refused."""
    from mobilenet_embed.config import load_config
    from mobilenet_embed.errors import UserError

    body = "loss:\n  name: triplet_hard\n  margin: 0.3\n  distance: L2\n  soft: true\n"
    run_cfg = tmp_path / "config.yaml"
    run_cfg.write_text(body + "versions:\n  mbembed: 0.1.0\n")
    cfg = load_config(str(run_cfg), [])
    assert (cfg.loss.triplet_hard.margin, cfg.loss.triplet_hard.distance, cfg.loss.triplet_hard.soft) == (0.3, "L2", True)
    hand = tmp_path / "mine.yaml"
    hand.write_text(body)
    with pytest.raises(UserError, match="loss.margin: moved to loss.triplet_hard.margin"):
        load_config(str(hand), [])


SHARD_STORAGE_SCRIPT = textwrap.dedent(
    """
    import io, json, sys
    import numpy as np
    import tensorflow as tf
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from types import SimpleNamespace
    from mobilenet_embed.heads import head_class
    from mobilenet_embed.config import TrainConfig, load_config
    from mobilenet_embed.optim import build_optimizer
    from mobilenet_embed.train import train

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"],
                                              cross_device_ops=tf.distribute.ReductionToOneDevice())
    opts = SimpleNamespace(margin=0.5, scale=16.0, easy_margin=False, subcenters=1)
    C, D = 12, 4
    with strategy.scope():
        head = head_class("arcface")(C, D, opts)
        opt = build_optimizer(TrainConfig())  # Adam; gradients are summed by the train step, not by it
        opt.build(list(head.trainable_variables))
        head.track_optimizer_slots(opt)
    out = {"shards": [[list(c.shape), c.device] for c in head.centres.value.values]}
    one = head_class("arcface")(C, D, opts)
    out["init_diff"] = float(np.abs(head.full_centres().numpy() - one.centres.numpy()).max())

    def step(h, optimizer):  # a different gradient on each replica: the shards' moments differ
        def fn():
            ctx = tf.distribute.get_replica_context()
            grad = tf.ones_like(h.centres.value) * tf.cast(ctx.replica_id_in_sync_group + 1, tf.float32)
            optimizer.apply([grad], [h.centres])
        tf.function(lambda: strategy.run(fn))()
    step(head, opt)
    momentum = [v for v in opt.variables if v.path.endswith("class_centres_momentum")][0]
    moments = np.concatenate([c.numpy() for c in momentum.value.values])
    path = tf.train.Checkpoint(head=head, optimizer=opt).write(sys.argv[1] + "/ckpt")
    out["saved"] = {n: s for n, s in tf.train.list_variables(path) if "VARIABLE_VALUE" in n and s}
    one_opt = build_optimizer(TrainConfig())
    one_opt.build([one.centres])
    tf.train.Checkpoint(head=one, optimizer=one_opt).read(path).assert_existing_objects_matched()
    out["to_one_device"] = float(np.abs(one.centres.numpy() - head.full_centres().numpy()).max())
    one_momentum = [v for v in one_opt.variables if v.path.endswith("class_centres_momentum")][0]
    out["moments_to_one_device"] = float(np.abs(one_momentum.numpy() - moments).max())
    out["moments_differ"] = bool(np.abs(moments[:6] - moments[6:]).max() > 1e-3)

    # a learning-rate multiplier on the sharded centres: each replica's shard steps 4 times as far
    with strategy.scope():
        scaled = head_class("arcface")(C, D, opts)
        scaled_opt = build_optimizer(TrainConfig())
        scaled_opt.build(list(scaled.trainable_variables))
        scaled_opt.scale_learning_rate(scaled.trainable_variables, 4.0)
    start = scaled.full_centres().numpy()
    step(scaled, scaled_opt)
    out["scaled_step"] = (start - scaled.full_centres().numpy()).tolist()
    fresh = head_class("arcface")(C, D, opts).centres.numpy()  # the initial centres (seeded), as init_diff shows
    out["plain_step"] = (fresh - head.full_centres().numpy()).tolist()

    # the CLI loop: two steps with every replica holding its shard, then resumed on two replicas
    tiny = ["data.source=synthetic", "data.image_size=32", "data.synthetic_identities=12",
            "data.synthetic_images_per_identity=4", "data.val_identities=0", "model.alpha=0.25",
            "model.embedding_size=16", "train.identities_per_batch=4", "train.images_per_identity=2",
            "train.steps_per_epoch=2", "train.log_every_steps=1", "train.strategy=mirrored",
            "loss.name=cosface", "loss.cosface.scale=16"]
    first = train(load_config(None, tiny + ["train.epochs=1"]), run_dir=sys.argv[1] + "/run", stream=io.StringIO())
    log = io.StringIO()
    again = train(load_config(None, tiny + ["train.epochs=2"]), run_dir=sys.argv[1] + "/run", stream=log)
    reader = tf.train.load_checkpoint(sys.argv[1] + "/run/checkpoints/ckpt-00000004/ckpt")
    out["run"] = {"steps": [first.steps, again.steps], "resumed_from": again.resumed_from,
                  "centres": list(reader.get_tensor("head/centres/.ATTRIBUTES/VARIABLE_VALUE").shape),
                  "finite": bool(np.isfinite(reader.get_tensor("head/centres/.ATTRIBUTES/VARIABLE_VALUE")).all()),
                  "nan_in_log": "nan" in log.getvalue()}
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_each_replica_stores_only_its_shard_of_the_centres(tmp_path):
    """Under MirroredStrategy on two logical devices each replica's W holds C / R rows on its own
    device; the checkpoint holds the whole matrix (and the optimizer's moments of it), as one device's does."""
    result = subprocess.run([sys.executable, "-c", SHARD_STORAGE_SCRIPT, str(tmp_path)], capture_output=True,
                            text=True, cwd=REPO, timeout=600,
                            env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert [s for s, _ in out["shards"]] == [[6, 4], [6, 4]]
    assert out["shards"][0][1].endswith("CPU:0") and out["shards"][1][1].endswith("CPU:1")
    assert out["init_diff"] == 0.0  # the same initial centres as on one device
    # whole [C, D] tensors: the centres and Adam's two moments of them
    assert out["saved"]["head/centres/.ATTRIBUTES/VARIABLE_VALUE"] == [12, 4]
    assert sorted(s for n, s in out["saved"].items() if n.startswith("optimizer/")) == [[12, 4], [12, 4]]
    assert out["moments_differ"]
    assert out["to_one_device"] == 0.0 and out["moments_to_one_device"] == 0.0
    plain, scaled = np.array(out["plain_step"]), np.array(out["scaled_step"])
    assert np.abs(plain).min() > 1e-4  # every row of both shards moved
    np.testing.assert_allclose(scaled, 4.0 * plain, rtol=1e-4)
    run = out["run"]
    assert run["steps"] == [2, 4] and run["resumed_from"] == 2
    assert run["centres"] == [12, 16] and run["finite"] and not run["nan_in_log"]
