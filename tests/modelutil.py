"""Helpers shared by tests that need a random model whose embeddings are not degenerate."""

import numpy as np


def he_initialise(model, seed: int = 0) -> None:
    """He-normal kernels everywhere: Keras' default init gives pre-normalisation embeddings near
    1e-16 for a random MobileNet, which makes parity and distance checks meaningless."""
    from keras import layers

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.DepthwiseConv2D):
            fan_in = int(np.prod(layer.kernel.shape[:2]))
        elif isinstance(layer, (layers.Conv2D, layers.Dense)):
            fan_in = int(np.prod(layer.kernel.shape[:-1]))
        else:
            continue
        layer.kernel.assign(rng.normal(0, np.sqrt(2.0 / fan_in), layer.kernel.shape).astype(np.float32))
