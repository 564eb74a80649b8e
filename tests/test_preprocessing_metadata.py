"""The preprocessing record inside exported files (SavedModel, .tflite) and how eval reads it.

One tiny model (32x32, 16-d) exported once per module with crop 0.7, aligned arcface 112 and the
cosine distance recorded; the files are then copied alone into other folders.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

tf = pytest.importorskip("tensorflow")

from click.testing import CliRunner  # noqa: E402

from mobilenet_embed import preprocessing_metadata as pm  # noqa: E402
from mobilenet_embed.cli import main  # noqa: E402
from mobilenet_embed.config import load_config  # noqa: E402
from mobilenet_embed.embedders import load_embedder  # noqa: E402
from mobilenet_embed.errors import UserError  # noqa: E402
from mobilenet_embed.export_formats import export_saved_model, export_tflite  # noqa: E402
from harness import tiny_model, write_identity_jpegs  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    model = tiny_model(SIZE, embedding_size=16, seed=1)
    data = load_config(None, ["data.crop_fraction=0.7", "data.align_template=arcface"]).data
    meta = pm.build_metadata(data, 16, "cosine", image_size=SIZE)
    saved = export_saved_model(model, str(root / "saved_model"), SIZE, 0.7, meta)
    tflite = export_tflite(saved, str(root / "model_float32.tflite"), "float32")
    return model, saved, tflite, meta


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """6 identities x 3 images of 40x48 JPEGs, each identity a colour, with a frame so crops differ."""
    root = tmp_path_factory.mktemp("faces")
    write_identity_jpegs(root, frame=True)
    pairs = root / "pairs.txt"
    lines = ["2\t2"]
    for fold in range(2):
        a, b = 2 * fold, 2 * fold + 1
        lines += [f"Person_{a}\t1\t2", f"Person_{b}\t2\t3",
                  f"Person_{a}\t1\tPerson_{b}\t1", f"Person_{b}\t3\tPerson_{a}\t2"]
    pairs.write_text("\n".join(lines) + "\n")
    return str(root), str(pairs)


def _alone(path, folder):
    """`path` (file or SavedModel directory) copied alone into the empty `folder`."""
    os.makedirs(folder)
    target = os.path.join(folder, os.path.basename(path))
    (shutil.copytree if os.path.isdir(path) else shutil.copy)(path, target)
    return target


def _eval(tmp_path, model, faces, *extra):
    root, pairs = faces
    out = tmp_path / f"ev{len(os.listdir(tmp_path))}"
    result = CliRunner().invoke(main, ["eval", "--model", model, "--pairs-root", root, "--pairs", pairs,
                                       "--out", str(out), "--set", "eval.folds=2", *extra])
    metrics = json.loads((out / "metrics.json").read_text()) if result.exit_code == 0 else None
    return result, metrics


def test_savedmodel_and_tflite_carry_the_record(exported):
    _, saved, tflite, meta = exported
    assert meta["crop_fraction"] == 0.7 and meta["align"] == {"template": "arcface", "size": 112, "select": "center"}
    assert meta["normalization"].endswith("[-1, 1])") and meta["distance"] == "cosine"
    assert meta["embedding_size"] == 16 and meta["image_size"] == SIZE and meta["mbembed_version"]
    loaded = tf.saved_model.load(saved)
    assert json.loads(loaded.mbembed_preprocessing[0].numpy()) == meta  # inside the graph's objects
    assert "mbembed_preprocessing" not in loaded.signatures  # no serving signature for it
    assert pm.read_saved_model_asset(saved) == meta  # assets.extra, readable without TensorFlow
    with open(tflite, "rb") as fh:
        assert pm.read_tflite_metadata(fh.read(), tflite) == meta


def test_files_copied_alone_know_their_preprocessing(exported, tmp_path):
    _, saved, tflite, meta = exported
    for path in (_alone(tflite, str(tmp_path / "a")), _alone(saved, str(tmp_path / "b"))):
        embedder = load_embedder(path)
        assert embedder.metadata == meta and embedder.crop_fraction == 0.7
        assert embedder.recorded == {"image_size": SIZE, "crop_fraction": 0.7, "align_template": "arcface",
                                     "align_size": 112, "align_select": "center"}
        assert path in embedder.recorded_from


def test_add_tflite_metadata_replaces_its_entry(exported):
    from ai_edge_litert import schema_py_generated as schema

    _, _, tflite, meta = exported
    with open(tflite, "rb") as fh:
        data = fh.read()
    again = pm.add_tflite_metadata(data, {**meta, "crop_fraction": 0.5})
    model = schema.Model.GetRootAs(again, 0)
    names = [model.Metadata(i).Name() for i in range(model.MetadataLength())]
    assert names.count(b"mbembed_preprocessing") == 1 and b"CONVERSION_METADATA" in names
    assert pm.read_tflite_metadata(again, "x")["crop_fraction"] == 0.5


def test_damaged_record_is_a_user_error():
    with pytest.raises(UserError, match="m.tflite: damaged preprocessing metadata"):
        pm.parse_metadata(b'{"format": "mbembed-preprocessing", "schema": 1}', "m.tflite")
    with pytest.raises(UserError, match="newer than this mbembed"):
        pm.parse_metadata(json.dumps({"format": pm.FORMAT, "schema": 99}), "m.tflite")


def test_tflite_copied_alone_evaluates_with_its_own_crop(exported, faces, tmp_path):
    """Issue 14: a .tflite away from its export_report.json used crop 1.0 (the config default)."""
    _, _, tflite, _ = exported
    alone = _alone(tflite, str(tmp_path / "alone"))
    result, metrics = _eval(tmp_path, alone, faces)
    assert result.exit_code == 0, result.output
    assert metrics["crop_fraction"] == 0.7
    assert f"preprocessing: 32x32, crop 0.7, aligned arcface 112 (from the metadata inside {alone})" in result.output
    assert "images are taken as aligned already" in result.output  # the record says aligned; no --align
    # the same numbers as stating crop 0.7 by hand
    _, by_hand = _eval(tmp_path, alone, faces, "--set", "data.crop_fraction=0.7")
    _, plain = _eval(tmp_path, alone, faces, "--set", "data.crop_fraction=1.0")
    assert by_hand["auc"] == metrics["auc"] and by_hand["threshold"] == metrics["threshold"]
    assert plain["crop_fraction"] == 1.0


def test_set_overrides_the_files_record_with_a_note(exported, faces, tmp_path):
    _, _, tflite, _ = exported
    result, metrics = _eval(tmp_path, tflite, faces, "--set", "data.crop_fraction=0.9")
    assert result.exit_code == 0, result.output
    assert metrics["crop_fraction"] == 0.9
    assert f"note: --set data.crop_fraction=0.9 overrides 0.7 of the metadata inside {tflite}" in result.output
    result, _ = _eval(tmp_path, tflite, faces, "--set", "data.image_size=48")
    assert result.exit_code == 2
    assert ("Error: --set data.image_size=48: the metadata inside" in result.output
            and "has 32; an exported file's input size is fixed" in result.output)


def test_file_without_a_record_is_refused_unless_stated(exported, faces, tmp_path):
    model = exported[0]
    plain = str(tmp_path / "plain")
    model.export(plain, verbose=False)  # Keras' own SavedModel: no record
    result, _ = _eval(tmp_path, plain, faces)
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "the file records no preprocessing" in lines[0]
    assert "--set data.crop_fraction=F" in lines[0] and "data.align_template" in lines[0]
    result, metrics = _eval(tmp_path, plain, faces, "--set", "data.crop_fraction=0.7")
    assert result.exit_code == 0, result.output
    assert metrics["crop_fraction"] == 0.7 and "(from the config (the file records none))" in result.output


def test_old_export_refusal_names_the_reports_crop(exported, faces, tmp_path):
    model = exported[0]
    folder = tmp_path / "old"
    model.export(str(folder / "saved_model"), verbose=False)
    (folder / "export_report.json").write_text(json.dumps({"image_size": SIZE, "crop_fraction": 0.55}))
    result, _ = _eval(tmp_path, str(folder / "saved_model"), faces)
    assert result.exit_code == 2 and "(export_report.json beside it says crop_fraction 0.55)" in result.output
