"""P x K training batches, resumption, replicas/workers, synthetic source, TFRecord round trip (issue #4).

Small images generated into tmp_path (never ../shared).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from mobilenet_embed.cli import main
from mobilenet_embed.config import load_config
from mobilenet_embed.data import DataCounters, build_index, flip_images, images_dataset, pk_batches, split_identities
from mobilenet_embed.data.synthetic import image_key
from mobilenet_embed.errors import UserError

P, K = 4, 3


def write_folder(root, counts: list[int]) -> list[str]:
    """Identities id00, id01, ... with counts[i] 40x40 JPEGs (PNG for every third image)."""
    names = []
    for i, n in enumerate(counts):
        name = f"id{i:02d}"
        names.append(name)
        os.makedirs(root / name)
        rng = np.random.default_rng(i)
        colour = rng.integers(0, 255, 3)
        for j in range(n):
            arr = np.clip(colour + rng.integers(-30, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            ext = ".png" if j % 3 == 2 else ".jpg"
            Image.fromarray(arr).save(root / name / f"{j}{ext}")
    return names


def config(root=None, *extra: str):
    sets = [f"train.identities_per_batch={P}", f"train.images_per_identity={K}", "data.image_size=32",
            "data.check_cache=null", "data.crop_fraction=0.8"]
    if root is not None:
        sets += ["data.source=folder", f"data.path={root}"]
    return load_config(None, sets + list(extra))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pk") / "faces"
    write_folder(root, [2, 5, 3, 4, 1, 6, 2, 3, 4, 2])  # id04 has 1 image: not usable
    return root


def take(ds, n):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


def assert_pk(labels: np.ndarray, p: int = P, k: int = K) -> None:
    groups = labels.reshape(p, k)
    assert (groups == groups[:, :1]).all(), labels
    assert len(set(groups[:, 0].tolist())) == p, labels


def test_every_batch_is_p_by_k_and_seeded(folder):
    cfg = config(folder)
    index, _ = build_index(cfg.data)
    assert index.num_identities == 9
    batches = take(pk_batches(cfg, index), 8)
    seen = set()
    for images, labels in batches:
        assert images.shape == (P * K, 32, 32, 3) and images.dtype == np.float32
        assert labels.dtype == np.int32
        assert images.min() >= -1 and images.max() <= 1
        assert_pk(labels)
        seen.update(labels.tolist())
    assert len(seen) == 9  # passes over the identities reach all of them
    again = take(pk_batches(cfg, index), 8)
    for (a, la), (b, lb) in zip(batches, again):
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_array_equal(a, b)
    other = take(pk_batches(config(folder, "seed=1"), index), 8)
    assert any(not np.array_equal(la, lb) for (_, la), (_, lb) in zip(batches, other))


def test_crop_jitter_keys_reach_the_training_batches(folder):
    index, _ = build_index(config(folder).data)
    base = take(pk_batches(config(folder), index), 2)
    same = take(pk_batches(config(folder, "data.augment_max_crop=1.0", "data.augment_shift=0.0"), index), 2)
    looser = take(pk_batches(config(folder, "data.augment_max_crop=1.25", "data.augment_shift=0.1"), index), 2)
    for (a, la), (b, lb), (c, lc) in zip(base, same, looser):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lc)  # the same images, framed otherwise
        assert np.abs(a - c).max() > 0.1


def test_images_within_identity_distinct_when_enough(folder):
    cfg = config(folder, "data.augment=false")
    index, _ = build_index(cfg.data)
    for images, labels in take(pk_batches(cfg, index), 6):
        for g in range(P):
            label = labels[g * K]
            group = images[g * K:(g + 1) * K].reshape(K, -1)
            n_distinct = len({row.tobytes() for row in group})
            assert n_distinct == min(K, int(index.counts()[label]))


def test_resume_from_a_step_gives_the_same_batches(folder):
    cfg = config(folder)
    index, _ = build_index(cfg.data)
    stream = take(pk_batches(cfg, index), 7)
    resumed = take(pk_batches(cfg, index, start_step=5), 2)
    for (a, la), (b, lb) in zip(stream[5:], resumed):
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_array_equal(a, b)


def test_two_replicas_get_whole_identities(folder):
    cfg = config(folder)
    index, _ = build_index(cfg.data)
    for _, labels in take(pk_batches(cfg, index, num_replicas=2), 5):
        halves = labels[: P * K // 2], labels[P * K // 2:]
        for half in halves:
            assert_pk(half, P // 2, K)
        assert not set(halves[0].tolist()) & set(halves[1].tolist())
    with pytest.raises(UserError, match=r"train.identities_per_batch: expected a multiple of the number of "
                                        r"replicas \(3\), received 4"):
        pk_batches(cfg, index, num_replicas=3)


DISTRIBUTE_SCRIPT = """
import sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from mobilenet_embed.config import load_config
from mobilenet_embed.data import build_index, pk_batches
cfg = load_config(None, ["train.identities_per_batch=4", "train.images_per_identity=3", "data.image_size=32",
                         "data.check_cache=null", "data.source=folder", "data.path=" + sys.argv[1]])
index, _ = build_index(cfg.data)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
dist = iter(strategy.experimental_distribute_dataset(pk_batches(cfg, index, num_replicas=2)))
for _ in range(3):
    images, labels = next(dist)
    for part in strategy.experimental_local_results(labels):
        print(" ".join(str(v) for v in part.numpy().tolist()))
"""


@pytest.mark.slow
def test_distribute_dataset_slices_hold_whole_identities(folder):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", DISTRIBUTE_SCRIPT, str(folder)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [np.array(line.split(), int) for line in out.stdout.strip().splitlines()]
    assert len(rows) == 6
    for i in range(0, 6, 2):
        assert_pk(rows[i], P // 2, K)
        assert_pk(rows[i + 1], P // 2, K)
        assert not set(rows[i].tolist()) & set(rows[i + 1].tolist())


def test_workers_hold_disjoint_identities(folder):
    cfg = config(folder, "train.identities_per_batch=2")
    index, _ = build_index(cfg.data)
    w0 = take(pk_batches(cfg, index, worker_index=0, num_workers=2), 4)
    w1 = take(pk_batches(cfg, index, worker_index=1, num_workers=2), 4)
    for (_, a), (_, b) in zip(w0, w1):
        assert_pk(a, 2, K)
        assert_pk(b, 2, K)
        assert not set(a.tolist()) & set(b.tolist())
    with pytest.raises(UserError, match="expected at most the number of usable identities"):
        pk_batches(config(folder, "train.identities_per_batch=10"), index)


def test_file_unreadable_after_the_check_skips_its_batch(tmp_path):
    root = tmp_path / "faces"
    write_folder(root, [3] * 6)
    cfg = config(root, "train.identities_per_batch=2")
    index, _ = build_index(cfg.data)
    broken = root / "id03" / "0.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated after the check
    counters = DataCounters()
    batches = take(pk_batches(cfg, index, counters=counters), 12)
    assert len(batches) == 12
    for _, labels in batches:
        assert_pk(labels, 2, K)
    assert counters.as_dict()["skipped_batches"] >= 1  # id03 is drawn in every pass of 3 steps


def test_synthetic_source_is_deterministic_and_renders_keys():
    cfg = config(None, "data.synthetic_identities=12", "data.synthetic_images_per_identity=4")
    index, report = build_index(cfg.data)
    assert index.num_identities == 12 and len(index) == 48 and index.paths[5] == image_key(1, 1)
    train, val = split_identities(index, 0.25, cfg.seed)
    assert len(val.identities) == 3
    batches = take(pk_batches(cfg, train), 3)
    again = take(pk_batches(cfg, train, start_step=2), 1)
    np.testing.assert_array_equal(batches[2][0], again[0][0])
    for _, labels in batches:
        assert_pk(labels)
    a = next(iter(images_dataset(cfg.data, val.paths[:4], 4))).numpy()
    b = next(iter(images_dataset(cfg.data, val.paths[:4], 4))).numpy()
    flipped = flip_images(tf.constant(a)).numpy()  # what eval's flip averages with
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(flipped, a[:, :, ::-1], atol=1e-6)
    assert np.abs(a[0] - a[1]).mean() > 0.01  # images of one identity differ (nuisance)
    calm = config(None, "data.synthetic_identities=12", "data.synthetic_images_per_identity=4",
                  "data.synthetic_nuisance=0")
    c = next(iter(images_dataset(calm.data, val.paths[:2], 2))).numpy()
    np.testing.assert_array_equal(c[0], c[1])  # no nuisance: identical images


# --------------------------------------------------------------------------- TFRecord


def _prepare(*args):
    return CliRunner().invoke(main, ["prepare", "--no-progress", "--set", "data.check_cache=null", *args])


def test_tfrecord_round_trip_and_training_batches(tmp_path):
    root = tmp_path / "faces"
    write_folder(root, [2, 5, 3, 4, 1, 6, 2, 3, 4, 2])
    (root / "id01" / "bad.jpg").write_bytes(b"")
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(root / "id02" / "grey.pgm")
    prefix = tmp_path / "out" / "faces"
    result = _prepare("--data", str(root), "--out", str(prefix), "--shards", "3")
    assert result.exit_code == 0, result.output
    assert ("skipped 1 unreadable files and 1 identities with fewer than 2 images; re-encoded 1 as PNG"
            in result.output)
    manifest = json.loads((tmp_path / "out" / "faces.manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == [f"faces-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert manifest["images"] == 32 and len(manifest["bad_files"]) == 1 and "id04" not in manifest["identities"]
    assert not list((tmp_path / "out").glob("*.tmp-*"))

    again = _prepare("--data", str(root), "--out", str(prefix), "--shards", "3")
    assert again.exit_code == 2 and "pass --force" in again.output
    keep_all = _prepare("--data", str(root), "--out", str(prefix), "--shards", "3", "--force",
                        "--set", "data.min_images_per_identity=1")
    assert keep_all.exit_code == 0, keep_all.output
    assert json.loads((tmp_path / "out" / "faces.manifest.json").read_text())["images"] == 33

    folder_cfg = config(root, "data.min_images_per_identity=1", "data.max_bad_fraction=0.5")
    record_cfg = config(None, "data.source=tfrecord", f"data.path={prefix}-*.tfrecord",
                        "data.min_images_per_identity=1")
    f_index, _ = build_index(folder_cfg.data)
    r_index, r_report = build_index(record_cfg.data)
    assert r_index.identities == f_index.identities
    np.testing.assert_array_equal(r_index.counts(), f_index.counts())
    # same images and labels, identity by identity (record order within an identity = file order)
    f_images = np.concatenate(list(images_dataset(folder_cfg.data, f_index.paths, 8).as_numpy_iterator()))
    r_images = np.concatenate(list(images_dataset(record_cfg.data, r_index.paths, 8).as_numpy_iterator()))
    np.testing.assert_array_equal(r_index.labels, f_index.labels)
    np.testing.assert_allclose(r_images, f_images, atol=1e-6)

    cfg = config(None, "data.source=tfrecord", f"data.path={prefix}-*.tfrecord", "data.shuffle_buffer=8")
    index, _ = build_index(cfg.data)
    stream = take(pk_batches(cfg, index), 6)
    for images, labels in stream:
        assert images.shape == (P * K, 32, 32, 3)
        assert_pk(labels)
    resumed = take(pk_batches(cfg, index, start_step=4), 2)
    for (a, la), (b, lb) in zip(stream[4:], resumed):
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_array_equal(a, b)
    one_shard = config(None, "data.source=tfrecord", f"data.path={prefix}-00000-of-00003.tfrecord",
                       "data.min_images_per_identity=1")
    part, _ = build_index(one_shard.data)
    assert 0 < len(part) < len(r_index)


def test_tfrecord_errors(tmp_path):
    cfg = config(None, "data.source=tfrecord", f"data.path={tmp_path}/none-*.tfrecord")
    with pytest.raises(UserError, match="data.path: no files match"):
        build_index(cfg.data)
    result = CliRunner().invoke(main, ["data", "check", "--set", "data.source=tfrecord",
                                       "--set", f"data.path={tmp_path}/x"])
    assert result.exit_code == 2 and "Error: data.path: no TFRecord data" in result.output


def test_uniform_rows_cover_every_image_once_per_pass():
    from mobilenet_embed.data.sampler import uniform_rows

    n, batch = 31, 12  # two batches per pass, 7 images left over (others in the next pass)
    first_pass = np.concatenate([uniform_rows(n, batch, s, seed=3).numpy() for s in (0, 1)])
    assert len(set(first_pass.tolist())) == 24 and first_pass.min() >= 0 and first_pass.max() < n
    assert not np.array_equal(uniform_rows(n, batch, 2, seed=3).numpy(), first_pass[:batch])
    np.testing.assert_array_equal(uniform_rows(n, batch, 1, seed=3).numpy(), first_pass[batch:])
    w0 = uniform_rows(n, 6, 0, seed=3, worker_index=0, num_workers=2).numpy()
    w1 = uniform_rows(n, 6, 0, seed=3, worker_index=1, num_workers=2).numpy()
    assert not set(w0) & set(w1)  # workers hold disjoint images at one step


def test_uniform_sampling_batches_are_seeded_resumable_and_skip_unusable(folder):
    cfg = config(folder, "loss.name=softmax", "data.sampling=uniform", "data.augment=false")
    index, _ = build_index(cfg.data)
    stream = take(pk_batches(cfg, index), 6)
    resumed = take(pk_batches(cfg, index, start_step=4), 2)
    for (x, y), (x2, y2) in zip(stream[4:], resumed):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    labels = np.concatenate([y for _, y in stream])
    assert len(labels) == 6 * P * K
    usable = set(np.flatnonzero(index.counts() >= 2).tolist())
    assert set(labels.tolist()) <= usable and len(set(labels.tolist())) >= len(usable) - 1
    # not P x K: identities are not grouped in runs of K
    assert any(not (y.reshape(P, K) == y.reshape(P, K)[:, :1]).all() for _, y in stream)
    with pytest.raises(UserError, match="data.sampling: triplet losses"):
        config(folder, "data.sampling=uniform")
    with pytest.raises(UserError, match="at most the number of usable images"):
        pk_batches(config(folder, "loss.name=softmax", "data.sampling=uniform", "train.identities_per_batch=9",
                          "train.images_per_identity=4"), index)


def test_prepare_progress_bar_stays_off_a_non_terminal(tmp_path):
    """`prepare` with its bar on (the default) writes no tqdm carriage returns into a pipe or log."""
    root = tmp_path / "faces"
    write_folder(root, [2, 2, 2])
    result = CliRunner().invoke(main, ["prepare", "--set", "data.check_cache=null", "--data", str(root),
                                       "--out", str(tmp_path / "out" / "faces"), "--shards", "1"])
    assert result.exit_code == 0, result.output
    assert "wrote 6 images" in result.output and "\r" not in result.output
