"""Shared test harness for models and embedders (after keras-hub's `TestCase` `run_*_test` helpers).

One tiny model for every test file (`tiny_model`: 32 px, alpha 0.25, He-initialised so its
embeddings are not degenerate), and the checks every embedding model and embedder must pass
(`run_embedder_test`), so each test file states only what is its own.
"""

import numpy as np

TINY_SIZE = 32


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


def tiny_model(image_size: int = TINY_SIZE, embedding_size: int = 16, seed: int = 0):
    """The tests' embedding model: alpha 0.25, He-initialised with `seed`."""
    from mobilenet_embed.model import build_embedding_model

    model = build_embedding_model(image_size=image_size, alpha=0.25, embedding_size=embedding_size)
    he_initialise(model, seed)
    return model


def backbone(model):
    """The part of an embedding model from images to the pooled features (before dropout)."""
    import keras

    from mobilenet_embed.model import BACKBONE_OUTPUT

    return keras.Model(model.input, model.get_layer(BACKBONE_OUTPUT).output, name="backbone")


def random_images(n: int, size: int = TINY_SIZE, seed: int = 0) -> np.ndarray:
    """Preprocessed-looking float32 images [n, size, size, 3] in [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def run_embedder_test(embedder, model, images: np.ndarray, atol: float) -> np.ndarray:
    """What every `Embedder` owes: its sizes, float32 unit-length [N, D] output equal to the Keras
    model's within `atol`, the same rows whatever the batching (a single [S, S, 3] image
    accepted) and an empty batch giving [0, D]. Returns the embeddings."""
    from mobilenet_embed.embedders import Embedder

    size, dim = int(model.input_shape[1]), int(model.output_shape[-1])
    assert isinstance(embedder, Embedder)
    assert (embedder.image_size, embedder.embedding_size) == (size, dim)
    out = embedder.embed(images)
    assert out.shape == (len(images), dim) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(out, model(images, training=False).numpy(), atol=atol)
    np.testing.assert_allclose(embedder.embed(images[3]), out[3:4], atol=1e-5)
    assert embedder.embed(images[:0]).shape == (0, dim)
    return out


def write_identity_jpegs(root, identities: int = 6, per_identity: int = 3, shape=(40, 48),
                         frame: bool = False, seed: int = 0) -> list[str]:
    """An identity folder of noisy single-colour JPEGs, ``root/Person_i/Person_i_000j.jpg`` (LFW's
    names, so LFW pairs files can name them); `frame` inverts the top rows so crops differ.
    Returns the identity names."""
    import os

    from PIL import Image

    rng = np.random.default_rng(seed)
    names = []
    for i in range(identities):
        name = f"Person_{i}"
        os.makedirs(os.path.join(root, name))
        base = rng.integers(0, 255, (1, 1, 3))
        for j in range(per_identity):
            img = np.clip(base + rng.normal(0, 30, (*shape, 3)), 0, 255).astype("uint8")
            if frame:
                img[:6] = 255 - img[:6]
            Image.fromarray(img).save(os.path.join(root, name, f"{name}_{j + 1:04d}.jpg"))
        names.append(name)
    return names
