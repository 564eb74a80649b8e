"""Alignment maths without a detector: similarity estimate, warp, templates, face choice, config keys."""

import numpy as np
import pytest

from mobilenet_embed.align.alignment import (AlignSpec, center_crop_matrix, choose_face)
from mobilenet_embed.align.detector import Face, faces_from_mtcnn_rows
from mobilenet_embed.align.similarity import apply_affine, estimate_similarity, invert_affine, warp_affine
from mobilenet_embed.align.templates import ARCFACE_112, TEMPLATE_NAMES, template_points
from mobilenet_embed.config import load_config
from mobilenet_embed.errors import UserError


def _similarity(angle_deg, scale, tx, ty):
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def test_estimate_similarity_recovers_an_exact_transform():
    src = template_points("arcface", 112) * 1.3 + [40.0, 25.0]
    truth = _similarity(23.0, 0.62, -14.0, 31.0)
    got = estimate_similarity(src, apply_affine(truth, src))
    np.testing.assert_allclose(got, truth, atol=1e-9)


def test_estimate_similarity_equals_scikit_image_on_noisy_points():
    transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(3)
    for _ in range(5):
        src = rng.uniform(0, 250, (5, 2))
        dst = apply_affine(_similarity(rng.uniform(-40, 40), rng.uniform(0.3, 2), *rng.uniform(-50, 50, 2)), src)
        dst += rng.normal(0, 3, dst.shape)
        ref = transform.SimilarityTransform.from_estimate(src, dst) if hasattr(
            transform.SimilarityTransform, "from_estimate") else transform.SimilarityTransform()
        if not hasattr(transform.SimilarityTransform, "from_estimate"):
            ref.estimate(src, dst)
        np.testing.assert_allclose(estimate_similarity(src, dst), ref.params[:2], atol=1e-8)


def test_estimate_similarity_never_reflects_and_refuses_coincident_points():
    src = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    mirrored = src * [-1.0, 1.0]
    m = estimate_similarity(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0
    with pytest.raises(ValueError):
        estimate_similarity(np.ones((5, 2)), src[:1].repeat(5, 0))


def test_invert_affine_round_trips():
    m = _similarity(-12.0, 1.7, 3.0, -8.0)
    pts = np.array([[1.0, 2.0], [50.0, -3.0]])
    np.testing.assert_allclose(apply_affine(invert_affine(m), apply_affine(m, pts)), pts, atol=1e-9)


def test_warp_affine_moves_a_pixel_where_the_matrix_says():
    image = np.zeros((60, 80, 3), np.uint8)
    image[20, 30] = 255  # row 20 = y, column 30 = x
    m = _similarity(30.0, 1.5, 10.0, -5.0)
    out = warp_affine(image, m, 96)
    assert out.shape == (96, 96, 3) and out.dtype == np.uint8
    x, y = apply_affine(m, [[30.0, 20.0]])[0]
    weights = out[..., 0].astype(float)
    yy, xx = np.mgrid[:96, :96]
    centroid = np.array([(xx * weights).sum(), (yy * weights).sum()]) / weights.sum()
    np.testing.assert_allclose(centroid, [x, y], atol=0.6)


def test_templates_scale_with_size_and_loose_is_wider():
    np.testing.assert_allclose(template_points("arcface", 112), ARCFACE_112)
    np.testing.assert_allclose(template_points("arcface", 224), ARCFACE_112 * 2)
    loose = template_points("loose", 112)
    eye_gap = lambda p: np.linalg.norm(p[1] - p[0])  # noqa: E731
    assert eye_gap(loose) == pytest.approx(0.8 * eye_gap(ARCFACE_112))
    assert set(TEMPLATE_NAMES) == {"arcface", "loose"}
    with pytest.raises(ValueError):
        template_points("nope")


def test_choose_face_center_or_largest():
    def face(x1, y1, x2, y2, conf=0.99):
        return Face(np.array([x1, y1, x2, y2], float), conf, np.zeros((5, 2)))

    faces = [face(0, 0, 60, 60), face(45, 45, 55, 55), face(80, 80, 99, 99)]
    assert choose_face(faces, 100, 100, "center") == 1
    assert choose_face(faces, 100, 100, "largest") == 0
    assert choose_face([], 100, 100, "center") is None


def test_faces_from_mtcnn_rows_reads_x_then_y():
    row = np.array([[1, 10, 20, 50, 70, 0.9, 1, 2, 3, 4, 5, 11, 12, 13, 14, 15]], float)
    faces = faces_from_mtcnn_rows(row, 2)
    assert faces[0] == [] and len(faces[1]) == 1
    np.testing.assert_allclose(faces[1][0].landmarks, [[1, 11], [2, 12], [3, 13], [4, 14], [5, 15]])
    assert faces[1][0].area == pytest.approx(40 * 50)


def test_center_crop_matrix_maps_the_central_square():
    m = center_crop_matrix(200, 300, 100, 0.5)  # central 100x100 square of a 300x200 image -> 100 px
    np.testing.assert_allclose(apply_affine(m, [[149.5, 99.5], [99.5, 49.5]]), [[49.5, 49.5], [-0.5, -0.5]])


def test_align_spec_and_config_keys_are_validated():
    with pytest.raises(UserError, match="template"):
        AlignSpec(template="dlib")
    with pytest.raises(UserError, match="no_face"):
        AlignSpec(no_face="drop")
    cfg = load_config(None, ["data.align_template=loose", "data.align_size=96"])
    spec = AlignSpec.from_data_config(cfg.data)
    assert (spec.template, spec.size, spec.select, spec.no_face) == ("loose", 96, "center", "center")
    with pytest.raises(UserError, match="data.align_template"):
        AlignSpec.from_data_config(load_config(None, []).data)
    with pytest.raises(UserError, match="data.align_template"):
        load_config(None, ["data.align_template=dlib"])


@pytest.mark.parametrize("size", [96, 112, 160])
def test_loose_crop_through_central_crop_0_8_is_the_arcface_framing(size):
    import tensorflow as tf

    from mobilenet_embed.data import central_crop_box

    top, _, side, _ = (int(v) for v in central_crop_box(tf.constant(size), tf.constant(size), 0.8))
    # preprocess_images: crop [top, top + side), bilinear resize with half-pixel centres to `size`
    moved = (template_points("loose", size) - top + 0.5) * size / side - 0.5
    assert np.abs(moved - template_points("arcface", size)).max() < 0.5
