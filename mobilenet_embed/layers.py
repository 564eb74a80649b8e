"""Custom Keras layers of the embedding model (serialisable, registered under package "mbembed").

Import this module (``mobilenet_embed.model`` does) before `keras.models.load_model` on a
`.keras` file that uses them.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="mbembed")
class L2Normalization(keras.layers.Layer):
    """x / ||x|| along `axis`, exact for vectors of any magnitude.

    Keras' `UnitNormalization` computes ``x * rsqrt(max(sum(x^2), 1e-12))``: for a vector of norm
    below 1e-6 (a freshly initialised MobileNet gives about 1e-9) that floor wins and the output
    is far from unit length. Here x is first divided by its largest absolute component (so the
    squared norm is >= 1 and no floor applies), which the normalisation cancels exactly; the scale
    carries no gradient (the result does not depend on it). An all-zero vector stays zero.
    """

    def __init__(self, axis: int = -1, **kwargs):
        super().__init__(**kwargs)
        self.axis = axis
        self.supports_masking = True

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        tiny = ops.convert_to_tensor(float(_smallest_normal(self.compute_dtype)), dtype=x.dtype)
        scale = ops.stop_gradient(ops.maximum(ops.max(ops.abs(x), axis=self.axis, keepdims=True), tiny))
        x = x / scale
        return x * ops.rsqrt(ops.maximum(ops.sum(ops.square(x), axis=self.axis, keepdims=True),
                                         ops.convert_to_tensor(1e-12, dtype=x.dtype)))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "axis": self.axis}


def _smallest_normal(dtype: str) -> float:
    import numpy as np

    return float(np.finfo(np.dtype(dtype)).tiny)
