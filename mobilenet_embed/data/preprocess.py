"""The one preprocessing function (training, evaluation, export) and training augmentation.

`preprocess_images`: uint8 (or float 0..255) images -> central crop of `crop_fraction` -> bilinear
resize to `image_size` -> float32 in [-1, 1]. The resize is `tf.image.resize(..., "bilinear")`
with half-pixel centres and **antialias off**, everywhere: it converts to TFLite's builtin
RESIZE_BILINEAR (antialias=True becomes ScaleAndTranslate, which is not a TFLite builtin) and is
the cheaper of the two. Downscaling LFW's 150-pixel central crop to 96 or 64 pixels without
antialiasing loses nothing measurable for a network that starts with a stride-2 conv.

The central crop box is ``start = floor(side * (1 - f) / 2)``, ``size = side - 2 * start`` on each
axis (as `tf.image.central_crop` does for f = 0.6, 0.5, ...; exact for any f here).

Augmentation (training only, `data.augment`): a random square-ish crop of the central crop box
(each side `data.augment_min_crop`..`data.augment_max_crop` of the box, same fraction on both
axes; position uniform inside the box grown by `data.augment_shift` of its side on every edge,
and inside the image: above 1, or with a shift, the framing gets looser or off-centre, as other
collections frame faces), the same bilinear resize, a horizontal flip with probability 1/2, brightness
(+- `data.augment_brightness` of the full range) and contrast (x 1 +- `data.augment_contrast`
around the image mean), clipped to [-1, 1]. The geometric half runs per image, the photometric
half (`color_jitter`) on whole batches. Every random draw is stateless (six uniform numbers per
image from a ``[2]`` int64 seed), so a batch is a pure function of (seed, step).
"""

from __future__ import annotations

import tensorflow as tf

RESIZE_METHOD = "bilinear"
ANTIALIAS = False


def central_crop_box(height: tf.Tensor, width: tf.Tensor, crop_fraction: float):
    """(top, left, crop_height, crop_width) int32 of the central `crop_fraction` of an image."""
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    if crop_fraction >= 1.0:
        return tf.constant(0, tf.int32), tf.constant(0, tf.int32), height, width
    margin = (1.0 - float(crop_fraction)) / 2.0
    top = tf.cast(tf.floor(tf.cast(height, tf.float32) * margin), tf.int32)
    left = tf.cast(tf.floor(tf.cast(width, tf.float32) * margin), tf.int32)
    return top, left, tf.maximum(height - 2 * top, 1), tf.maximum(width - 2 * left, 1)


def _resize(images: tf.Tensor, image_size: int) -> tf.Tensor:
    return tf.image.resize(images, [image_size, image_size], method=RESIZE_METHOD, antialias=ANTIALIAS)


def preprocess_images(images, image_size: int, crop_fraction: float = 1.0) -> tf.Tensor:
    """Images ``[H, W, 3]`` or ``[N, H, W, 3]`` (uint8, or float 0..255) -> float32 in [-1, 1].

    Central crop of `crop_fraction`, bilinear resize (antialias off) to ``image_size`` square, then
    ``x / 127.5 - 1``. Pure TF ops: works eagerly, in tf.data and in a `tf.function` whose
    input is ``uint8 [None, None, None, 3]``.

    >>> preprocess_images(tf.zeros([250, 250, 3], tf.uint8), 64, 0.6).shape
    TensorShape([64, 64, 3])
    """
    x = tf.convert_to_tensor(images)
    if x.dtype != tf.float32:
        x = tf.cast(x, tf.float32)
    shape = tf.shape(x)
    top, left, ch, cw = central_crop_box(shape[-3], shape[-2], crop_fraction)
    if crop_fraction < 1.0:
        x = x[..., top:top + ch, left:left + cw, :]
    x = _resize(x, image_size)
    return x / 127.5 - 1.0


N_DRAWS = 6  # uniform draws per augmented image: crop scale, crop y, crop x, flip, brightness, contrast


def augment_draws(seed: tf.Tensor, n: int | None = None) -> tf.Tensor:
    """Uniform draws of the augmentation from an int ``[2]`` seed: ``[6]``, or ``[n, 6]``."""
    shape = [N_DRAWS] if n is None else [n, N_DRAWS]
    return tf.random.stateless_uniform(shape, seed=tf.cast(seed, tf.int64), dtype=tf.float32)


def random_crop_box(height: tf.Tensor, width: tf.Tensor, crop_fraction: float, min_crop: float,
                    draws: tf.Tensor, max_crop: float = 1.0, shift: float = 0.0) -> tf.Tensor:
    """int32 ``[top, left, h, w]`` of a random crop around the central `crop_fraction` box.

    Both sides are the same fraction ``min_crop + (max_crop - min_crop) * draws[0]`` of the
    central box's sides (never more than the image). The position (``draws[1:3]``) is uniform
    inside the box grown by ``shift`` x its side on each edge (centred on the box when the crop
    is larger than that), then moved inside the image. With ``max_crop`` 1 and ``shift`` 0 the
    crop stays inside the box. Computed on [2]-vectors (few ops: this runs once per image). The
    central box is `central_crop_box`'s.
    """
    hw = tf.cast(tf.stack([height, width]), tf.float32)
    margin = (1.0 - float(min(crop_fraction, 1.0))) / 2.0
    start = tf.floor(hw * margin)
    size = tf.maximum(hw - 2.0 * start, 1.0)
    scale = min_crop + (max_crop - min_crop) * draws[0]
    side = tf.clip_by_value(tf.round(size * scale), 1.0, hw)
    reach = tf.floor(size * shift)
    low, high = start - reach, start + size + reach - side
    low = tf.where(high >= low, low, start + tf.floor((size - side) / 2.0))
    span = tf.maximum(high - low, 0.0)
    offset = tf.clip_by_value(low + tf.minimum(tf.floor(draws[1:3] * (span + 1.0)), span), 0.0, hw - side)
    return tf.cast(tf.concat([offset, side], 0), tf.int32)


def _resize_flip(cropped: tf.Tensor, draws: tf.Tensor, image_size: int) -> tf.Tensor:
    x = _resize(cropped, image_size)  # uint8 in, float32 out: no separate cast
    return tf.cond(draws[3] < 0.5, lambda: tf.reverse(x, axis=[1]), lambda: x)


def crop_resize_decoded(image: tf.Tensor, draws: tf.Tensor, image_size: int, crop_fraction: float = 1.0,
                        min_crop: float = 0.8, max_crop: float = 1.0, shift: float = 0.0) -> tf.Tensor:
    """Geometric half of the augmentation: decoded ``[H, W, 3]`` -> random crop, resize, flip ->
    float32 ``[S, S, 3]`` still in 0..255 (`color_jitter` finishes it)."""
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    box = random_crop_box(shape[0], shape[1], crop_fraction, min_crop, draws, max_crop, shift)
    cropped = tf.slice(image, tf.stack([box[0], box[1], 0]), tf.stack([box[2], box[3], -1]))
    return _resize_flip(cropped, draws, image_size)


def crop_resize_encoded(contents: tf.Tensor, draws: tf.Tensor, image_size: int, crop_fraction: float = 1.0,
                        min_crop: float = 0.8, max_crop: float = 1.0, shift: float = 0.0) -> tf.Tensor:
    """`crop_resize_decoded` from encoded bytes (TF decoders).

    JPEGs are decoded only inside the random crop box (`tf.io.decode_and_crop_jpeg`; it differs
    from decode-then-crop by at most a few levels on a few pixels at block edges); other formats
    are decoded whole and cropped.
    """
    from mobilenet_embed.data.decode import decode_image_bytes

    def jpeg():
        shape = tf.io.extract_jpeg_shape(contents)
        box = random_crop_box(shape[0], shape[1], crop_fraction, min_crop, draws, max_crop, shift)
        return tf.io.decode_and_crop_jpeg(contents, box, channels=3)

    def other():
        image = decode_image_bytes(contents)
        shape = tf.shape(image)
        box = random_crop_box(shape[0], shape[1], crop_fraction, min_crop, draws, max_crop, shift)
        return tf.slice(image, tf.stack([box[0], box[1], 0]), tf.stack([box[2], box[3], -1]))

    return _resize_flip(tf.cond(tf.io.is_jpeg(contents), jpeg, other), draws, image_size)


def color_jitter(images: tf.Tensor, draws: tf.Tensor, brightness: float = 0.1, contrast: float = 0.2) -> tf.Tensor:
    """Photometric half: float 0..255 ``[N, S, S, 3]`` (draws ``[N, 6]``) or ``[S, S, 3]`` (``[6]``)
    -> brightness shift ``(2 draws[4] - 1) * brightness`` of the range, contrast
    ``x 1 + (2 draws[5] - 1) * contrast`` around each image's mean -> float32 clipped to [-1, 1].

    Fused into one multiply-add per pixel and applied to whole batches in the pipeline.
    """
    x = tf.cast(images, tf.float32)
    draws = tf.convert_to_tensor(draws, tf.float32)
    single = x.shape.rank == 3
    if single:
        x, draws = x[None], draws[None]
    factor = 1.0 + (2.0 * draws[:, 5] - 1.0) * contrast
    shift = (2.0 * draws[:, 4] - 1.0) * brightness
    mean = tf.reduce_mean(x, axis=[1, 2, 3]) / 255.0
    # ((x/255 + shift) - (mean + shift)) * factor + (mean + shift), then * 2 - 1
    scale = (2.0 * factor / 255.0)[:, None, None, None]
    offset = (2.0 * (mean * (1.0 - factor) + shift) - 1.0)[:, None, None, None]
    out = tf.clip_by_value(x * scale + offset, -1.0, 1.0)
    return out[0] if single else out


def augment_images(images, seed, image_size: int, crop_fraction: float = 1.0, min_crop: float = 0.8,
                   brightness: float = 0.1, contrast: float = 0.2, max_crop: float = 1.0,
                   shift: float = 0.0) -> tf.Tensor:
    """Training augmentation of decoded images ``[H, W, 3]`` or ``[N, H, W, 3]`` (0..255).

    `seed`: int ``[2]``. Returns float32 in [-1, 1] at ``image_size``: random crop around the
    central `crop_fraction` box (`random_crop_box`), bilinear resize, flip (`crop_resize_decoded`, per image), then
    brightness and contrast (`color_jitter`). The training pipeline runs the same two functions
    (`crop_resize_encoded` for encoded bytes) with draws made per step.
    """
    images = tf.convert_to_tensor(images)
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    if images.shape.rank == 3:
        draws = augment_draws(seed)
        return color_jitter(crop_resize_decoded(images, draws, image_size, crop_fraction, min_crop, max_crop, shift),
                            draws, brightness, contrast)
    draws = augment_draws(seed, tf.shape(images)[0])
    geometric = tf.map_fn(lambda a: crop_resize_decoded(a[0], a[1], image_size, crop_fraction, min_crop,
                                                              max_crop, shift),
                          (images, draws), fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))
    return color_jitter(geometric, draws, brightness, contrast)


def flip_images(images: tf.Tensor) -> tf.Tensor:
    """Mirror ``[..., H, W, C]`` images left-right."""
    return tf.reverse(images, axis=[-2])


__all__ = ["preprocess_images", "augment_images", "augment_draws", "crop_resize_decoded", "crop_resize_encoded",
           "color_jitter", "central_crop_box", "random_crop_box", "flip_images", "RESIZE_METHOD", "ANTIALIAS"]
