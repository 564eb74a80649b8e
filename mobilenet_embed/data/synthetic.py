"""Synthetic identities rendered on the fly in pure TensorFlow (no files): quick start and tests.

Each identity is a fixed random set of "face" parameters: background, face, hair, eye, mouth and
mark colours; face ellipse radii, hairline, eye height / spacing / size, mouth height / width /
thickness, mark position and size. Each image of an identity adds nuisance: shift (+-12% of the
frame), scale (x e^+-0.12), rotation (+-15 degrees), lighting (gain +-25% and a +-25% linear
gradient) and Gaussian pixel noise (sigma 4% of the range), all multiplied by
`data.synthetic_nuisance` (0: every image of an identity is identical; 2: twice as hard).
Learning to ignore the nuisance is what the network must do; held-out identities measure it.

Seeded: identity parameters come from ``numpy.random.default_rng(data.synthetic_seed)`` (row i
is the same whatever the number of identities), image nuisance from a table drawn after them,
pixel noise from a stateless TF draw keyed by (synthetic_seed, identity, image). The same key
renders the same image every time. Keys: ``synthetic:syn00042:7`` is image 7 of identity 42.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from mobilenet_embed.errors import UserError

PREFIX = "synthetic:"
N_IDENTITY_PARAMS = 32
N_NUISANCE_PARAMS = 7


def identity_name(i: int) -> str:
    return f"syn{i:05d}"


def image_key(identity: int, image: int) -> str:
    return f"{PREFIX}{identity_name(identity)}:{image}"


def parse_key(key: str) -> tuple[int, int]:
    """``synthetic:syn00042:7`` -> (42, 7); UserError for anything else."""
    try:
        prefix, name, image = key.split(":")
        if prefix + ":" != PREFIX or not name.startswith("syn"):
            raise ValueError
        return int(name[3:]), int(image)
    except ValueError:
        raise UserError(f"{key}: not a synthetic image key (expected synthetic:synNNNNN:N)") from None


def is_synthetic_key(path: str) -> bool:
    return str(path).startswith(PREFIX)


ATLAS_MAX_BYTES = 256 * 2**20  # pre-render the synthetic set for training when it fits in this


class SyntheticTables:
    """The parameter tables of `identities` x `images_per_identity` synthetic images."""

    def __init__(self, identities: int, images_per_identity: int, seed: int = 0, nuisance: float = 1.0):
        self.identities = int(identities)
        self.images_per_identity = int(images_per_identity)
        self.seed = int(seed)
        self.nuisance = float(nuisance)
        rng = np.random.default_rng([self.seed, 0x5EED])
        self.identity_params = rng.random((self.identities, N_IDENTITY_PARAMS), dtype=np.float64).astype(np.float32)
        rng_n = np.random.default_rng([self.seed, 0x1A6E])
        self.nuisance_params = (rng_n.random((self.identities, self.images_per_identity, N_NUISANCE_PARAMS))
                                * 2.0 - 1.0).astype(np.float32)

    @classmethod
    def from_config(cls, data_cfg) -> "SyntheticTables":
        return cls(data_cfg.synthetic_identities, data_cfg.synthetic_images_per_identity,
                   data_cfg.synthetic_seed, data_cfg.synthetic_nuisance)

    def check_key(self, identity: int, image: int, key: str = "") -> None:
        if not (0 <= identity < self.identities and 0 <= image < self.images_per_identity):
            raise UserError(f"{key or image_key(identity, image)}: outside the synthetic data set "
                            f"({self.identities} identities x {self.images_per_identity} images)")

    def atlas(self, size: int, max_bytes: int = ATLAS_MAX_BYTES) -> "tf.Tensor | None":
        """Every image rendered once, uint8 ``[identities * images_per_identity, size, size, 3]``
        (row ``identity * images_per_identity + image``), or None when larger than `max_bytes`.

        Rendering costs about 0.4 ms of CPU per 64x64 image, as much as a small model's training
        step per image on a CPU; training draws each image many times, so it reads the atlas
        instead. The atlas equals `render` exactly (renders are whole grey levels).
        """
        n = self.identities * self.images_per_identity
        if n * size * size * 3 > max_bytes:
            return None
        ids = np.repeat(np.arange(self.identities), self.images_per_identity)
        imgs = np.tile(np.arange(self.images_per_identity), self.identities)
        ds = (tf.data.Dataset.from_tensor_slices((ids, imgs))
              .map(lambda a, b: tf.cast(self.render(a, b, size), tf.uint8), num_parallel_calls=tf.data.AUTOTUNE)
              .batch(n))
        return tf.data.Dataset.get_single_element(ds)

    def render(self, identity: tf.Tensor, image: tf.Tensor, size: int) -> tf.Tensor:
        """Float32 ``[size, size, 3]`` in 0..255 of image `image` of identity `identity` (graph op)."""
        identity = tf.cast(identity, tf.int64)
        image = tf.cast(image, tf.int64)
        params = tf.gather(tf.constant(self.identity_params), identity)
        nuis = tf.gather_nd(tf.constant(self.nuisance_params), tf.stack([identity, image]))
        noise_seed = tf.stack([tf.constant(self.seed, tf.int64),
                               identity * self.images_per_identity + image])
        return render_face(params, nuis * self.nuisance, noise_seed, size, self.nuisance)


def _ellipse(x, y, cx, cy, rx, ry, edge):
    d = tf.sqrt(tf.square((x - cx) / rx) + tf.square((y - cy) / ry))
    return tf.clip_by_value((1.0 - d) / edge, 0.0, 1.0)[..., None]


def render_face(p: tf.Tensor, n: tf.Tensor, noise_seed: tf.Tensor, size: int, nuisance: float) -> tf.Tensor:
    """Render identity parameters `p` [32] (0..1) under nuisance `n` [7] (-1..1 x nuisance)."""
    lin = (tf.range(size, dtype=tf.float32) + 0.5) / size * 2.0 - 1.0
    v, u = tf.meshgrid(lin, lin, indexing="ij")  # v: down, u: right
    # nuisance: shift, scale, rotation, gain, gradient direction
    dx, dy = 0.12 * n[0], 0.12 * n[1]
    scale = tf.exp(0.12 * n[2])
    theta = (15.0 * math.pi / 180.0) * n[3]
    c, s = tf.cos(theta), tf.sin(theta)
    xu, yv = (u - dx) / scale, (v - dy) / scale
    x = c * xu + s * yv
    y = -s * xu + c * yv

    def colour(i):
        return p[i:i + 3]

    bg, face, hair, eye, mouth, mark = (colour(0), colour(3), colour(6), colour(9), colour(12), colour(15))
    rx = 0.50 + 0.25 * p[18]
    ry = 0.65 + 0.25 * p[19]
    hairline = -0.55 + 0.40 * p[20]
    eye_y = -0.25 + 0.25 * p[21]
    eye_dx = 0.18 + 0.20 * p[22]
    eye_r = 0.06 + 0.08 * p[23]
    mouth_y = 0.30 + 0.25 * p[24]
    mouth_w = 0.12 + 0.25 * p[25]
    mouth_h = 0.03 + 0.05 * p[26]
    mark_x = -0.4 + 0.8 * p[27]
    mark_y = -0.3 + 0.7 * p[28]
    mark_r = 0.04 + 0.07 * p[29]
    edge = 0.15

    img = tf.broadcast_to(bg, [size, size, 3])
    m_face = _ellipse(x, y, 0.0, 0.0, rx, ry, edge)
    img = img + m_face * (face - img)
    m_hair = _ellipse(x, y, 0.0, 0.0, rx * 1.08, ry * 1.08, edge) * \
        tf.clip_by_value((hairline - y) / 0.05, 0.0, 1.0)[..., None]
    img = img + m_hair * (hair - img)
    for side in (-1.0, 1.0):
        m_eye = _ellipse(x, y, side * eye_dx, eye_y, eye_r, eye_r * 0.8, 0.3)
        img = img + m_eye * (eye - img)
    m_mouth = _ellipse(x, y, 0.0, mouth_y, mouth_w, mouth_h, 0.4)
    img = img + m_mouth * (mouth - img)
    m_mark = _ellipse(x, y, mark_x, mark_y, mark_r, mark_r, 0.4) * m_face
    img = img + m_mark * (mark - img)

    gain = 1.0 + 0.25 * n[4]
    angle = math.pi * n[6]
    gradient = 1.0 + 0.25 * n[5] * (tf.cos(angle) * u + tf.sin(angle) * v)
    img = img * gain * gradient[..., None]
    if nuisance > 0:
        img = img + 0.04 * nuisance * tf.random.stateless_normal([size, size, 3], seed=noise_seed)
    # whole grey levels, as a decoded 8-bit image has (and so that `SyntheticTables.atlas` is exact)
    return tf.round(tf.clip_by_value(img, 0.0, 1.0) * 255.0)
