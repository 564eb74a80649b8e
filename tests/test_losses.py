"""Triplet losses: tensorflow-addons parity, hand-computed cases, gradients, dtypes, XLA, replicas, Keras."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from mobilenet_embed.errors import UserError
from mobilenet_embed.losses import (
    LOSSES,
    TripletBatchAllLoss,
    TripletHardLoss,
    TripletSemiHardLoss,
    loss_from_config,
    mining_stats,
    pairwise_distances,
    triplet_batch_all_loss,
    triplet_hard_loss,
    triplet_semihard_loss,
)

DATA = Path(__file__).parent / "data"
CASES = json.loads((DATA / "tfa_triplet_cases.json").read_text())
ARRAYS = np.load(DATA / "tfa_triplet_cases.npz")
DISTANCES = ("L2", "squared-L2", "angular")
REPO = Path(__file__).resolve().parents[1]


def _close(value: float, reference: float) -> bool:
    return abs(value - reference) <= 1e-6 + 1e-5 * abs(reference)


# --------------------------------------------------------------------------- tfa parity

def test_reference_has_46_cases():
    assert [c["case"] for c in CASES] == list(range(46))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"case{c['case']}-{c['kind']}-{c['distance_metric']}")
def test_matches_tensorflow_addons(case):
    k = case["case"]
    labels, embeddings = ARRAYS[f"labels_{k}"], ARRAYS[f"embeddings_{k}"]
    if case["kind"] == "semihard":
        value = triplet_semihard_loss(labels, embeddings, case["margin"], case["distance_metric"])
    else:
        value = triplet_hard_loss(labels, embeddings, case["margin"], case["soft"], case["distance_metric"])
    assert value.dtype == tf.float32 and value.shape == ()
    value = float(value)
    assert math.isfinite(value)
    if math.isnan(case["loss"]):
        # tfa divides 0 by 0 when no label repeats; a training loss must give 0.0.
        assert k == 40 and len(set(labels.tolist())) == len(labels)
        assert value == 0.0
    else:
        assert _close(value, case["loss"]), (value, case["loss"])


# --------------------------------------------------------------------------- hand-computed cases

# Points on a line: labels 0,0,1,1 at x = 0,1,3,7 -> d(0,1)=1 d(0,2)=3 d(0,3)=7 d(1,2)=2 d(1,3)=6 d(2,3)=4.
LINE_LABELS = np.array([0, 0, 1, 1], np.int32)
LINE_EMB = np.array([[0.0], [1.0], [3.0], [7.0]], np.float32)
LINE_MARGIN = 1.5
# Hinge d(a,p) - d(a,n) + 1.5 of the 8 valid triplets; positive for (1,0,2)=0.5, (2,3,0)=2.5, (2,3,1)=3.5.


def test_semihard_by_hand():
    # a0,p1 (1): n=3 -> 0;  a1,p0 (1): n=2 -> 0.5;  a2,p3 (4): none farther, farthest 3 -> 2.5;
    # a3,p2 (4): n=6 -> 0.   Sum 3.0 over 4 pairs.
    value = triplet_semihard_loss(LINE_LABELS, LINE_EMB, LINE_MARGIN, "L2")
    assert float(value) == pytest.approx(0.75, abs=1e-6)


def test_hard_by_hand():
    # gaps (hardest pos - hardest neg): a0 1-3, a1 1-2, a2 4-2, a3 4-6
    gaps = [-2.0, -1.0, 2.0, -2.0]
    hinge = sum(max(g + LINE_MARGIN, 0.0) for g in gaps) / 4
    soft = sum(math.log1p(math.exp(g)) for g in gaps) / 4
    assert float(triplet_hard_loss(LINE_LABELS, LINE_EMB, LINE_MARGIN, False, "L2")) == pytest.approx(hinge, abs=1e-6)
    assert float(triplet_hard_loss(LINE_LABELS, LINE_EMB, LINE_MARGIN, True, "L2")) == pytest.approx(soft, abs=1e-6)


def test_batch_all_by_hand():
    value = triplet_batch_all_loss(LINE_LABELS, LINE_EMB, LINE_MARGIN, "L2")
    assert float(value) == pytest.approx((0.5 + 2.5 + 3.5) / 3, abs=1e-6)
    # squared-L2 with margin 0: d(a,p)^2 - d(a,n)^2 > 0 only for (2,3,0): 16-9 and (2,3,1): 16-4.
    value = triplet_batch_all_loss(LINE_LABELS, LINE_EMB, 0.0, "squared-L2")
    assert float(value) == pytest.approx((7.0 + 12.0) / 2, abs=1e-5)


def test_ties_are_strict():
    # labels 0,0,1,1 at x = 0,2,-2,5: d(0,1)=2 d(0,2)=2 d(0,3)=5 d(1,2)=4 d(1,3)=3 d(2,3)=7.
    labels = np.array([0, 0, 1, 1])
    emb = np.array([[0.0], [2.0], [-2.0], [5.0]], np.float32)
    # Semi-hard wants a negative strictly farther: a0,p1 (2) skips n at 2 and takes 5 -> 0;
    # a1,p0 (2): 3 -> 0; a2,p3 (7): none farther, farthest 4 -> 4; a3,p2 (7): farthest 5 -> 3.
    assert float(triplet_semihard_loss(labels, emb, 1.0, "L2")) == pytest.approx(7 / 4, abs=1e-6)
    # Batch-all, margin 0: the tie (0,1,2) has hinge 0 and is not counted; active 5,3,2,4.
    assert float(triplet_batch_all_loss(labels, emb, 0.0, "L2")) == pytest.approx(14 / 4, abs=1e-6)
    assert float(mining_stats(labels, emb, 0.0, "L2")["active_fraction"]) == pytest.approx(4 / 8)


def test_mining_stats_by_hand():
    stats = mining_stats(LINE_LABELS, LINE_EMB, LINE_MARGIN, "L2")
    assert set(stats) == {"active_fraction", "mean_pos_dist", "mean_neg_dist", "embedding_spread"}
    assert all(v.dtype == tf.float32 and v.shape == () for v in stats.values())
    assert float(stats["active_fraction"]) == pytest.approx(3 / 8)
    assert float(stats["mean_pos_dist"]) == pytest.approx((1 + 1 + 4 + 4) / 4)
    assert float(stats["mean_neg_dist"]) == pytest.approx(2 * (3 + 7 + 2 + 6) / 8)
    # population std of 0,1,3,7: mean 2.75, variance 28.75 / 4
    assert float(stats["embedding_spread"]) == pytest.approx(math.sqrt(28.75 / 4), rel=1e-6)


def test_no_positive_pair_gives_zero_everywhere():
    labels = np.arange(6)
    emb = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    for fn in (triplet_semihard_loss, triplet_batch_all_loss):
        assert float(fn(labels, emb, 0.2, "L2")) == 0.0
    stats = mining_stats(labels, emb, 0.2, "L2")
    assert float(stats["active_fraction"]) == 0.0 and float(stats["mean_pos_dist"]) == 0.0


def test_collapsed_embedding_shows_in_stats():
    labels = np.array([0, 0, 1, 1, 2, 2])
    emb = np.tile(np.array([[0.6, 0.8]], np.float32), (6, 1))
    stats = {k: float(v) for k, v in mining_stats(labels, emb, 0.2, "squared-L2").items()}
    assert stats["active_fraction"] == 1.0
    assert stats["mean_pos_dist"] == pytest.approx(0.0, abs=1e-6)
    assert stats["mean_neg_dist"] == pytest.approx(0.0, abs=1e-6)
    assert stats["embedding_spread"] == pytest.approx(0.0, abs=1e-6)
    assert float(triplet_semihard_loss(labels, emb, 0.2, "squared-L2")) == pytest.approx(0.2, abs=1e-6)


def _numpy_distances(emb: np.ndarray, metric: str) -> np.ndarray:
    emb = emb.astype(np.float64)
    if metric == "angular":
        unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        d = np.maximum(1.0 - unit @ unit.T, 0.0)
        np.fill_diagonal(d, 0.0)
        return d
    sq = ((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1)
    return sq if metric == "squared-L2" else np.sqrt(sq)


@pytest.mark.parametrize("metric", DISTANCES)
def test_batch_all_and_active_fraction_match_brute_force(metric):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, size=24)
    emb = rng.normal(size=(24, 6)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    margin = 0.3
    d = _numpy_distances(emb, metric)
    same = labels[:, None] == labels[None, :]
    pos = same & ~np.eye(24, dtype=bool)
    valid = pos[:, :, None] & ~same[:, None, :]
    hinge = d[:, :, None] - d[:, None, :] + margin
    active = valid & (hinge > 1e-16)
    expected_loss = hinge[active].sum() / active.sum()
    assert float(triplet_batch_all_loss(labels, emb, margin, metric)) == pytest.approx(expected_loss, rel=1e-5)
    stats = mining_stats(labels, emb, margin, metric)
    assert float(stats["active_fraction"]) == pytest.approx(active.sum() / valid.sum(), rel=1e-6)
    assert float(stats["mean_pos_dist"]) == pytest.approx(d[pos].mean(), rel=1e-5)
    assert float(stats["mean_neg_dist"]) == pytest.approx(d[~same].mean(), rel=1e-5)
    np.testing.assert_allclose(pairwise_distances(emb, metric).numpy(), d, atol=2e-6)


def test_labels_shape_and_dtype_and_callable_metric():
    k = 16  # a case with several classes
    labels, emb = ARRAYS[f"labels_{k}"], ARRAYS[f"embeddings_{k}"]
    ref = float(triplet_semihard_loss(labels, emb, 1.0, "squared-L2"))
    assert float(triplet_semihard_loss(labels.astype(np.int64)[:, None], emb, 1.0, "squared-L2")) == ref

    def squared(x):
        return tf.reduce_sum(tf.square(x[:, None, :] - x[None, :, :]), axis=-1)

    assert float(triplet_semihard_loss(labels, emb, 1.0, squared)) == pytest.approx(ref, rel=1e-5)


# --------------------------------------------------------------------------- gradients

def _loss_fns(metric):
    return {
        "semihard": lambda l, e: triplet_semihard_loss(l, e, 0.2, metric),
        "hard": lambda l, e: triplet_hard_loss(l, e, 0.2, False, metric),
        "soft": lambda l, e: triplet_hard_loss(l, e, 0.2, True, metric),
        "batch_all": lambda l, e: triplet_batch_all_loss(l, e, 0.2, metric),
    }


@pytest.mark.parametrize("metric", DISTANCES)
def test_gradients_finite_with_duplicates(metric):
    rng = np.random.default_rng(2)
    base = rng.normal(size=(4, 8)).astype(np.float32)
    batches = {
        # duplicates within a class and across classes
        "duplicates": (np.array([0, 0, 0, 1, 1, 2, 2, 3]), base[[0, 0, 1, 2, 2, 3, 0, 1]]),
        # fully collapsed embedding
        "collapsed": (np.array([0, 0, 1, 1, 2, 2]), np.tile(base[:1], (6, 1))),
    }
    for labels, emb in batches.values():
        x = tf.Variable(emb)
        for name, fn in _loss_fns(metric).items():
            with tf.GradientTape() as tape:
                value = fn(labels, x)
            grad = tape.gradient(value, x)
            assert grad is not None, name
            assert np.isfinite(value.numpy()) and np.all(np.isfinite(grad.numpy())), (name, metric)


@pytest.mark.parametrize("name", ["semihard", "hard", "soft", "batch_all"])
def test_gradient_matches_finite_differences(name):
    rng = np.random.default_rng(3)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    emb = rng.normal(size=(8, 3)).astype(np.float32)
    fn = _loss_fns("L2")[name]
    theoretical, numerical = tf.test.compute_gradient(lambda e: fn(labels, e), [tf.constant(emb)], delta=1e-3)
    assert np.abs(theoretical[0]).max() > 0
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=5e-3, rtol=1e-2)


# --------------------------------------------------------------------------- dtypes, XLA

@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_embeddings_computed_in_float32(dtype):
    k = 22
    labels, emb = ARRAYS[f"labels_{k}"], tf.constant(ARRAYS[f"embeddings_{k}"])
    low = tf.cast(emb, dtype)
    as_f32 = tf.cast(low, tf.float32)  # same inputs, already rounded
    for fn in _loss_fns("L2").values():
        value = fn(labels, low)
        assert value.dtype == tf.float32
        assert float(value) == pytest.approx(float(fn(labels, as_f32)), rel=1e-6, abs=1e-7)
        assert float(value) == pytest.approx(float(fn(labels, emb)), rel=2e-2)
    assert all(v.dtype == tf.float32 for v in mining_stats(labels, low, 1.0).values())


def test_xla_equals_eager():
    k = 16
    labels, emb = tf.constant(ARRAYS[f"labels_{k}"]), tf.constant(ARRAYS[f"embeddings_{k}"])

    def everything(labels, emb):
        out = {}
        for metric in ("L2", "angular"):
            with tf.GradientTape() as tape:
                tape.watch(emb)
                values = {n: fn(labels, emb) for n, fn in _loss_fns(metric).items()}
                total = tf.add_n(list(values.values()))
            out.update({f"{n}-{metric}": v for n, v in values.items()})
            out[f"grad-{metric}"] = tape.gradient(total, emb)
        out.update(mining_stats(labels, emb, 1.0, "squared-L2"))
        return out

    eager = everything(labels, emb)
    compiled = tf.function(everything, jit_compile=True)(labels, emb)
    assert set(eager) == set(compiled)
    for key in eager:
        np.testing.assert_allclose(compiled[key].numpy(), eager[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


# --------------------------------------------------------------------------- two replicas

REPLICA_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    from mobilenet_embed.losses import (triplet_semihard_loss, triplet_hard_loss, triplet_batch_all_loss,
                                        TripletSemiHardLoss)

    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(8), 2).astype(np.int32)          # 16 = 2 replicas x 8
    rng.shuffle(labels)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    w0 = rng.normal(size=(5, 4)).astype(np.float32)
    halves = [slice(0, 8), slice(8, 16)]
    fns = {
        "semihard": lambda l, e: triplet_semihard_loss(l, e, 0.5, "L2"),
        "hard": lambda l, e: triplet_hard_loss(l, e, 0.5, False, "L2"),
        "batch_all": lambda l, e: triplet_batch_all_loss(l, e, 0.5, "L2"),
    }
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    def split(array):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(array[halves[ctx.replica_id_in_sync_group]]))
    with strategy.scope():
        w = tf.Variable(w0)
        keras_loss = TripletSemiHardLoss(margin=0.5, distance_metric="L2")

    @tf.function
    def step(labels, x):
        out = {name: fn(labels, x @ w) for name, fn in fns.items()}
        with tf.GradientTape() as tape:
            scaled = keras_loss(labels, x @ w)
        grad = tape.gradient(scaled, w)
        out["keras"] = scaled
        return out, tf.distribute.get_replica_context().all_reduce("SUM", grad)

    per_replica, grad = strategy.run(step, args=(split(labels), split(x)))
    got = {k: [float(v) for v in strategy.experimental_local_results(t)] for k, t in per_replica.items()}
    expected = {name: [float(fn(labels[h], x[h] @ w0)) for h in halves] for name, fn in fns.items()}
    half_grads = []
    for h in halves:
        wv = tf.Variable(w0)
        with tf.GradientTape() as tape:
            value = triplet_semihard_loss(labels[h], x[h] @ wv, 0.5, "L2")
        half_grads.append(tape.gradient(value, wv).numpy())
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "got": got,
        "expected": expected,
        "grad": strategy.experimental_local_results(grad)[0].numpy().tolist(),
        "mean_half_grad": np.mean(half_grads, axis=0).tolist(),
    }))
    """
)


def test_two_replica_mirrored_strategy():
    result = subprocess.run([sys.executable, "-c", REPLICA_SCRIPT], capture_output=True, text=True, cwd=REPO,
                            timeout=300, env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    for name, expected in out["expected"].items():
        np.testing.assert_allclose(out["got"][name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
        assert all(v > 0 for v in expected), name  # the check is not vacuous
    # The Keras class divides by the replica count, so the summed gradient is the mean of the halves'.
    np.testing.assert_allclose(out["got"]["keras"], [v / 2 for v in out["expected"]["semihard"]], rtol=1e-5)
    np.testing.assert_allclose(out["grad"], out["mean_half_grad"], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- Keras classes and config

def test_keras_config_round_trip():
    for loss in (TripletSemiHardLoss(margin=0.3, distance_metric="angular"),
                 TripletHardLoss(margin=0.4, soft=True, distance_metric="squared-L2"),
                 TripletBatchAllLoss(margin=0.5, distance_metric="L2")):
        for restored in (type(loss).from_config(loss.get_config()),
                         keras.losses.deserialize(keras.losses.serialize(loss))):
            assert type(restored) is type(loss)
            assert restored.get_config() == loss.get_config()
            assert restored.margin == loss.margin and restored.distance_metric == loss.distance_metric
    assert TripletHardLoss(soft=True).get_config()["soft"] is True


def test_keras_class_equals_function():
    k = 24
    labels, emb = ARRAYS[f"labels_{k}"], ARRAYS[f"embeddings_{k}"]
    pairs = [
        (TripletSemiHardLoss(0.7, "L2"), triplet_semihard_loss(labels, emb, 0.7, "L2")),
        (TripletHardLoss(0.7, True, "angular"), triplet_hard_loss(labels, emb, 0.7, True, "angular")),
        (TripletBatchAllLoss(0.7, "squared-L2"), triplet_batch_all_loss(labels, emb, 0.7, "squared-L2")),
    ]
    for loss, expected in pairs:
        value = loss(labels, emb)
        assert value.shape == () and float(value) == float(expected)
    with pytest.raises(ValueError, match="sample_weight"):
        TripletSemiHardLoss()(labels, emb, sample_weight=np.ones(len(labels)))


def test_keras_compile_fit_and_save(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(16, 6)).astype(np.float32)
    y = np.repeat(np.arange(4), 4).astype(np.int32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), keras.layers.UnitNormalization()])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=TripletSemiHardLoss(margin=0.5, distance_metric="L2"))
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    evaluated = model.evaluate(x, y, batch_size=16, verbose=0)
    assert evaluated == pytest.approx(float(triplet_semihard_loss(y, model(x), 0.5, "L2")), rel=1e-5)
    path = tmp_path / "m.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.loss, TripletSemiHardLoss) and restored.loss.margin == 0.5


def test_loss_from_config():
    assert set(LOSSES) == {"triplet_semihard", "triplet_hard", "triplet_batch_all"}
    labels, emb = LINE_LABELS, LINE_EMB
    for name, fn in (("triplet_semihard", triplet_semihard_loss), ("triplet_batch_all", triplet_batch_all_loss)):
        for distance in DISTANCES:
            loss = loss_from_config(name, 1.5, distance)
            assert float(loss(labels, emb)) == float(fn(labels, emb, 1.5, distance))
    hard = loss_from_config("triplet_hard", 1.5, "L2", soft=True)
    assert isinstance(hard, TripletHardLoss) and hard.soft
    assert float(hard(labels, emb)) == float(triplet_hard_loss(labels, emb, 1.5, True, "L2"))
    with pytest.raises(UserError, match=r"loss.name: expected one of \[.*'triplet_semihard'.*\], received 'x'"):
        loss_from_config("x", 0.2, "L2")
    with pytest.raises(UserError, match="loss.distance"):
        loss_from_config("triplet_hard", 0.2, "cosine")
    with pytest.raises(UserError, match="loss.margin"):
        loss_from_config("triplet_hard", -1.0, "L2")
    with pytest.raises(UserError, match="loss.soft"):
        loss_from_config("triplet_semihard", 0.2, "L2", soft=True)


def test_public_import():
    import mobilenet_embed.losses as losses_module
    from mobilenet_embed.losses import triplet_hard_loss as hard, triplet_semihard_loss as semihard

    assert hard is losses_module.triplet_hard_loss is triplet_hard_loss
    assert semihard is losses_module.triplet_semihard_loss is triplet_semihard_loss
    assert callable(hard) and callable(semihard)
