"""Alignment with the real MTCNN on scikit-image's astronaut (a public-domain photo, one face).

One module-scoped detector and few calls: MTCNN takes ~0.2 s per 512-pixel image on 2 CPU cores.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mobilenet_embed.align.alignment import AlignSpec, align_images, center_crop
from mobilenet_embed.align.similarity import apply_affine, warp_affine
from mobilenet_embed.align.templates import template_points

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("mtcnn")


def _moved(image):
    """The astronaut rotated by 15 degrees, scaled by 0.8 and shifted, same canvas size."""
    a, s = np.deg2rad(15.0), 0.8
    c = np.array([255.5, 255.5])
    rot = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    m = np.concatenate([rot, (c + [30.0, 40.0] - rot @ c)[:, None]], axis=1)
    return warp_affine(image, m, 512)


@pytest.fixture(scope="module")
def detector():
    from mobilenet_embed.align.detector import make_detector

    return make_detector("mtcnn")


@pytest.fixture(scope="module")
def results(detector):
    astro = skimage_data.astronaut()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, astro.shape, dtype=np.uint8)
    grey = np.full_like(astro, 128)
    images = [astro, _moved(astro), noise, grey]
    return images, align_images(images, AlignSpec(size=112, no_face="center"), detector)


def test_astronaut_landmarks_land_on_the_template(results, detector):
    _, (astro, moved, _, _) = results
    template = template_points("arcface", 112)
    for r in (astro, moved):
        assert r.status == "aligned" and r.faces == 1 and r.image.shape == (112, 112, 3)
        # a similarity cannot fit one face's proportions to the template exactly: the residual of
        # the least-squares fit is a few pixels (here eyes ~3, mouth ~6 at 112 px)
        error = np.linalg.norm(apply_affine(r.matrix, r.face.landmarks) - template, axis=1)
        assert error[:2].max() < 4.0 and error.max() < 9.0 and error.mean() < 6.5
    # detected again in the crops, the landmarks are where the transform put them
    again = detector.detect([astro.image, moved.image])
    for r, faces in zip((astro, moved), again):
        assert len(faces) == 1
        assert np.abs(faces[0].landmarks - apply_affine(r.matrix, r.face.landmarks)).max() < 3.0
        assert np.linalg.norm(faces[0].landmarks - template, axis=1).max() < 9.0


def test_rotated_scaled_shifted_copy_aligns_to_nearly_the_same_crop(results):
    _, (astro, moved, _, _) = results
    a, b = astro.image.astype(float), moved.image.astype(float)
    unrelated = center_crop(skimage_data.astronaut(), 112, 1.0).astype(float)
    assert np.abs(a - b).mean() < 15.0
    assert np.abs(a - b).mean() < 0.2 * np.abs(a - unrelated).mean()
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9


def test_images_without_a_face_are_centre_cropped_or_skipped(results):
    images, (_, _, noise, grey) = results
    assert (noise.status, noise.faces, grey.status, grey.faces) == ("center", 0, "center", 0)
    np.testing.assert_array_equal(grey.image, np.full((112, 112, 3), 128, np.uint8))
    np.testing.assert_array_equal(noise.image, center_crop(images[2], 112, 0.5))


def test_mbembed_align_command_end_to_end(tmp_path):
    from mobilenet_embed.cli import main

    raw = tmp_path / "raw"
    (raw / "eileen").mkdir(parents=True)
    (raw / "nobody").mkdir()
    Image.fromarray(skimage_data.astronaut()).resize((256, 256)).save(raw / "eileen" / "astro.jpg", quality=95)
    Image.fromarray(np.full((256, 256, 3), 90, np.uint8)).save(raw / "nobody" / "grey.png")
    (raw / "nobody" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "aligned"
    args = ["align", "--data", str(raw), "--out", str(out), "--size", "96", "--no-face", "skip",
            "--no-progress", "--set", "data.check_cache=null"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "aligned 1, no face 1 (0 centre-cropped, 1 skipped), several faces 0, unreadable 1 of 3" in res.output
    with Image.open(out / "eileen" / "astro.jpg") as im:
        assert im.size == (96, 96)
    assert not (out / "nobody").exists()
    report = json.loads((out / "align_report.json").read_text())
    assert report["settings"]["size"] == 96 and report["unreadable_files"][0][1] == "empty file (0 bytes)"
    res = CliRunner().invoke(main, args)  # everything done: nothing redone
    assert res.exit_code == 0 and "this run: 0 images" in res.output and "2 done before" in res.output
    res = CliRunner().invoke(main, args + ["--center-crop", "0.4"])
    assert res.exit_code == 2 and "Error: --center-crop" in res.output
