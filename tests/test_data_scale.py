"""Scale work of issue 15: O(P) identity draws, parallel `prepare`, the relocatable check
cache, trusting `prepare`'s shards, uniform sampling of TFRecords, odd names, symlink loops and
the pixel limit of the data scan (issue 12, point 9). Tiny inputs in tmp_path."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mobilenet_embed.data import sampler


def _pass_key(seed):
    return lambda n: sampler.fold_key(seed, sampler.TAG_PASS, 1, n)


def test_choose_identities_is_a_stateless_permutation_per_pass():
    n, p = 23, 4  # 5 steps per pass, 3 identities left over
    steps = [sampler.choose_identities(n, p, s, _pass_key(7)).numpy() for s in range(10)]
    for batch in steps:
        assert len(set(batch.tolist())) == p and batch.min() >= 0 and batch.max() < n
    first, second = np.concatenate(steps[:5]), np.concatenate(steps[5:])
    assert len(set(first.tolist())) == 20 and len(set(second.tolist())) == 20  # once per pass
    assert not np.array_equal(first, second)  # each pass its own order
    again = sampler.choose_identities(n, p, 7, _pass_key(7)).numpy()  # step 7 alone, as on resume
    np.testing.assert_array_equal(again, steps[7])
    assert not np.array_equal(sampler.choose_identities(n, p, 7, _pass_key(8)).numpy(), steps[7])


def test_choose_identities_costs_p_not_the_identity_count():
    """2**40 identities: a full permutation (8 TB) cannot be built; P positions can."""
    ids = sampler.choose_identities(2 ** 40, 8, 123456789, _pass_key(0)).numpy()
    assert len(set(ids.tolist())) == 8 and ids.min() >= 0 and ids.max() < 2 ** 40


def _prepare(root, prefix, *extra):
    from click.testing import CliRunner

    from mobilenet_embed.cli import main

    result = CliRunner().invoke(main, ["prepare", "--set", "data.check_cache=null", "--data", str(root),
                                       "--out", str(prefix), "--no-progress", *extra])
    assert result.exit_code == 0, result.output
    return result


def test_uniform_sampling_reads_tfrecord_shards(tmp_path):
    from test_data_pipeline import P, K, config, take, write_folder

    from mobilenet_embed.data import build_index, pk_batches

    root = tmp_path / "faces"
    write_folder(root, [2, 5, 3, 4, 2, 6, 2, 3, 4, 2])
    prefix = tmp_path / "out" / "faces"
    _prepare(root, prefix, "--shards", "3")
    cfg = config(None, "data.source=tfrecord", f"data.path={prefix}-*.tfrecord", "data.shuffle_buffer=8",
                 "loss.name=softmax", "data.sampling=uniform", "data.augment=false")
    index, _ = build_index(cfg.data)
    stream = take(pk_batches(cfg, index), 6)
    for images, labels in stream:
        assert images.shape == (P * K, 32, 32, 3) and labels.min() >= 0 and labels.max() < index.num_identities
        # P*K distinct records: no two rows of a batch are the same image
        assert len({im.tobytes() for im in images}) == P * K
    assert any(not (y.reshape(P, K) == y.reshape(P, K)[:, :1]).all() for _, y in stream)  # not P x K
    assert len(set(np.concatenate([y for _, y in stream]).tolist())) > P
    resumed = take(pk_batches(cfg, index, start_step=4), 2)
    for (a, la), (b, lb) in zip(stream[4:], resumed):
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_array_equal(a, b)


def test_prepare_writes_shards_in_parallel_with_the_same_output(tmp_path):
    from test_data_pipeline import write_folder

    root = tmp_path / "faces"
    write_folder(root, [2, 5, 3, 4, 2, 6, 2, 3, 4, 2, 3, 2])
    one = _prepare(root, tmp_path / "one" / "faces", "--shards", "5", "--workers", "1")
    many = _prepare(root, tmp_path / "many" / "faces", "--shards", "5", "--workers", "3")
    assert "(1 at once)" in one.output and "(3 at once)" in many.output
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "many").iterdir()) and len(names) == 11
    for name in names:
        a, b = (tmp_path / "one" / name).read_bytes(), (tmp_path / "many" / name).read_bytes()
        if name.endswith(".manifest.json"):
            a, b = ({k: v for k, v in json.loads(x).items() if k not in ("created", "checksum")} for x in (a, b))
        assert a == b, name
    # records serialised deterministically (map keys sorted), so another process writes the same bytes
    first = (tmp_path / "one" / "faces-00000-of-00005.tfrecord").read_bytes()
    at = [first.find(key) for key in (b"identity", b"image", b"label", b"path")]
    assert -1 not in at and at == sorted(at)


def test_prepare_records_are_tf_train_examples_and_the_index_points_at_the_images(tmp_path):
    """Each record is byte for byte the deterministic `tf.train.Example` of its features (the
    encoding `prepare` has always written), and the `.index` offsets locate its image bytes."""
    import tensorflow as tf
    from test_data_pipeline import write_folder
    from test_example_encode import tf_example

    from mobilenet_embed.data.tfrecord import read_shard_index

    root = tmp_path / "faces"
    write_folder(root, [2, 5, 3, 4])
    _prepare(root, tmp_path / "out" / "faces", "--shards", "2")
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64),
            "identity": tf.io.FixedLenFeature([], tf.string), "path": tf.io.FixedLenFeature([], tf.string)}
    seen = []
    for shard in sorted((tmp_path / "out").glob("*.tfrecord")):
        data, where = shard.read_bytes(), read_shard_index(str(shard))
        records = [r.numpy() for r in tf.data.TFRecordDataset(str(shard))]
        assert len(records) == len(where) > 0
        for record, (at, n) in zip(records, where):
            f = {k: v.numpy() for k, v in tf.io.parse_single_example(record, spec).items()}
            path = f["path"].decode("utf-8")
            assert record == tf_example(f["image"], int(f["label"]), f["identity"].decode("utf-8"), path)
            assert data[at:at + n] == f["image"] == (root / path).read_bytes()
            seen.append(path)
    assert len(seen) == 14


def _check(*extra):
    from click.testing import CliRunner

    from mobilenet_embed.cli import main

    return CliRunner().invoke(main, ["data", "check", *extra])


def test_check_cache_follows_the_data_to_another_path_and_rechecks_changed_files(tmp_path, monkeypatch):
    from test_data_pipeline import config, write_folder

    from mobilenet_embed.data import decode, inspect_data

    write_folder(tmp_path / "here" / "faces", [2, 3])
    cache = tmp_path / "shared-cache"
    _, first = inspect_data(config(tmp_path / "here" / "faces", f"data.check_cache={cache}").data)
    assert first.cached_checks == 0 and first.images == 5
    os.rename(tmp_path / "here", tmp_path / "elsewhere")  # the same data mounted at another path
    moved = tmp_path / "elsewhere" / "faces"
    decoded = []
    real = decode._tf_pass
    monkeypatch.setattr(decode, "_tf_pass", lambda paths, limit: decoded.extend(paths) or real(paths, limit))
    _, second = inspect_data(config(moved, f"data.check_cache={cache}").data)
    assert second.cached_checks == 5 and decoded == [] and not second.bad_files
    changed = moved / "id01" / "1.jpg"
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # touched: checked again
    _, third = inspect_data(config(moved, f"data.check_cache={cache}").data)
    assert third.cached_checks == 4 and decoded == [str(changed)]
    _, full = inspect_data(config(moved, f"data.check_cache={cache}").data, full=True)  # data check --full
    assert full.cached_checks == 0 and len(decoded) == 6


def test_data_check_trusts_prepared_shards_and_full_decodes_them(tmp_path, monkeypatch):
    from test_data_pipeline import write_folder

    from mobilenet_embed.data import decode
    from mobilenet_embed.data.tfrecord import read_shard_index

    write_folder(tmp_path / "faces", [2, 3, 2, 4])
    prefix = tmp_path / "out" / "faces"
    _prepare(tmp_path / "faces", prefix, "--shards", "2")
    shard = tmp_path / "out" / "faces-00000-of-00002.tfrecord"
    data = ["--set", "data.source=tfrecord", "--set", f"data.path={prefix}-*.tfrecord"]
    # a record's image bytes damaged in place (same size): only the full check can see it
    where = read_shard_index(str(shard))
    content = bytearray(shard.read_bytes())
    content[where[0, 0]:where[0, 0] + where[0, 1]] = b"\0" * int(where[0, 1])
    shard.write_bytes(bytes(content))
    real = decode.shapes_of
    monkeypatch.setattr(decode, "shapes_of", lambda *a: pytest.fail("the trusted check decoded"))
    trusted = _check(*data)
    assert trusted.exit_code == 0, trusted.output
    assert "manifest checksum, shard sizes and record counts verified" in trusted.output
    monkeypatch.setattr(decode, "shapes_of", real)
    full = _check(*data, "--full", "--set", "data.max_bad_fraction=0.5")
    assert full.exit_code == 0, full.output
    assert "unreadable images: 1" in full.output and f"tfrecord:0:0 ({shard}): corrupt record" in full.output
    with open(shard, "ab") as fh:  # the shard grew: refused
        fh.write(b"x")
    grown = _check(*data)
    assert grown.exit_code == 2 and f"Error: {shard}:" in grown.output and "run `mbembed prepare` again" in grown.output
    shard.write_bytes(bytes(content))
    manifest = tmp_path / "out" / "faces.manifest.json"
    edit = json.loads(manifest.read_text())
    edit["image_sizes"] = {"1x1": 1}
    manifest.write_text(json.dumps(edit))
    edited = _check(*data)
    assert edited.exit_code == 2 and "checksum mismatch" in edited.output


def test_non_utf8_names_are_listed_as_unreadable_not_a_traceback(tmp_path):
    from test_data_pipeline import write_folder

    root = tmp_path / "faces"
    write_folder(root, [3, 3, 2])
    jpeg = (root / "id00" / "0.jpg").read_bytes()
    with open(os.path.join(os.fsencode(root / "id00"), b"\xff.jpg"), "wb") as fh:
        fh.write(jpeg)
    os.mkdir(os.path.join(os.fsencode(root), b"id\xfe"))
    with open(os.path.join(os.fsencode(root), b"id\xfe", b"a.jpg"), "wb") as fh:
        fh.write(jpeg)
    data = ["--set", "data.source=folder", "--set", f"data.path={root}", "--set", "data.check_cache=null",
            "--set", "data.max_bad_fraction=0.5"]
    result = _check(*data)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "unreadable images: 2" in result.output
    assert "id00/\\xff.jpg: file name is not valid UTF-8" in result.output
    assert "id\\xfe/a.jpg: file name is not valid UTF-8" in result.output
    prepared = _prepare(root, tmp_path / "out" / "faces", "--shards", "1", "--set", "data.max_bad_fraction=0.5")
    assert "skipped 2 unreadable files" in prepared.output
    bad = json.loads((tmp_path / "out" / "faces.manifest.json").read_text())["bad_files"]
    assert sorted(p for p, _ in bad) == sorted([f"{root}/id00/\\xff.jpg", f"{root}/id\\xfe/a.jpg"])


def test_symlink_loop_in_the_data_folder_is_reported_and_the_scan_ends(tmp_path):
    from test_data_pipeline import write_folder

    root = tmp_path / "faces"
    write_folder(root, [3, 2])
    os.mkdir(root / "id00" / "sub")
    os.symlink("..", root / "id00" / "sub" / "loop")  # id00/sub/loop -> id00
    result = _check("--set", "data.source=folder", "--set", f"data.path={root}", "--set", "data.check_cache=null")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "identities: 2   images: 5" in result.output
    assert f"{root}/id00/sub/loop: symlink loop" in result.output


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming `width` x `height`, then no pixel data."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + b"\0" * 64)


def test_images_above_the_pixel_limit_are_counted_bad_from_their_header(tmp_path):
    from PIL import Image
    from test_data_pipeline import config, write_folder

    from mobilenet_embed.data import inspect_data

    root = tmp_path / "faces"
    write_folder(root, [3, 3, 3])  # 40x40
    big = np.zeros((50, 60, 3), np.uint8)
    Image.fromarray(big).save(root / "id00" / "big.jpg")
    Image.fromarray(big[..., 0]).save(root / "id01" / "big.pgm")  # Pillow's route
    (root / "id02" / "huge.png").write_bytes(_png_header(20000, 20000))  # 400 Mpixels: header only
    cache = tmp_path / "cache"
    _, report = inspect_data(config(root, "data.max_pixels=2000", f"data.check_cache={cache}").data)
    reasons = {os.path.basename(p): r for p, r in report.bad_files}
    assert reasons == {"big.jpg": "too large: 60x50 = 3,000 pixels > data.max_pixels (2,000)",
                       "big.pgm": "too large: 60x50 = 3,000 pixels > data.max_pixels (2,000)",
                       "huge.png": "too large: 20000x20000 = 400,000,000 pixels > data.max_pixels (2,000)"}
    _, default = inspect_data(config(root, f"data.check_cache={cache}").data)  # 40,000,000: re-checked
    assert [(os.path.basename(p), r) for p, r in default.bad_files] == [
        ("huge.png", "too large: 20000x20000 = 400,000,000 pixels > data.max_pixels (40,000,000)")]
    _, lower = inspect_data(config(root, "data.max_pixels=1000", f"data.check_cache={cache}").data)
    assert len(lower.bad_files) == 12 and lower.cached_checks == 12  # cached sizes against the new limit


def test_choose_images_costs_k_not_the_largest_identity():
    """K distinct images of an identity of 2**40 (a dense [P, max count] draw cannot be built)."""
    import tensorflow as tf

    key = sampler.fold_key(3, sampler.TAG_STEP, 0, 5)
    counts = tf.constant([2 ** 40, 5, 1, 3], tf.int64)
    rows = sampler.choose_images(counts, 4, key).numpy()
    np.testing.assert_array_equal(rows, sampler.choose_images(counts, 4, key).numpy())  # stateless
    assert len(set(rows[0].tolist())) == 4 and rows[0].max() < 2 ** 40
    assert len(set(rows[1].tolist())) == 4 and rows[1].max() < 5
    assert rows[2].tolist() == [0, 0, 0, 0]
    assert sorted(rows[3, :3].tolist()) == [0, 1, 2] and rows[3, 3] < 3  # all 3, then one again
    seen = {tuple(sampler.choose_images(tf.constant([6], tf.int64), 2, sampler.fold_key(0, 1, n)).numpy()[0])
            for n in range(60)}
    assert len(seen) > 20  # draws vary with the key (30 ordered pairs of 6 images)


def test_prepare_file_removed_after_the_check_is_one_error_line_and_writes_nothing(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from test_data_pipeline import write_folder

    from mobilenet_embed.cli import main
    from mobilenet_embed.data import tfrecord_write

    root = tmp_path / "faces"
    write_folder(root, [2, 3, 2])
    victim = sorted((root / sorted(os.listdir(root))[1]).iterdir())[0]
    checked = tfrecord_write.inspect_data

    def check_then_remove(*args, **kwargs):
        found = checked(*args, **kwargs)
        victim.unlink()
        return found

    monkeypatch.setattr(tfrecord_write, "inspect_data", check_then_remove)
    result = CliRunner().invoke(main, ["prepare", "--set", "data.check_cache=null", "--data", str(root),
                                       "--out", str(tmp_path / "out" / "faces"), "--no-progress"])
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and victim.name in last and "changed after the check" in last, last
    assert not list((tmp_path / "out").iterdir())
