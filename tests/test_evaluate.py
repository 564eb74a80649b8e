"""`mbembed eval` end to end on a tiny generated dataset, and its input errors."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mobilenet_embed.cli import main
from mobilenet_embed.config import load_config
from mobilenet_embed.errors import UserError
from mobilenet_embed.evaluate import evaluate
from harness import tiny_model


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """8 identities x 4 images of 40x40 JPEGs, each identity a distinct colour and pattern."""
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    for i in range(8):
        name = f"Person_{i}"
        os.makedirs(root / name)
        base = rng.integers(0, 255, (1, 1, 3))
        for j in range(4):
            img = np.clip(base + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype("uint8")
            Image.fromarray(img).save(root / name / f"{name}_{j + 1:04d}.jpg")
    return str(root)


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory):
    model = tiny_model(32, embedding_size=16, seed=1)  # a random net that still separates colours
    path = str(tmp_path_factory.mktemp("model") / "m.keras")
    model.save(path)
    return path


def cli(*args):
    return CliRunner().invoke(main, list(args))


def test_eval_end_to_end_writes_three_files(faces, keras_model, tmp_path):
    out = tmp_path / "ev"
    result = cli("eval", "--model", keras_model, "--data", faces, "--make-pairs", "10", "--out", str(out),
                 "--set", "eval.folds=5")
    assert result.exit_code == 0, result.output
    for name in ("metrics.json", "roc.png", "pair_distances.csv", "pairs.txt"):
        assert (out / name).stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_pairs"] == 20 and metrics["n_same"] == 10 and metrics["n_folds"] == 5
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["auc"] <= 1.0
    assert metrics["n_images"] == len({p for line in (out / "pair_distances.csv").read_text().splitlines()[1:]
                                       for p in line.split(",")[2:4]})
    assert "accuracy" in result.output and "VAL@FAR=0.001" in result.output and "AUC" in result.output
    assert "note: mbembed eval --data is now --pairs-root" in result.output  # the old name, deprecated
    rows = (out / "pair_distances.csv").read_text().splitlines()
    assert rows[0].startswith("pair,") and len(rows) == 21
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_make_pairs_is_deterministic_and_reusable(faces, keras_model, tmp_path):
    cfg = load_config(None, ["eval.folds=5"])
    a = evaluate(cfg, model=keras_model, pairs_root=faces, make_pairs=10, out_dir=str(tmp_path / "a"))
    b = evaluate(cfg, model=keras_model, pairs_root=faces, make_pairs=10, out_dir=str(tmp_path / "b"))
    assert (tmp_path / "a" / "pairs.txt").read_text() == (tmp_path / "b" / "pairs.txt").read_text()
    # the written pairs file evaluates to the same numbers
    c = evaluate(cfg, model=keras_model, pairs_root=faces, pairs=str(tmp_path / "a" / "pairs.txt"),
                 out_dir=str(tmp_path / "c"))
    for key in ("accuracy", "auc", "eer", "val"):
        assert a.metrics[key] == b.metrics[key] == c.metrics[key]


def test_flip_averages_the_mirror_embedding(faces, keras_model, tmp_path):
    cfg = load_config(None, ["eval.folds=5", "eval.flip=true"])
    res = evaluate(cfg, model=keras_model, pairs_root=faces, make_pairs=10, out_dir=str(tmp_path / "f"))
    plain = evaluate(load_config(None, ["eval.folds=5"]), model=keras_model, pairs_root=faces,
                     pairs=str(tmp_path / "f" / "pairs.txt"), out_dir=str(tmp_path / "p"))
    assert res.metrics["flip"] is True
    flipped = [float(r.split(",")[4]) for r in (tmp_path / "f" / "pair_distances.csv").read_text().splitlines()[1:]]
    unflipped = [float(r.split(",")[4]) for r in (tmp_path / "p" / "pair_distances.csv").read_text().splitlines()[1:]]
    assert not np.allclose(flipped, unflipped)


def test_tflite_export_evaluates_through_the_same_path(faces, keras_model, tmp_path):
    from mobilenet_embed.export_formats import export_saved_model, export_tflite
    import keras
    model = keras.models.load_model(keras_model)
    saved = str(tmp_path / "saved_model")
    export_saved_model(model, saved, image_size=32, crop_fraction=1.0)
    tflite = str(tmp_path / "model_float32.tflite")
    export_tflite(saved, tflite, "tflite_float32")
    cfg = load_config(None, ["eval.folds=5"])
    ref = evaluate(cfg, model=keras_model, pairs_root=faces, make_pairs=10, out_dir=str(tmp_path / "k"))
    pairs = str(tmp_path / "k" / "pairs.txt")
    for path in (saved, tflite):
        res = evaluate(cfg, model=path, pairs_root=faces, pairs=pairs, out_dir=str(tmp_path / ("ev-" + os.path.basename(path))))
        assert res.metrics["accuracy"] == pytest.approx(ref.metrics["accuracy"], abs=1e-9)
        assert res.metrics["auc"] == pytest.approx(ref.metrics["auc"], abs=1e-3)


@pytest.mark.parametrize("args, message", [
    (["--pairs-root", "{faces}"], "mbembed eval: give exactly one of --checkpoint PATH and --model PATH"),
    (["--model", "{model}", "--pairs-root", "{faces}"], "eval.pairs: no pairs file"),
    (["--model", "{model}", "--pairs-root", "{faces}", "--pairs", "/nonexistent/pairs.txt"], "/nonexistent/pairs.txt: pairs file not found"),
    (["--model", "{model}", "--pairs-root", "/nonexistent/images", "--make-pairs", "5"], "/nonexistent/images: image folder not found"),
    (["--model", "/nonexistent/m.tflite", "--pairs-root", "{faces}", "--make-pairs", "10"], "/nonexistent/m.tflite: model not found"),
    (["--model", "{model}", "--data", "{faces}", "--pairs-root", "{faces}"], "mbembed eval: give --pairs-root only (--data is its old name)"),
])
def test_eval_input_errors_exit_2(faces, keras_model, tmp_path, args, message):
    args = [a.format(faces=faces, model=keras_model) for a in args]
    result = cli("eval", *args, "--out", str(tmp_path / "o"))
    assert result.exit_code == 2, result.output
    assert f"Error: {message}" in result.output


def test_malformed_pairs_line_names_file_and_line(faces, keras_model, tmp_path):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1 1\nPerson_0\t1\t2\nPerson_0\tx\tPerson_1\t1\n")
    with pytest.raises(UserError, match=f"{pairs}:3: "):
        evaluate(load_config(None, ["eval.folds=2"]), model=keras_model, pairs_root=faces, pairs=str(pairs),
                 out_dir=str(tmp_path / "o"))


def test_flip_embedding_equals_mean_with_the_mirrored_file(faces, keras_model, tmp_path):
    """The mirror is taken after decoding (one decode per image): it must equal embedding a
    mirrored copy of the file, crop and resize included."""
    import keras
    from mobilenet_embed.verification import embed_paths

    cfg = load_config(None, ["data.image_size=32", "data.crop_fraction=0.7"])
    src = os.path.join(faces, "Person_1", "Person_1_0001.jpg")
    img = np.asarray(Image.open(src).convert("RGB"))
    # PNG copies, so no JPEG re-encoding stands between the image and its mirror
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img[:, ::-1]).save(tmp_path / "a_mirror.png")
    model = keras.models.load_model(keras_model)
    plain, mirror = embed_paths(model, cfg.data, [str(tmp_path / "a.png"), str(tmp_path / "a_mirror.png")])
    flipped = embed_paths(model, cfg.data, [str(tmp_path / "a.png")], flip=True)[0]
    expected = (plain + mirror) / np.linalg.norm(plain + mirror)
    np.testing.assert_allclose(flipped, expected, atol=1e-5)


def _copy_with_a_broken_image(faces, tmp_path):
    import shutil
    root = tmp_path / "faces"
    shutil.copytree(faces, root)
    (root / "Person_2" / "Person_2_0001.jpg").write_bytes(b"not a jpeg at all")
    return root


def test_pair_naming_an_unreadable_image_is_skipped_and_counted(faces, keras_model, tmp_path):
    root = _copy_with_a_broken_image(faces, tmp_path)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("3\nPerson_2\t1\t2\nPerson_0\t1\t2\nPerson_1\t1\t2\n"
                     "Person_0\t1\tPerson_1\t1\nPerson_3\t1\tPerson_4\t1\nPerson_5\t1\tPerson_6\t1\n")
    cfg = load_config(None, ["eval.folds=2"])
    result = evaluate(cfg, model=keras_model, pairs_root=str(root), pairs=str(pairs), out_dir=str(tmp_path / "o"))
    assert result.n_pairs == 5
    assert result.skipped_pairs == [{"line": 2, "image": str(root / "Person_2" / "Person_2_0001.jpg"),
                                     "reason": result.skipped_pairs[0]["reason"]}]
    assert "\nskipped        1 pair: unreadable image Person_2/Person_2_0001.jpg (not an image" in result.table()
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["n_pairs"] == 5 and metrics["n_skipped_pairs"] == 1
    assert metrics["skipped_pairs"][0]["line"] == 2
    with pytest.raises(UserError, match=f"{pairs}:2: unreadable image .*Person_2_0001.jpg .*--strict-pairs"):
        evaluate(cfg, model=keras_model, pairs_root=str(root), pairs=str(pairs), out_dir=str(tmp_path / "s"),
                 strict_pairs=True)
    assert not (tmp_path / "s").exists()  # a failed eval leaves no --out folder it created


def test_make_pairs_leaves_out_unreadable_images(faces, keras_model, tmp_path):
    """--make-pairs draws only images that pass the decode check (as training and data check see them)."""
    root = _copy_with_a_broken_image(faces, tmp_path)
    out = tmp_path / "ev"
    result = cli("eval", "--model", keras_model, "--pairs-root", str(root), "--make-pairs", "24", "--out", str(out),
                 "--set", "eval.folds=2")
    assert result.exit_code == 0, result.output
    assert ("\nnot drawn      1 unreadable image: Person_2/Person_2_0001.jpg (mbembed data check lists them)"
            in result.output)
    assert "Person_2\t1\t" not in (out / "pairs.txt").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["image"] for m in metrics["unreadable_images_not_drawn"]] == [str(root / "Person_2" / "Person_2_0001.jpg")]
    # few pairs: the table says VAL@FAR cannot be measured rather than printing VAL 1.0000 @ FAR 1.0000
    assert "VAL@FAR=0.001  n/a: too few pairs (needs >= 1,000 different pairs, has 24)" in result.output


def test_eval_out_must_be_a_folder_and_a_failed_eval_leaves_none(faces, keras_model, tmp_path):
    a_file = tmp_path / "results.txt"
    a_file.write_text("mine")
    result = cli("eval", "--model", keras_model, "--pairs-root", faces, "--make-pairs", "10", "--out", str(a_file))
    assert result.exit_code == 2 and result.output.count("Error:") == 1, result.output
    assert f"Error: --out {a_file}: is a file; give a folder" in result.output and a_file.read_text() == "mine"
    out = tmp_path / "new" / "eval"
    result = cli("eval", "--model", str(tmp_path / "missing.tflite"), "--pairs-root", faces, "--make-pairs", "10",
                 "--out", str(out))
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "new").exists()
    result = cli("eval", "--model", keras_model, "--pairs-root", faces, "--make-pairs", "10", "--strict-pairs",
                 "--out", str(out))
    assert result.exit_code == 2 and "--strict-pairs applies to a pairs file" in result.output
    assert not (tmp_path / "new").exists()


def test_a_garbage_keras_file_is_named_as_such_not_as_missing(faces, tmp_path):
    """Keras reports 'File not found' for a file that exists but is no zip archive."""
    bad = tmp_path / "model.keras"
    bad.write_bytes(b"not a zip archive")
    result = cli("eval", "--model", str(bad), "--pairs-root", str(faces), "--make-pairs", "2",
                 "--set", "eval.folds=2", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "not a .keras model: a .keras file is a zip archive" in result.output
    assert "File not found" not in result.output and result.output.count("Error:") == 1
