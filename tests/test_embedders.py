"""The shared inference code path: one `Embedder` per model kind, chosen by `load_embedder`."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from mobilenet_embed.embedders import (Embedder, KerasEmbedder, SavedModelEmbedder,  # noqa: E402
                                       TFLiteEmbedder, load_embedder)
from mobilenet_embed.errors import UserError  # noqa: E402
from mobilenet_embed.export_formats import export_saved_model, export_tflite  # noqa: E402
from harness import random_images, run_embedder_test, tiny_model  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedders")
    model = tiny_model(SIZE, embedding_size=8)
    model.save(root / "m.keras")
    saved = export_saved_model(model, str(root / "saved_model"), SIZE, 1.0)
    images = random_images(20, SIZE)
    paths = {"keras": str(root / "m.keras"), "saved_model": saved}
    for kind in ("float32", "int8"):
        paths[kind] = export_tflite(saved, str(root / f"m_{kind}.tflite"), kind, images[:10])
    return model, paths, images


@pytest.mark.parametrize("kind,cls,atol", [("keras", KerasEmbedder, 1e-6),
                                           ("saved_model", SavedModelEmbedder, 1e-5),
                                           ("float32", TFLiteEmbedder, 1e-4),
                                           ("int8", TFLiteEmbedder, 0.25)])
def test_load_embedder_picks_the_kind_and_matches_keras(models, kind, cls, atol):
    model, paths, images = models
    embedder = load_embedder(paths[kind], batch_size=4)  # 20 images: 5 batches
    assert isinstance(embedder, cls) and isinstance(embedder, Embedder)
    assert (embedder.image_size, embedder.embedding_size) == (SIZE, 8)
    # unit-length float32 [20, 8] equal to Keras within atol, batching-independent, [S, S, 3] and [0] accepted
    run_embedder_test(embedder, model, images, atol)


def test_tflite_int8_quantises_input_and_reports_its_contract(models):
    _, paths, images = models
    embedder = TFLiteEmbedder(paths["int8"], num_threads=1)
    assert embedder.quantized and embedder.dynamic_batch
    contract = embedder.input_contract()
    assert contract["dtype"] == "int8" and contract["shape"] == [-1, SIZE, SIZE, 3]
    assert contract["scale"] == pytest.approx(2 / 255, rel=0.05)
    # mean cosine to the float model: full-integer quantisation keeps the embedding direction
    ref = KerasEmbedder(load_embedder(paths["keras"]).model).embed(images)
    cos = np.sum(ref * embedder.embed(images), axis=1)
    assert cos.mean() > 0.95
    assert TFLiteEmbedder(paths["float32"]).input_contract()["dtype"] == "float32"


def test_saved_model_raw_signature(models):
    model, paths, _ = models
    embedder = SavedModelEmbedder(paths["saved_model"])
    assert embedder.signature_name == "embed_preprocessed"
    raw = np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    expected = model(raw.astype(np.float32) / 127.5 - 1.0, training=False).numpy()
    np.testing.assert_allclose(embedder.embed_raw(raw), expected, atol=1e-5)
    with pytest.raises(UserError, match="uint8"):
        embedder.embed_raw(raw.astype(np.float32))


def test_wrong_input_and_missing_files_are_user_errors(models, tmp_path):
    _, paths, _ = models
    with pytest.raises(UserError, match=r"\[N, 32, 32, 3\]"):
        load_embedder(paths["float32"]).embed(np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(UserError, match="not found"):
        load_embedder(str(tmp_path / "missing.tflite"))
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer")
    with pytest.raises(UserError, match="cannot load TFLite"):
        load_embedder(str(bad))
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(UserError, match="not a checkpoint"):
        load_embedder(str(other))


def test_keras_model_export_savedmodel_is_accepted(models, tmp_path):
    """A plain `model.export()` SavedModel (signature `serving_default` on float input) works too."""
    model, _, images = models
    model.export(str(tmp_path / "plain"), verbose=False)
    embedder = load_embedder(str(tmp_path / "plain"))
    np.testing.assert_allclose(embedder.embed(images[:3]), model(images[:3], training=False).numpy(),
                               atol=1e-5)


def test_tflite_embedder_keeps_the_interpreters_chatter_off_stderr(models):
    """LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on fd 2 at the first
    allocation of a process: a fresh process shows whether mbembed lets it through."""
    _, paths, _ = models
    code = ("import numpy as np; from mobilenet_embed.embedders import load_embedder; "
            f"e = load_embedder({paths['float32']!r}); "
            f"print(e.embed(np.zeros((2, {SIZE}, {SIZE}, 3), np.float32)).shape)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "(2, 8)" in done.stdout
    assert "XNNPACK" not in done.stderr and "INFO:" not in done.stderr, done.stderr
