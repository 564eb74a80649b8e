"""`--set` over a checkpoint's run config, `--pairs` vs eval.pairs_folds (issue 12 point 2), and
`mbembed eval --align` / `export embeddings --align` on raw photos (issue 14 point 3).

The run directory holds a config.yaml and a whole `model.keras` (32x32, 16-d). The raw photos are
scikit-image's astronaut (public domain, one face), a rotated / scaled / shifted copy and a noise
image without a face: 3 MTCNN calls per run (~0.3 s each).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from mobilenet_embed.cli import main
from mobilenet_embed.config import config_to_dict, load_config
from harness import random_images, tiny_model, write_identity_jpegs

SIZE = 32
RUN_SETS = [f"data.image_size={SIZE}", "model.alpha=0.25", "model.embedding_size=16", "data.crop_fraction=0.8",
            "data.max_bad_fraction=0.01", "data.align_template=arcface", "data.align_size=64"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(load_config(None, RUN_SETS))))
    tiny_model(SIZE, embedding_size=16, seed=1).save(run / "model.keras")
    return str(run)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """6 identities x 3 coloured 40x48 JPEGs, and two LFW View 2 files of 2 folds x 4 pairs."""
    root = tmp_path_factory.mktemp("faces")
    write_identity_jpegs(root, frame=False)
    for fname, offset in (("a.txt", 0), ("b.txt", 2)):
        lines = ["2\t2"]
        for fold in range(2):
            a, b = (2 * fold + offset) % 6, (2 * fold + 1 + offset) % 6
            lines += [f"Person_{a}\t1\t2", f"Person_{b}\t2\t3",
                      f"Person_{a}\t1\tPerson_{b}\t1", f"Person_{b}\t3\tPerson_{a}\t2"]
        (root / fname).write_text("\n".join(lines) + "\n")
    return str(root)


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _eval(tmp_path, *args):
    out = tmp_path / f"ev{len(os.listdir(tmp_path))}"
    result = _invoke("eval", "--out", out, "--set", "eval.folds=2", *args)
    metrics = json.loads((out / "metrics.json").read_text()) if result.exit_code == 0 else None
    return result, metrics


# --------------------------------------------------------------------------- --set vs the run's config


def test_set_crop_overrides_the_checkpoints_run_config_with_a_note(run, faces, tmp_path):
    pairs = os.path.join(faces, "a.txt")
    result, metrics = _eval(tmp_path, "--checkpoint", run, "--pairs-root", faces, "--pairs", pairs)
    assert result.exit_code == 0, result.output
    assert metrics["crop_fraction"] == 0.8 and "note: --set" not in result.output
    result, metrics = _eval(tmp_path, "--checkpoint", run, "--pairs-root", faces, "--pairs", pairs,
                            "--set", "data.crop_fraction=0.6")
    assert result.exit_code == 0, result.output
    assert metrics["crop_fraction"] == 0.6
    assert "note: --set data.crop_fraction=0.6 overrides 0.8 of the checkpoint's run (" in result.output


def test_config_file_values_that_differ_from_the_run_are_reported(run, faces, tmp_path):
    config = tmp_path / "other.yaml"
    config.write_text("data:\n  crop_fraction: 0.5\n")
    result, metrics = _eval(tmp_path, "--config", config, "--checkpoint", run, "--pairs-root", faces,
                            "--pairs", os.path.join(faces, "a.txt"))
    assert result.exit_code == 0, result.output
    assert metrics["crop_fraction"] == 0.8
    assert "note: data.crop_fraction: using 0.8 of the checkpoint's run" in result.output
    assert "not the config file's 0.5 (--set data.crop_fraction=0.5 to override)" in result.output


def test_set_model_key_or_size_of_a_whole_keras_model_is_refused(run, faces, tmp_path):
    result, _ = _eval(tmp_path, "--checkpoint", run, "--make-pairs", "4", "--pairs-root", faces,
                      "--set", "model.embedding_size=32")
    assert result.exit_code == 2
    assert "Error: --set model.embedding_size=32: the checkpoint's run" in result.output
    assert "a trained model's architecture cannot change" in result.output
    result, _ = _eval(tmp_path, "--checkpoint", run, "--make-pairs", "4", "--pairs-root", faces,
                      "--set", "data.image_size=48")
    assert result.exit_code == 2 and "fixed 32x32 input" in result.output


def test_set_image_size_rebuilds_a_training_checkpoint_at_that_size(tmp_path):
    import tensorflow as tf

    from mobilenet_embed.checkpoints import CheckpointManager
    from mobilenet_embed.embedders import load_embedder

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(load_config(None, RUN_SETS))))
    CheckpointManager(str(run / "checkpoints"), tf.train.Checkpoint(model=tiny_model(SIZE, embedding_size=16))).save(3)
    embedder = load_embedder(str(run), load_config(None, ["data.image_size=48"]))
    assert embedder.image_size == 48 and embedder.recorded["image_size"] == 48
    assert embedder.notes == (f"note: --set data.image_size=48 overrides 32 of the checkpoint's run "
                              f"({run / 'config.yaml'})",)
    assert embedder.embed(random_images(2, 48)).shape == (2, 16)


def test_export_embeddings_applies_set_max_bad_fraction(run, faces, tmp_path):
    """Issue 12: `--set data.max_bad_fraction=0.05` was ignored for the run's 0.01."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(faces, data, ignore=shutil.ignore_patterns("*.txt"))
    (data / "Person_0" / "Person_0_0001.jpg").write_bytes(b"not a jpeg")  # 1 of 18 unreadable
    base = ["export", "embeddings", "--checkpoint", run, "--data", data, "--no-progress"]
    result = _invoke(*base, "--out", tmp_path / "e1")
    assert result.exit_code == 2 and "more than data.max_bad_fraction (0.01)" in result.output
    result = _invoke(*base, "--out", tmp_path / "e2", "--set", "data.max_bad_fraction=0.1")
    assert result.exit_code == 0, result.output
    assert "note: --set data.max_bad_fraction=0.1 overrides 0.01 of the checkpoint's run" in result.output
    assert np.load(tmp_path / "e2" / "embeddings.npy").shape == (17, 16)


def test_export_applies_set_crop_and_records_it_in_the_files(run, tmp_path):
    out = tmp_path / "exp"
    result = _invoke("export", "--checkpoint", run, "--out", out, "--format", "saved_model", "--latency-runs", "1",
                     "--set", "export.parity_samples=4", "--set", "data.synthetic_identities=4",
                     "--set", "data.crop_fraction=0.6")
    assert result.exit_code == 0, result.output
    assert "note: --set data.crop_fraction=0.6 overrides 0.8 of the checkpoint's run" in result.output
    meta = json.loads((out / "saved_model" / "assets.extra" / "mbembed_preprocessing.json").read_text())
    assert meta["crop_fraction"] == 0.6 and meta["align"] == {"template": "arcface", "size": 64, "select": "center"}
    assert "note: --set data.synthetic_identities=4 overrides" in result.output  # every key applied is said


@pytest.mark.parametrize("text, problem", [
    ("data: [unclosed\n", ":2: not valid YAML: expected ',' or ']'"),
    ("model:\n  alpha: 0.25\n  alpha: 0.5\n", ":3: not valid YAML: duplicate key 'alpha' (first given on line 2)"),
    ("- a list\n", ": the checkpoint's run config is a list, not a mapping of settings"),
])
def test_corrupt_run_config_of_a_checkpoint_is_one_line_as_a_config_file(faces, tmp_path, text, problem):
    """The run's config.yaml is read as a --config file is (`config.read_yaml_file`)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(text)
    (run / "model.keras").write_bytes(b"never loaded")
    result, _ = _eval(tmp_path, "--checkpoint", run, "--pairs-root", faces, "--make-pairs", "4")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [line for line in result.output.splitlines() if line.strip()], result.output
    assert len(errors) == 1 and errors[0].startswith(f"Error: {run / 'config.yaml'}{problem}"), errors


# --------------------------------------------------------------------------- --pairs vs eval.pairs_folds


def test_pairs_file_given_does_not_inherit_the_configs_folds(run, faces, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"eval:\n  pairs: {os.path.join(faces, 'a.txt')}\n  pairs_folds: [2]\n")
    common = ["--config", config, "--checkpoint", run, "--pairs-root", faces]
    result, metrics = _eval(tmp_path, *common)  # the config's own file: its fold selection holds
    assert result.exit_code == 0, result.output
    assert metrics["n_pairs"] == 4 and "a.txt, folds 2 (eval.pairs_folds): 4 pairs" in result.output
    other = os.path.join(faces, "b.txt")
    result, metrics = _eval(tmp_path, *common, "--pairs", other)
    assert result.exit_code == 0, result.output
    assert metrics["n_pairs"] == 8 and f"pairs: {other}, all folds: 8 pairs" in result.output
    assert "note: eval.pairs_folds [2] selects folds of the config's eval.pairs" in result.output
    result, metrics = _eval(tmp_path, *common, "--pairs", other, "--set", "eval.pairs_folds=[1]")
    assert result.exit_code == 0, result.output
    assert metrics["n_pairs"] == 4 and f"pairs: {other}, folds 1 (eval.pairs_folds): 4 pairs" in result.output


# --------------------------------------------------------------------------- --align on raw photos


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    skimage_data = pytest.importorskip("skimage.data")
    pytest.importorskip("mtcnn")
    from mobilenet_embed.align.similarity import warp_affine

    astro = skimage_data.astronaut()
    a, s = np.deg2rad(15.0), 0.8
    c = np.array([255.5, 255.5])
    rot = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    moved = warp_affine(astro, np.concatenate([rot, (c + [30.0, 40.0] - rot @ c)[:, None]], axis=1), 512)
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    root = tmp_path_factory.mktemp("photos")
    for name, image in (("Eileen_Collins", [astro, moved]), ("Noise", [noise])):
        os.makedirs(root / name)
        for j, im in enumerate(image):
            Image.fromarray(im).save(root / name / f"{name}_{j + 1:04d}.png")
    (root / "pairs.txt").write_text("1\nEileen_Collins\t1\t2\nEileen_Collins\t2\tNoise\t1\n")
    return str(root)


def _astronaut_embedding(run, photos) -> np.ndarray:
    """The embedding the aligned pipeline should give the astronaut (Eileen_Collins_0001): aligned
    as `mbembed align` would, detected together with the folder's other 512x512 photo as the
    pipeline does (one detector call per shape: MTCNN's batched call can place the landmarks a hair
    away from a one-image call, one grey level in the crop), then the run's crop 0.8."""
    from mobilenet_embed.align.alignment import AlignSpec, align_images, decode_file
    from mobilenet_embed.data import preprocess_images
    from mobilenet_embed.embedders import load_embedder

    same_shape = [os.path.join(photos, "Eileen_Collins", f"Eileen_Collins_{j:04d}.png") for j in (1, 2)]
    crop = align_images([decode_file(p) for p in same_shape], AlignSpec(size=64, template="arcface"))[0].image
    return load_embedder(run).embed(preprocess_images(crop[None], SIZE, 0.8).numpy())[0]


def test_eval_and_export_embeddings_align_raw_photos(run, photos, tmp_path):
    result, metrics = _eval(tmp_path, "--checkpoint", run, "--pairs-root", photos, "--pairs",
                            os.path.join(photos, "pairs.txt"), "--align", "--set", "eval.flip=false")
    assert result.exit_code == 0, result.output
    align = metrics["align"]
    assert (align["template"], align["size"], align["aligned"], align["no_face"]) == ("arcface", 64, 2, 1)
    assert align["no_face_paths"][0].endswith("Noise_0001.png")
    assert "alignment (arcface 64): aligned 2, no face 1 (centre-cropped, e.g. " in result.output

    out = tmp_path / "emb"
    result = _invoke("export", "embeddings", "--checkpoint", run, "--data", photos, "--out", out,
                     "--no-progress", "--align")
    assert result.exit_code == 0, result.output
    assert "alignment (arcface 64): aligned 2, no face 1 (centre-cropped, e.g. " in result.output
    emb = np.load(out / "embeddings.npy")
    np.testing.assert_allclose(emb[0], _astronaut_embedding(run, photos), atol=1e-5)  # row 0: the astronaut
    # the aligned astronaut and its moved copy are closer than to the noise
    assert np.dot(emb[0], emb[1]) > np.dot(emb[0], emb[2])


def test_align_needs_a_template_in_the_models_record(faces, tmp_path):
    model = tmp_path / "m.keras"
    tiny_model(SIZE, embedding_size=16).save(model)
    result, _ = _eval(tmp_path, "--model", model, "--pairs-root", faces, "--make-pairs", "4", "--align")
    assert result.exit_code == 2
    assert "Error: --align: the model records no alignment (data.align_template: null)" in result.output


def test_export_pairs_file_does_not_inherit_the_configs_folds(run, faces, tmp_path):
    """`mbembed export --pairs` selects folds as `mbembed eval` does (`pairs_folds_for`)."""
    config = tmp_path / "c.yaml"
    config.write_text(f"eval:\n  pairs: {os.path.join(faces, 'a.txt')}\n  pairs_folds: [2]\n  folds: 2\n")
    other = os.path.join(faces, "b.txt")
    out = tmp_path / "exp"
    result = _invoke("export", "--config", config, "--checkpoint", run, "--out", out, "--format", "saved_model",
                     "--latency-runs", "1", "--set", "export.parity_samples=4", "--pairs", other,
                     "--pairs-root", faces)
    assert result.exit_code == 0, result.output
    assert "note: eval.pairs_folds [2] selects folds of the config's eval.pairs" in result.output
    report = json.loads((out / "export_report.json").read_text())
    assert report["pairs"]["n_pairs"] == 8 and report["pairs"]["pairs_folds"] is None, report["pairs"]


def test_enroll_search_and_identification_align_raw_photos(run, photos, tmp_path):
    """`enroll --align`, `search --align` and `eval --protocol identification --align` align as
    `eval --align` does (`gallery.load_model` -> `aligned_source`): faces not found are counted."""

    index = tmp_path / "gallery"
    result = _invoke("enroll", "--model", run, "--data", photos, "--out", index, "--align",
                     "--set", "eval.flip=false")
    assert result.exit_code == 0, result.output
    assert "alignment (arcface 64): aligned 2, no face 1 (centre-cropped, e.g. " in result.output
    meta = json.loads((index / "gallery.json").read_text())
    emb = np.load(index / meta["embeddings_file"])
    first = os.path.join(photos, "Eileen_Collins", "Eileen_Collins_0001.png")
    row = [r["sources"] for r in meta["rows"]].index([os.path.abspath(first)])
    np.testing.assert_allclose(emb[row], _astronaut_embedding(run, photos), atol=1e-5)  # as eval --align

    moved = os.path.join(photos, "Eileen_Collins", "Eileen_Collins_0002.png")
    result = _invoke("search", "--index", index, moved, "--align", "--format", "jsonl", "--top-k", "1")
    assert result.exit_code == 0, result.output
    assert "alignment (arcface 64): aligned 1, no face 0 (centre-cropped), several faces 0" in result.output
    assert '"identity": "Eileen_Collins"' in result.output
    assert meta["model"]["aligned"] == "arcface"
    result = _invoke("search", "--index", index, moved, "--format", "jsonl")  # without --align: refused
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"Error: mbembed search --index {index}: the gallery was enrolled with --align (faces aligned to the "
        "'arcface' template), these images come without --align; give --align to both or to neither")

    out = tmp_path / "ident"
    result = _invoke("eval", "--protocol", "identification", "--checkpoint", run, "--pairs-root", photos,
                     "--make-id-protocol", "--out", out, "--align")
    assert result.exit_code == 0, result.output
    align = json.loads((out / "identification.json").read_text())["align"]
    assert (align["template"], align["size"], align["aligned"], align["no_face"]) == ("arcface", 64, 2, 1)
    assert "alignment (arcface 64): aligned 2, no face 1 (centre-cropped, e.g. " in result.output


def test_enroll_align_needs_a_template_in_the_models_record(faces, tmp_path):
    model = tmp_path / "m.keras"
    tiny_model(SIZE, embedding_size=16).save(model)
    result = _invoke("enroll", "--model", model, "--data", faces, "--out", tmp_path / "g", "--align")
    assert result.exit_code == 2
    assert "Error: --align: the model records no alignment (data.align_template: null)" in result.output
    assert not (tmp_path / "g").exists()


def test_enroll_embeddings_of_an_aligned_export_spot_checks_with_align(run, photos, tmp_path):
    """The spot check re-embeds images of the export as it was made: with --align, aligned."""
    emb = tmp_path / "emb"
    result = _invoke("export", "embeddings", "--checkpoint", run, "--data", photos, "--out", emb,
                     "--no-progress", "--align")
    assert result.exit_code == 0, result.output
    result = _invoke("enroll", "--model", run, "--embeddings", emb, "--out", tmp_path / "g1")
    assert result.exit_code == 2 and "not made by" in result.output  # raw photos not aligned: refused
    result = _invoke("enroll", "--model", run, "--embeddings", emb, "--out", tmp_path / "g2", "--align")
    assert result.exit_code == 0, result.output
    assert "enrolled 3 images (2 new identities)" in result.output
    assert "alignment (arcface 64): aligned 2, no face 1 (centre-cropped, e.g. " in result.output
