"""Data index, decode check, identity lists, preprocessing, `mbembed data check` (issue #4).

Small images generated into tmp_path (never ../shared).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from mobilenet_embed.cli import main
from mobilenet_embed.config import load_config
from mobilenet_embed.data import (augment_images, build_index, images_dataset, inspect_data, preprocess_images,
                                  read_identity_list, split_identities)
from mobilenet_embed.data.preprocess import random_crop_box
from mobilenet_embed.errors import UserError


def _image(seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (1, 1, 3))
    noise = rng.integers(-40, 40, (size, size, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def write_jpegs(root, identities: dict[str, int], start_seed: int = 0) -> None:
    seed = start_seed
    for name, n in identities.items():
        os.makedirs(root / name, exist_ok=True)
        for j in range(n):
            _image(seed).save(root / name / f"{name}_{j:04d}.jpg", quality=90)
            seed += 1


def data_cfg(root, *extra: str, cache=None):
    sets = ["data.source=folder", f"data.path={root}", "data.image_size=32",
            f"data.check_cache={cache if cache else 'null'}"]
    return load_config(None, sets + list(extra)).data


@pytest.fixture
def mixed(tmp_path):
    """One identity per format (2 images each), plus three bad files in 'bad_person'."""
    root = tmp_path / "faces"
    formats = {"jpeg": ("JPEG", ".jpg", "RGB"), "png_grey": ("PNG", ".png", "L"), "png_rgba": ("PNG", ".png", "RGBA"),
               "bmp": ("BMP", ".bmp", "RGB"), "gif": ("GIF", ".gif", "RGB"), "pgm": ("PPM", ".pgm", "L"),
               "tiff": ("TIFF", ".tif", "RGB")}
    for i, (name, (fmt, ext, mode)) in enumerate(formats.items()):
        os.makedirs(root / name / "sub")
        _image(10 * i).convert(mode).save(root / name / f"a{ext}", fmt)
        _image(10 * i + 1).convert(mode).save(root / name / "sub" / f"b{ext}", fmt)  # nested: any depth
    bad = root / "bad_person"
    os.makedirs(bad)
    _image(99).save(bad / "good.jpg")
    _image(98).save(bad / "good2.jpg")
    (bad / "zero.jpg").write_bytes(b"")
    full = (bad / "good.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (bad / "text.jpg").write_text("this is not an image\n" * 5)
    (bad / "notes.txt").write_text("ignored")
    (root / "README").write_text("ignored too")
    return root


def test_every_format_decodes_to_rgb_and_bad_files_are_reported(mixed, tmp_path):
    cfg = data_cfg(mixed, "data.max_bad_fraction=0.5")
    index, report = build_index(cfg)
    bad = dict(report.bad_files)
    assert bad == {str(mixed / "bad_person" / "zero.jpg"): "empty file (0 bytes)",
                   str(mixed / "bad_person" / "truncated.jpg"): "truncated JPEG",
                   str(mixed / "bad_person" / "text.jpg"): "not an image (unrecognised content)"}
    assert report.images == 19 and report.identities == 8 and report.ignored_files == 2
    assert report.usable_identities == 8 and report.usable_images == 16
    assert not set(bad) & set(index.paths)  # excluded from the index
    lines = "\n".join(report.summary_lines())
    for path, reason in bad.items():
        assert f"{path}: {reason}" in lines
    routes = dict(zip(index.paths, index.pillow.tolist()))
    assert routes[str(mixed / "pgm" / "a.pgm")] and routes[str(mixed / "tiff" / "a.tif")]
    assert not routes[str(mixed / "png_grey" / "a.png")] and not routes[str(mixed / "gif" / "a.gif")]

    images = np.concatenate(list(images_dataset(cfg, index.paths, batch_size=5).as_numpy_iterator()))
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    for name in ("pgm", "png_grey"):  # greyscale -> 3 equal channels
        i = index.paths.index(str(mixed / name / ("a.pgm" if name == "pgm" else "a.png")))
        assert np.allclose(images[i, ..., 0], images[i, ..., 1]) and np.allclose(images[i, ..., 0], images[i, ..., 2])
        assert images[i].std() > 0.05


def test_too_many_bad_files_refuse(mixed):
    with pytest.raises(UserError, match=r"3 of 19 images .* more than data.max_bad_fraction"):
        build_index(data_cfg(mixed))


def test_images_dataset_names_an_unreadable_file(mixed):
    cfg = data_cfg(mixed)
    path = str(mixed / "bad_person" / "truncated.jpg")
    with pytest.raises(UserError, match="truncated.jpg: unreadable image: truncated JPEG"):
        images_dataset(cfg, [str(mixed / "jpeg" / "a.jpg"), path], 2)


def test_missing_empty_and_single_image_data_are_errors(tmp_path):
    with pytest.raises(UserError, match="data.path: folder not found"):
        build_index(data_cfg(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="data.path: no images"):
        build_index(data_cfg(tmp_path / "empty"))
    write_jpegs(tmp_path / "singles", {"a": 1, "b": 1, "c": 1})
    with pytest.raises(UserError, match="no identity has 2 or more readable images"):
        build_index(data_cfg(tmp_path / "singles"))


def test_check_cache_is_reused_and_invalidated(tmp_path):
    root = tmp_path / "faces"
    write_jpegs(root, {"a": 3, "b": 2})
    cache = tmp_path / "cache"
    _, first = build_index(data_cfg(root, cache=cache))
    _, second = build_index(data_cfg(root, cache=cache))
    assert first.cached_checks == 0 and second.cached_checks == 5
    (root / "a" / "a_0000.jpg").write_bytes(b"")  # changed after the check: decoded again
    _, third = inspect_data(data_cfg(root, cache=cache))
    assert third.cached_checks == 4 and third.bad_files == [(str(root / "a" / "a_0000.jpg"), "empty file (0 bytes)")]


def test_identity_lists_plain_and_lfw_people_with_folds(tmp_path):
    root = tmp_path / "faces"
    write_jpegs(root, {"Ann": 2, "Bob": 3, "Cid": 2, "Dee": 2, "Eve": 1})
    plain = tmp_path / "list.txt"
    plain.write_text("# comment\nBob\nDee\nZed\n")
    people = tmp_path / "people.txt"
    people.write_text("2\n2\nAnn\t2\nBob\t3\n3\nCid\t2\nDee\t2\nEve\t1\n")
    assert read_identity_list(str(plain)) == ["Bob", "Dee", "Zed"]
    assert read_identity_list(str(people), [2]) == ["Cid", "Dee", "Eve"]
    assert read_identity_list(str(people)) == ["Ann", "Bob", "Cid", "Dee", "Eve"]

    index, report = build_index(data_cfg(root, f"data.identities_file={plain}"))
    assert index.identities == ["Bob", "Dee"] and report.missing_listed == ["Zed"]
    index, _ = build_index(data_cfg(root, f"data.identities_file={people}", "data.identities_folds=[2]"))
    assert index.identities == ["Cid", "Dee"]  # Eve has one image: not usable
    index, report = build_index(data_cfg(root, f"data.exclude_identities_file={plain}"))
    assert index.identities == ["Ann", "Cid"] and report.excluded_identities == 2
    assert sorted(np.unique(index.labels).tolist()) == [0, 1]
    with pytest.raises(UserError, match="data.identities_folds: needs an LFW people.txt"):
        build_index(data_cfg(root, f"data.identities_file={plain}", "data.identities_folds=[1]"))
    with pytest.raises(UserError, match=r"data.identities_folds: expected fold numbers 1..2"):
        build_index(data_cfg(root, f"data.identities_file={people}", "data.identities_folds=[3]"))
    with pytest.raises(UserError, match="data.identities_file: file not found"):
        build_index(data_cfg(root, f"data.identities_file={tmp_path / 'missing.txt'}"))


def test_split_identities_is_seeded_and_holds_out_multi_image_identities(tmp_path):
    root = tmp_path / "faces"
    write_jpegs(root, {f"p{i:02d}": (1 if i % 3 == 0 else 2) for i in range(20)})
    index, _ = build_index(data_cfg(root, "data.min_images_per_identity=1"))
    train, val = split_identities(index, 0.25, seed=3)
    again, val2 = split_identities(index, 0.25, seed=3)
    _, other = split_identities(index, 0.25, seed=4)
    assert val.identities == val2.identities and train.identities == again.identities
    assert val.identities != other.identities
    assert len(val.identities) == 5 and not set(val.identities) & set(train.identities)
    assert all(c >= 2 for c in val.counts())
    assert len(train) + len(val) == len(index)


# --------------------------------------------------------------------------- preprocessing


def test_preprocess_eager_equals_tf_data_and_tf_function():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3)).astype(np.uint8) for h, w in ((50, 40), (33, 61), (64, 64))]
    eager = [preprocess_images(x, 24, 0.6).numpy() for x in images]
    ds = tf.data.Dataset.from_generator(lambda: iter(images), output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    in_data = list(ds.map(lambda x: preprocess_images(x, 24, 0.6)).as_numpy_iterator())
    fn = tf.function(lambda x: preprocess_images(x, 24, 0.6),
                     input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    for a, b, x in zip(eager, in_data, images):
        assert a.shape == (24, 24, 3) and a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=1e-6)
        np.testing.assert_allclose(fn(x[None])[0].numpy(), a, atol=1e-6)
        assert a.min() >= -1 and a.max() <= 1


def test_preprocess_is_central_crop_then_bilinear_resize():
    x = np.arange(250 * 250 * 3, dtype=np.float32).reshape(250, 250, 3) % 251
    got = preprocess_images(x, 150, 0.6).numpy()
    np.testing.assert_allclose(got, x[50:200, 50:200] / 127.5 - 1, atol=1e-5)  # same size: exact crop
    full = preprocess_images(x.astype(np.uint8), 64).numpy()
    ref = tf.image.resize(x.astype(np.uint8), [64, 64], "bilinear", antialias=False).numpy() / 127.5 - 1
    np.testing.assert_allclose(full, ref, atol=1e-5)


def test_augment_eager_equals_tf_data_and_depends_on_seed():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 48, 40, 3)).astype(np.uint8)
    seeds = np.array([[1, 2], [3, 4], [5, 6], [7, 8]], np.int64)
    single = np.stack([augment_images(x, s, 32, 0.8).numpy() for x, s in zip(images, seeds)])
    ds = tf.data.Dataset.from_tensor_slices((images, seeds)).map(lambda x, s: augment_images(x, s, 32, 0.8))
    np.testing.assert_allclose(single, np.stack(list(ds.as_numpy_iterator())), atol=1e-6)
    batch = augment_images(images, [5, 5], 32, 0.8).numpy()
    in_data = next(iter(tf.data.Dataset.from_tensors(images).map(lambda x: augment_images(x, [5, 5], 32, 0.8))))
    np.testing.assert_allclose(batch, in_data.numpy(), atol=1e-6)
    assert batch.shape == (4, 32, 32, 3) and batch.min() >= -1 and batch.max() <= 1
    np.testing.assert_array_equal(batch, augment_images(images, [5, 5], 32, 0.8).numpy())
    assert np.abs(batch - augment_images(images, [6, 5], 32, 0.8).numpy()).max() > 0.1
    assert np.abs(single[0] - single[1]).max() > 0.1


def test_augment_without_jitter_is_a_crop_of_the_preprocessed_image():
    x = np.random.default_rng(2).integers(0, 256, (40, 40, 3)).astype(np.uint8)
    # min_crop 1 and crop 1: the crop is the whole image; only the flip remains
    out = augment_images(x, [1, 2], 40, 1.0, min_crop=1.0, brightness=0.0, contrast=0.0).numpy()
    ref = preprocess_images(x, 40).numpy()
    assert np.allclose(out, ref, atol=1e-5) or np.allclose(out, ref[:, ::-1], atol=1e-5)


def _crop_boxes(n: int, **jitter) -> np.ndarray:
    """`random_crop_box` of a 250 x 200 image (central crop 0.5: a 126 x 100 box at (62, 50)) for n draws."""
    draws = tf.random.stateless_uniform([n, 6], seed=[3, 4])
    return tf.map_fn(lambda d: random_crop_box(250, 200, 0.5, draws=d, **jitter), draws,
                     fn_output_signature=tf.int32).numpy()


def test_random_crop_stays_in_the_central_box_by_default():
    top, left, h, w = _crop_boxes(500, min_crop=0.8).T
    assert (top >= 62).all() and (left >= 50).all() and (top + h <= 188).all() and (left + w <= 150).all()
    assert h.min() == round(126 * 0.8) and h.max() >= 125 and w.max() <= 100


def test_random_crop_looser_and_shifted_framing_stays_inside_the_image():
    top, left, h, w = _crop_boxes(2000, min_crop=0.8, max_crop=1.5, shift=0.2).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 250).all() and (left + w <= 200).all()
    assert h.max() >= 180 and h.min() <= 102 and (np.abs(h / 126 - w / 100) < 0.01).all()  # 0.8..1.5, one fraction
    centre_y, centre_x = top + h / 2 - 125, left + w / 2 - 100
    # a crop may pass the box's edges by 0.2 x its side (25 and 20 px): a 0.8 crop's centre moves
    # up to (126 + 50 - 101) / 2 = 37.5 px (x: 30 px) off the box's centre, inside the box at most 12.5
    assert centre_y.min() < -30 and centre_y.max() > 30 and np.abs(centre_x).max() > 25
    assert (top < 62).any() and (top + h > 188).any()  # framings the default never gives
    # a crop larger than the image is the whole image's side, at its edge
    top, left, h, w = _crop_boxes(50, min_crop=3.0, max_crop=3.0).T
    assert (h == 250).all() and (w == 200).all() and (top == 0).all() and (left == 0).all()


# --------------------------------------------------------------------------- CLI


def _cli(*args):
    return CliRunner().invoke(main, list(args))


def test_cli_data_check_reports_and_exit_codes(mixed, tmp_path):
    common = ["--set", "data.source=folder", "--set", "data.check_cache=null", "--set", f"data.path={mixed}"]
    result = _cli("data", "check", *common, "--set", "data.max_bad_fraction=0.5")
    assert result.exit_code == 0, result.output
    assert "identities: 8   images: 19" in result.output
    assert f"{mixed / 'bad_person' / 'truncated.jpg'}: truncated JPEG" in result.output
    assert "ok: ready to train" in result.output

    result = _cli("data", "check", *common)
    assert result.exit_code == 2
    assert "zero.jpg: empty file (0 bytes)" in result.output  # the list is printed before the error
    assert "Error: data.path" in result.output and "data.max_bad_fraction" in result.output

    result = _cli("data", "check", "--set", "data.source=folder", "--set", f"data.path={tmp_path / 'nowhere'}")
    assert result.exit_code == 2 and "Error: data.path: folder not found" in result.output
    (tmp_path / "empty").mkdir()
    result = _cli("data", "check", "--set", "data.source=folder", "--set", f"data.path={tmp_path / 'empty'}")
    assert result.exit_code == 2 and "Error: data.path: no images" in result.output
    write_jpegs(tmp_path / "singles", {"a": 1, "b": 1})
    result = _cli("data", "check", "--set", "data.source=folder", "--set", "data.check_cache=null",
                  "--set", f"data.path={tmp_path / 'singles'}")
    assert result.exit_code == 2 and "no identity has 2 or more readable images" in result.output
