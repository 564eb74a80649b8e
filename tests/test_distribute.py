"""tf.distribute on CPU: two logical devices under MirroredStrategy, and two workers on loopback.

Logical devices must be configured before TensorFlow initialises, so each check runs this file
as a script in a fresh process (``python tests/test_distribute.py MODE OUT``) and the test reads
the JSON (or weights) it writes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))

TINY = [
    "data.source=synthetic", "data.image_size=32", "data.synthetic_identities=12",
    "data.synthetic_images_per_identity=4", "data.val_identities=0",
    "model.alpha=0.25", "model.embedding_size=16",
    "train.identities_per_batch=4", "train.images_per_identity=2", "train.epochs=1",
    "train.steps_per_epoch=3", "train.log_every_steps=1", "train.checkpoint_every_steps=2",
]


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _script(args, timeout=240, **env):
    proc = subprocess.run([sys.executable, HERE, *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(**env), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# --------------------------------------------------------------------------- two logical devices


@pytest.fixture(scope="module")
def mirrored_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mirrored")
    _script(["mirrored", str(out)])
    with open(out / "results.json", encoding="utf-8") as fh:
        return json.load(fh)


@pytest.mark.slow
def test_cross_replica_mining_equals_one_device(mirrored_results):
    """Two replicas with cross-replica mining: loss and gradients of one device on the global batch."""
    for name, r in mirrored_results["equality"].items():
        assert r["replicas"] == 2
        assert abs(r["loss_one_device"] - r["loss_cross"]) < 1e-5, name
        assert r["grad_max_abs_diff_cross"] < 1e-5, name
        assert r["grad_max_abs"] > 1e-3, name  # the comparison is not between zeros
        # per-replica mining is a different (documented) objective: the mean of the slices' losses
        assert abs(r["loss_per_replica"] - r["loss_slices_mean"]) < 1e-5, name
        assert r["grad_max_abs_diff_per_replica"] > 1e-4, name


@pytest.mark.slow
def test_sync_batch_norm_step_matches_one_device(mirrored_results):
    """A conv net with batch norm, cross-replica mining and synchronised batch norm: the one-device
    step (up to float32 round-off in the batch statistics); per-replica batch norm is not."""
    r = mirrored_results["sync_bn"]
    assert abs(r["loss_one_device"] - r["loss_sync"]) < 1e-5
    assert r["grad_rel_diff_sync"] < 1e-4
    assert abs(r["loss_one_device"] - r["loss_no_sync"]) > 1e-3 or r["grad_rel_diff_no_sync"] > 0.1


@pytest.mark.slow
def test_each_replica_gets_whole_identities(mirrored_results):
    r = mirrored_results["slices"]
    assert len(r["replica_labels"]) == 2
    k = r["images_per_identity"]
    seen = []
    for labels in r["replica_labels"]:
        assert len(labels) == r["identities_per_replica"] * k
        counts = {label: labels.count(label) for label in labels}
        assert set(counts.values()) == {k}  # every identity whole, K images each
        seen.append(set(counts))
    assert not seen[0] & seen[1]  # no identity split across replicas


@pytest.mark.slow
def test_mirrored_training_runs_a_few_steps(mirrored_results):
    r = mirrored_results["train"]
    assert r["steps"] == 3 and r["latest_checkpoint"] == 3
    assert r["finite"]
    assert r["replica_copies_equal"]
    assert "2 replicas" in r["output"]
    assert "multiple of the 2 replicas" in mirrored_results["odd_p_error"]


def _mirrored(out_dir):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import io

    import keras
    import numpy as np

    from mobilenet_embed.config import TrainConfig, load_config
    from mobilenet_embed.distribute import make_strategy, replica_slices
    from mobilenet_embed.errors import UserError
    from mobilenet_embed.losses import loss_from_config
    from mobilenet_embed.optim import ConstantSchedule, build_optimizer
    from mobilenet_embed.train import TrainStep, train

    mirrored = make_strategy("mirrored")
    one = tf.distribute.get_strategy()
    results = {"seconds": {}}
    clock = [time.perf_counter()]

    def lap(name):
        now = time.perf_counter()
        results["seconds"][name] = round(now - clock[0], 2)
        clock[0] = now

    def dense_model():
        keras.utils.set_random_seed(1)
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Flatten()(inputs)
        x = keras.layers.Dense(16, activation="tanh")(x)
        x = keras.layers.Dense(8)(x)
        return keras.Model(inputs, keras.layers.UnitNormalization()(x))

    def bn_model(sync):
        """A small conv net with batch norm (MobileNet's layers, a few of them: fast to trace)."""
        keras.utils.set_random_seed(3)
        inputs = keras.Input((16, 16, 3))
        x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inputs)
        x = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization()(x))
        x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
        x = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization()(x))
        x = keras.layers.GlobalAveragePooling2D()(x)
        x = keras.layers.Dense(8, use_bias=False)(x)
        x = keras.layers.BatchNormalization(scale=False)(x)
        model = keras.Model(inputs, keras.layers.UnitNormalization()(x))
        if sync:
            for layer in model.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.synchronized = True
        return model

    def one_step(strategy, make_model, images, labels, loss_name, cross):
        """Loss and weight change of one SGD step with learning rate 1 (= minus the gradient)."""
        cfg = TrainConfig()
        cfg.optimizer, cfg.momentum = "sgd", 0.0
        with strategy.scope():
            model = make_model()
            opt = build_optimizer(cfg, model, ConstantSchedule(1.0))
            opt.build(model.trainable_variables)
        before = [v.numpy().copy() for v in model.trainable_variables]
        loss_fn = loss_from_config(loss_name, 0.2, "squared-L2").call
        step = TrainStep(strategy, model, opt, loss_fn, margin=0.2, distance="squared-L2",
                         cross_replica_mining=cross, local_replicas=strategy.num_replicas_in_sync)
        out = step(images, labels)
        return float(out["loss"]), [b - v.numpy() for b, v in zip(before, model.trainable_variables)]

    def max_diff(a, b):
        return max(float(np.abs(x - y).max()) for x, y in zip(a, b))

    rng = np.random.default_rng(0)
    p, k = 4, 3
    images = tf.constant(rng.normal(size=(p * k, 8, 8, 3)).astype("float32"))
    labels = tf.constant(np.repeat(np.arange(p), k).astype("int32"))
    results["equality"] = {}
    for name in ("triplet_semihard", "triplet_hard", "triplet_batch_all"):
        loss_1, grads_1 = one_step(one, dense_model, images, labels, name, False)
        loss_x, grads_x = one_step(mirrored, dense_model, images, labels, name, True)
        loss_r, grads_r = one_step(mirrored, dense_model, images, labels, name, False)
        fn = loss_from_config(name, 0.2, "squared-L2").call
        emb = dense_model()(images)
        half = p * k // 2
        slices_mean = (float(fn(labels[:half], emb[:half])) + float(fn(labels[half:], emb[half:]))) / 2
        results["equality"][name] = {
            "replicas": mirrored.num_replicas_in_sync, "loss_one_device": loss_1, "loss_cross": loss_x,
            "grad_max_abs_diff_cross": max_diff(grads_1, grads_x),
            "grad_max_abs": max(float(np.abs(g).max()) for g in grads_1),
            "loss_per_replica": loss_r, "loss_slices_mean": slices_mean,
            "grad_max_abs_diff_per_replica": max_diff(grads_1, grads_r)}

    lap("equality")
    p, k = 4, 2
    images = tf.constant(rng.uniform(-1, 1, size=(p * k, 16, 16, 3)).astype("float32"))
    labels = tf.constant(np.repeat(np.arange(p), k).astype("int32"))
    def rel_diff(a, b):
        num = sum(float(np.sum(np.square(x - y))) for x, y in zip(a, b))
        return (num / sum(float(np.sum(np.square(x))) for x in a)) ** 0.5

    loss_1, grads_1 = one_step(one, lambda: bn_model(False), images, labels, "triplet_semihard", False)
    loss_s, grads_s = one_step(mirrored, lambda: bn_model(True), images, labels, "triplet_semihard", True)
    loss_n, grads_n = one_step(mirrored, lambda: bn_model(False), images, labels, "triplet_semihard", True)
    results["sync_bn"] = {"loss_one_device": loss_1, "loss_sync": loss_s, "loss_no_sync": loss_n,
                                    "grad_rel_diff_sync": rel_diff(grads_1, grads_s),
                                    "grad_rel_diff_no_sync": rel_diff(grads_1, grads_n)}

    lap("sync_bn")
    # whole identities per replica, on a batch of the real P x K pipeline
    from mobilenet_embed.data import pk_batches

    cfg = load_config(None, TINY)
    images, labels = next(iter(pk_batches(cfg, num_replicas=2)))
    per_replica = replica_slices(mirrored, images, labels, 2)
    replica_labels = [t.numpy().tolist() for t in mirrored.experimental_local_results(per_replica[1])]
    results["slices"] = {"replica_labels": replica_labels, "images_per_identity": 2, "identities_per_replica": 2}

    lap("slices")
    # a few training steps with the real loop
    run = os.path.join(out_dir, "run")
    stream = io.StringIO()
    result = train(load_config(None, TINY + ["train.strategy=mirrored", "train.cross_replica_mining=true"]),
                   run_dir=run, stream=stream)
    with open(os.path.join(run, "checkpoints", "checkpoint.json"), encoding="utf-8") as fh:
        latest = json.load(fh)["latest"]["step"]
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as fh:
        finite = all(np.isfinite(json.loads(line).get("loss", 0.0)) for line in fh)
    copies_equal = True  # every replica's copy of every variable, batch-norm moving statistics included
    for var in result.model.weights:
        copies = [np.asarray(c) for c in mirrored.experimental_local_results(var.value)]
        copies_equal &= len(copies) == 2 and all(np.array_equal(copies[0], c) for c in copies)
    results["train"] = {"steps": result.steps, "latest_checkpoint": latest, "finite": bool(finite),
                        "output": stream.getvalue(), "replica_copies_equal": bool(copies_equal)}
    try:
        train(load_config(None, TINY + ["train.strategy=mirrored", "train.identities_per_batch=3"]),
              run_dir=os.path.join(out_dir, "odd"), stream=io.StringIO())
        results["odd_p_error"] = ""
    except UserError as exc:
        results["odd_p_error"] = str(exc)
    lap("train")
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh)


# --------------------------------------------------------------------------- two workers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_workers_on_loopback_train_to_identical_weights(tmp_path):
    import numpy as np

    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    run = str(tmp_path / "run")
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        out = str(tmp_path / f"weights{index}.npz")
        log = open(tmp_path / f"worker{index}.log", "w", encoding="utf-8")
        procs.append((subprocess.Popen([sys.executable, HERE, "worker", run, out], stdout=log,
                                       stderr=subprocess.STDOUT, env=_env(TF_CONFIG=tf_config), cwd=ROOT), log))
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=300))
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n\n".join(text[-3000:] for text in logs)

    first, second = np.load(tmp_path / "weights0.npz"), np.load(tmp_path / "weights1.npz")
    assert int(first["steps"]) == int(second["steps"]) == 3
    names = [n for n in first.files if n.startswith("w")]
    assert len(names) > 50
    for name in names:
        np.testing.assert_array_equal(first[name], second[name])
    # chief-only checkpoints: written once, under the shared run directory
    with open(os.path.join(run, "checkpoints", "checkpoint.json"), encoding="utf-8") as fh:
        index = json.load(fh)
    assert index["latest"]["step"] == 3 and index["best"]["step"] == 3  # validated on the workers alike
    assert "validation step 3" in logs[0] and "step 3/3" in logs[0]
    assert "validation step" not in logs[1] and "step 3/3" not in logs[1], logs[1][-2000:]  # the non-chief prints nothing


def _worker(run_dir, out_path):
    import numpy as np

    from mobilenet_embed.config import load_config
    from mobilenet_embed.train import train

    cfg = load_config(None, TINY + ["train.strategy=multi_worker", "train.cross_replica_mining=true",
                                    "data.val_identities=0.25", "train.val_pairs=20", "eval.folds=2"])
    result = train(cfg, run_dir=run_dir, stream=sys.stdout)
    arrays = {f"w{i}": w.numpy() for i, w in enumerate(result.model.weights)}
    np.savez(out_path, steps=result.steps, **arrays)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if sys.argv[1] == "mirrored":
        _mirrored(sys.argv[2])
    elif sys.argv[1] == "worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]}")
