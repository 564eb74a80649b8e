"""The seed's MobileNet: parameter counts, Keras weights transfer, .keras round trip, unit norm."""

import numpy as np
import keras
import pytest
from click.testing import CliRunner

from mobilenet_embed.cli import main
from mobilenet_embed.config import load_config
from mobilenet_embed.errors import UserError
from mobilenet_embed.model import (build_embedding_model, build_model_from_config, copy_keras_mobilenet_weights,
                                   load_backbone_weights, multiply_adds)
from harness import backbone


def head_params(features: int, embedding_size: int = 128) -> int:
    # Dense without bias + BatchNorm(scale=False): beta, moving mean, moving variance.
    return features * embedding_size + 3 * embedding_size


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75, 1.0])
def test_parameter_count_matches_keras_mobilenet_plus_head(alpha):
    reference = keras.applications.MobileNet(input_shape=(160, 160, 3), include_top=False, weights=None,
                                             alpha=alpha, pooling="avg")
    model = build_embedding_model(image_size=160, alpha=alpha)
    features = reference.output_shape[-1]
    assert model.count_params() == reference.count_params() + head_params(features)


def test_default_model_has_the_seed_parameter_count():
    assert build_embedding_model().count_params() == 3_360_320


def randomise(model: keras.Model, seed: int = 0) -> None:
    """Give every weight (BN statistics too) non-trivial values, so a transfer is really tested."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if weights:
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(w.dtype) if "variance" in v.path
                               else rng.normal(0, 0.2, w.shape).astype(w.dtype)
                               for w, v in zip(weights, layer.weights)])


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75, 1.0])
def test_keras_mobilenet_weights_give_the_same_pooled_features(alpha):
    source = keras.applications.MobileNet(input_shape=(64, 64, 3), include_top=False, weights=None,
                                          alpha=alpha, pooling="avg")
    randomise(source)
    model = build_embedding_model(image_size=64, alpha=alpha)
    assert copy_keras_mobilenet_weights(source, model) == 27 * 2  # 27 convs, each with its BN
    x = np.random.default_rng(1).uniform(-1, 1, (3, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(backbone(model)(x).numpy(), source(x).numpy(), atol=1e-5, rtol=1e-5)


def test_backbone_weights_config_key_loads_a_weights_file(tmp_path):
    source = keras.applications.MobileNet(input_shape=(64, 64, 3), include_top=False, weights=None, alpha=0.25)
    randomise(source, seed=3)
    path = str(tmp_path / "mobilenet.weights.h5")
    source.save_weights(path)
    cfg = load_config(None, ["model.alpha=0.25", f"model.backbone_weights={path}"])
    model = build_model_from_config(cfg.model, 64)
    np.testing.assert_array_equal(model.get_layer("conv_pw_13").get_weights()[0],
                                  source.get_layer("conv_pw_13").get_weights()[0])


def test_backbone_weights_of_another_alpha_is_a_clear_error(tmp_path):
    source = keras.applications.MobileNet(input_shape=(64, 64, 3), include_top=False, weights=None, alpha=0.5)
    path = str(tmp_path / "half.weights.h5")
    source.save_weights(path)
    with pytest.raises(UserError, match="model.backbone_weights"):
        load_backbone_weights(build_embedding_model(64, alpha=0.25), path, alpha=0.25)
    with pytest.raises(UserError, match="file not found"):
        load_backbone_weights(build_embedding_model(64, alpha=0.25), str(tmp_path / "none.h5"), alpha=0.25)


def test_outputs_are_unit_vectors_and_keras_round_trip_is_exact(tmp_path):
    model = build_embedding_model(image_size=32, alpha=0.25, embedding_size=16)
    randomise(model, seed=5)
    x = np.random.default_rng(2).uniform(-1, 1, (4, 32, 32, 3)).astype("float32")
    y = model(x, training=False).numpy()
    assert y.shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x, training=False).numpy(), y)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in loaded.layers)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75, 1.0])
def test_untrained_model_outputs_unit_vectors(alpha, tmp_path):
    """Keras' default init gives pre-normalisation vectors of norm ~1e-16..1e-21, where
    UnitNormalization's epsilon floor returned norms of ~0.003; L2Normalization is exact."""
    model = build_embedding_model(image_size=32, alpha=alpha, embedding_size=16)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 3)).astype("float32")
    pre = keras.Model(model.input, model.get_layer("bottleneck_bn").output)(x).numpy()
    assert np.linalg.norm(pre, axis=1).max() < 1e-6  # the regime the floor broke
    y = model(x, training=False).numpy()
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(y, pre / np.linalg.norm(pre, axis=1, keepdims=True), atol=1e-4)
    if alpha == 0.25:
        path = str(tmp_path / "fresh.keras")
        model.save(path)
        np.testing.assert_array_equal(keras.models.load_model(path)(x, training=False).numpy(), y)


def test_l2_normalization_gradient_and_zero_vector():
    import tensorflow as tf

    from mobilenet_embed.layers import L2Normalization

    layer = L2Normalization()
    x = tf.constant([[3e-20, 4e-20], [0.0, 0.0]])
    np.testing.assert_allclose(layer(x).numpy(), [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
    v = tf.Variable([[3.0, 4.0]])
    with tf.GradientTape() as tape:
        out = layer(v)[0, 0]
    # d(x0/||x||)/dx = (||x||^2 - x0 x) / ||x||^3 = [16, -12] / 125
    np.testing.assert_allclose(tape.gradient(out, v).numpy(), [[0.128, -0.096]], rtol=1e-5)


def test_older_keras_files_with_unit_normalization_still_load(tmp_path):
    model = build_embedding_model(image_size=32, alpha=0.25, embedding_size=16)
    randomise(model, seed=3)
    head = keras.layers.UnitNormalization(axis=-1, dtype="float32", name="embedding")
    old = keras.Model(model.input, head(model.get_layer("bottleneck_bn").output))
    path = str(tmp_path / "old.keras")
    old.save(path)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    loaded = keras.models.load_model(path, compile=False)
    assert isinstance(loaded.get_layer("embedding"), keras.layers.UnitNormalization)
    np.testing.assert_allclose(loaded(x, training=False).numpy(), model(x, training=False).numpy(), atol=1e-6)


def test_head_stays_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_embedding_model(image_size=32, alpha=0.25)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("conv1").compute_dtype == "float16"
    assert model.get_layer("embedding").compute_dtype == "float32"
    assert model.output.dtype == "float32"
    randomise(model, seed=1)  # an untrained backbone's activations underflow float16 to 0
    y = model(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32"), training=False)
    assert y.dtype == "float32"
    np.testing.assert_allclose(np.linalg.norm(y.numpy(), axis=1), 1.0, atol=1e-5)


def test_invalid_arguments_are_user_errors():
    with pytest.raises(UserError, match="model.alpha: expected a number > 0, received 0"):
        build_embedding_model(alpha=0)
    with pytest.raises(UserError, match="model.image_size"):
        build_embedding_model(image_size=16)


def test_multiply_adds_of_mobilenet_at_224():
    # The MobileNet paper (alpha 1, 224x224): 569 million multiply-adds with its 1000-way classifier.
    body = multiply_adds(build_embedding_model(224)) - 1024 * 128
    assert round((body + 1024 * 1000) / 1e6) == 569


def test_model_summary_command_prints_the_count():
    result = CliRunner().invoke(main, ["model", "summary", "--image-size", "160", "--no-layers"])
    assert result.exit_code == 0, result.output
    assert "parameters: 3,360,320" in result.output
    assert "multiply-adds: 289,782,272" in result.output
