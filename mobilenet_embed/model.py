"""The seed's network: MobileNet v1 backbone, embedding head, L2 normalisation.

Layer names follow `keras.applications.MobileNet` (conv1, conv_dw_1, conv_pw_1_bn, ...) so that
its weights (ImageNet or any other) load into our backbone by name. Stride-2 convolutions use
'same' padding, which for even input sizes pads exactly as Keras' ZeroPadding2D((0, 1), (0, 1))
+ 'valid' does: the computation is identical.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import keras
from keras import layers

from mobilenet_embed.errors import UserError
from mobilenet_embed.layers import L2Normalization

if TYPE_CHECKING:
    from mobilenet_embed.config import ModelConfig

# (pointwise filters, stride) of the 13 depthwise-separable blocks, as in the MobileNet paper.
BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)

EMBEDDING_LAYER = "embedding"
BACKBONE_OUTPUT = "global_pool"


def _conv_bn_relu(x, filters: int, kernel: int, stride: int, name: str):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu")(x)


def _separable_block(x, filters: int, stride: int, depth_multiplier: int, block_id: int):
    x = layers.DepthwiseConv2D(3, strides=stride, padding="same", depth_multiplier=depth_multiplier,
                               use_bias=False, name=f"conv_dw_{block_id}")(x)
    x = layers.BatchNormalization(name=f"conv_dw_{block_id}_bn")(x)
    x = layers.ReLU(6.0, name=f"conv_dw_{block_id}_relu")(x)
    return _conv_bn_relu(x, filters, 1, 1, f"conv_pw_{block_id}")


def _check(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise UserError(f"model.{name}: expected {expected}, received {value!r}")


def build_embedding_model(image_size: int = 160, alpha: float = 1.0, depth_multiplier: int = 1,
                          embedding_size: int = 128, dropout_keep_prob: float = 0.4,
                          name: str = "mobilenet_embed") -> keras.Model:
    """MobileNet v1 embedding model: images [N, S, S, 3] in [-1, 1] -> unit vectors [N, D].

    The embedding head (Dense, BatchNorm, L2 normalisation) is float32 even under a mixed
    precision policy, so distances and the loss see full-precision embeddings.

    >>> model = build_embedding_model(image_size=160)
    >>> model.count_params()
    3360320
    """
    _check("image_size", image_size, isinstance(image_size, int) and image_size >= 32, "an integer >= 32")
    _check("alpha", alpha, alpha > 0, "a number > 0")
    _check("depth_multiplier", depth_multiplier, depth_multiplier >= 1, "an integer >= 1")
    _check("embedding_size", embedding_size, embedding_size >= 2, "an integer >= 2")
    _check("dropout_keep_prob", dropout_keep_prob, 0 < dropout_keep_prob <= 1, "a number in (0, 1]")

    inputs = keras.Input((image_size, image_size, 3), name="images")
    x = _conv_bn_relu(inputs, int(32 * alpha), 3, 2, "conv1")
    for block_id, (filters, stride) in enumerate(BLOCKS, start=1):
        x = _separable_block(x, int(filters * alpha), stride, depth_multiplier, block_id)
    x = layers.GlobalAveragePooling2D(name=BACKBONE_OUTPUT)(x)
    x = layers.Dropout(1.0 - dropout_keep_prob, name="dropout")(x)
    x = layers.Dense(embedding_size, use_bias=False, dtype="float32", name="bottleneck")(x)
    x = layers.BatchNormalization(momentum=0.99, epsilon=1e-5, scale=False, dtype="float32",
                                  name="bottleneck_bn")(x)
    outputs = L2Normalization(axis=-1, dtype="float32", name=EMBEDDING_LAYER)(x)
    return keras.Model(inputs, outputs, name=name)


def build_model_from_config(model_cfg: "ModelConfig", image_size: int) -> keras.Model:
    """The embedding model described by the config's `model` section (and `data.image_size`)."""
    model = build_embedding_model(image_size=image_size, alpha=model_cfg.alpha,
                                  depth_multiplier=model_cfg.depth_multiplier,
                                  embedding_size=model_cfg.embedding_size,
                                  dropout_keep_prob=model_cfg.dropout_keep_prob)
    if model_cfg.backbone_weights:
        load_backbone_weights(model, model_cfg.backbone_weights, model_cfg.alpha, model_cfg.depth_multiplier)
    return model


def copy_keras_mobilenet_weights(source: keras.Model, model: keras.Model) -> int:
    """Copy every conv/BN weight of a `keras.applications.MobileNet` into `model`, by layer name.

    Returns the number of layers copied; raises UserError when shapes differ (wrong alpha).
    """
    copied = 0
    for layer in source.layers:
        if not layer.weights:
            continue
        try:
            target = model.get_layer(layer.name)
        except ValueError:
            continue  # the classifier head of include_top=True models
        src, dst = layer.get_weights(), target.get_weights()
        if [w.shape for w in src] != [w.shape for w in dst]:
            raise UserError(f"model.backbone_weights: layer {layer.name} has shapes "
                            f"{[w.shape for w in src]}, the model expects {[w.shape for w in dst]} "
                            "(is model.alpha the alpha the weights were trained with?)")
        target.set_weights(src)
        copied += 1
    return copied


def load_backbone_weights(model: keras.Model, path: str, alpha: float, depth_multiplier: int = 1) -> int:
    """Load a weights file of `keras.applications.MobileNet(include_top=False, alpha=alpha)`.

    Accepts a `.weights.h5` / `.h5` weights file (e.g. Keras' ImageNet download) or a whole
    saved `.keras` model. Returns the number of layers copied.
    """
    if not os.path.isfile(path):
        raise UserError(f"model.backbone_weights: file not found: {path}")
    size = model.input_shape[1]
    try:
        if path.endswith(".keras"):
            source = keras.models.load_model(path, compile=False)
        else:
            source = keras.applications.MobileNet(input_shape=(size, size, 3), include_top=False,
                                                  weights=None, alpha=alpha,
                                                  depth_multiplier=depth_multiplier)
            source.load_weights(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.backbone_weights: {path}: cannot load MobileNet weights "
                        f"(alpha={alpha}): {str(exc).splitlines()[0]}") from None
    copied = copy_keras_mobilenet_weights(source, model)
    if copied == 0:
        raise UserError(f"model.backbone_weights: {path}: no MobileNet layer found in the file")
    return copied


def multiply_adds(model: keras.Model) -> int:
    """Multiply-adds of one forward pass (convolutions and dense layers), as papers count them."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, layers.DepthwiseConv2D):
            _, h, w, c = layer.output.shape
            total += h * w * c * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, layers.Conv2D):
            _, h, w, c = layer.output.shape
            total += h * w * c * layer.kernel_size[0] * layer.kernel_size[1] * layer.input.shape[-1]
        elif isinstance(layer, layers.Dense):
            total += layer.input.shape[-1] * layer.units
    return int(total)
