"""Similarity transform from landmarks to a template (Umeyama 1991), and the warp applying it.

`estimate_similarity(src, dst)` is the least-squares rotation + uniform scale + translation
taking points `src` to `dst` (no reflection), the estimate insightface's ``norm_crop`` takes
from scikit-image's ``SimilarityTransform``. It returns a 2x3 matrix ``M`` with
``dst ~= M @ [x, y, 1]``, in pixel-index coordinates (OpenCV's ``warpAffine`` convention).

`warp_affine(image, M, size)` samples ``output[y, x] = image[M^-1 (x, y)]`` bilinearly, black
outside the image, with TensorFlow's ``ImageProjectiveTransformV3`` (the op behind
`keras.layers.RandomRotation`), whose output-to-input map uses the same pixel-index convention.
"""

from __future__ import annotations

import numpy as np


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 float64 matrix of the least-squares similarity taking `src` [N, 2] to `dst` [N, 2].

    Raises ValueError when `src` has fewer than 2 distinct points (no scale can be estimated).
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need two matching point sets of >= 2 points, received {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c ** 2).sum() / len(src)
    if src_var <= 1e-12:
        raise ValueError("landmarks coincide: no similarity transform")
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal map is a reflection: flip one axis
        d[-1] = -1.0
    rotation = u @ np.diag(d) @ vt
    scale = float((s * d).sum() / src_var)
    translation = dst_mean - scale * rotation @ src_mean
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points [N, 2] mapped by a 2x3 affine matrix."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return points @ np.asarray(matrix, np.float64)[:, :2].T + np.asarray(matrix, np.float64)[:, 2]


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a 2x3 affine matrix, as a 2x3 matrix."""
    matrix = np.asarray(matrix, dtype=np.float64)
    inv = np.linalg.inv(matrix[:, :2])
    return np.concatenate([inv, (-inv @ matrix[:, 2])[:, None]], axis=1)


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[size, size, 3]``: `image` (uint8 ``[H, W, 3]``) warped by the 2x3 `matrix`
    (input pixel -> output pixel), bilinear, zeros outside the image."""
    import tensorflow as tf

    inv = invert_affine(matrix)
    transform = np.array([[inv[0, 0], inv[0, 1], inv[0, 2], inv[1, 0], inv[1, 1], inv[1, 2], 0.0, 0.0]],
                         np.float32)
    x = tf.convert_to_tensor(np.asarray(image)[None], tf.float32)
    out = tf.raw_ops.ImageProjectiveTransformV3(images=x, transforms=transform,
                                                output_shape=tf.constant([size, size], tf.int32),
                                                fill_value=tf.constant(0.0, tf.float32),
                                                interpolation="BILINEAR", fill_mode="CONSTANT")
    return np.clip(np.rint(out[0].numpy()), 0, 255).astype(np.uint8)
