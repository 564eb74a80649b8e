"""`mbembed export`: SavedModel signatures, TFLite formats and their parity, Flex refusal,
--force and atomic writes, the CLI, and the resumable embeddings export.

One tiny model (alpha 0.25, 32x32, 16-d embeddings, random He-initialised weights: Keras'
default init of depthwise kernels makes an untrained MobileNet's activations vanish) is exported
once per module; the other tests reuse it.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from click.testing import CliRunner  # noqa: E402

from mobilenet_embed import export as export_mod  # noqa: E402
from mobilenet_embed import export_embeddings as embeddings_mod  # noqa: E402
from mobilenet_embed import export_formats, export_report  # noqa: E402
from mobilenet_embed.cli import main  # noqa: E402
from mobilenet_embed.config import load_config  # noqa: E402
from mobilenet_embed.embedders import SavedModelEmbedder, load_embedder  # noqa: E402
from mobilenet_embed.errors import UserError  # noqa: E402
from mobilenet_embed.data import preprocess_images  # noqa: E402
from mobilenet_embed.export import export_model  # noqa: E402
from mobilenet_embed.export_embeddings import export_embeddings  # noqa: E402
from mobilenet_embed.export_formats import FILENAMES, export_saved_model, export_tflite  # noqa: E402
from mobilenet_embed.export_report import REPORT_NAME  # noqa: E402
from harness import tiny_model as harness_model  # noqa: E402

SIZE = 32
OVERRIDES = [
    f"data.image_size={SIZE}", "model.alpha=0.25", "model.embedding_size=16",
    "data.synthetic_identities=8", "data.synthetic_images_per_identity=6", "data.val_identities=0.25",
    "export.representative_samples=24", "export.parity_samples=12", "eval.folds=2",
]
ALL_FORMATS = ["saved_model", "tflite_float32", "tflite_float16", "tflite_int8"]


def tiny_model():
    return harness_model(SIZE, embedding_size=16)


def cli_sets(extra=()):
    out = []
    for item in list(OVERRIDES) + list(extra):
        out += ["--set", item]
    return out


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, OVERRIDES)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.keras"
    tiny_model().save(path)
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cfg, checkpoint):
    out = tmp_path_factory.mktemp("export") / "out"
    report = export_model(cfg, checkpoint, str(out), formats=ALL_FORMATS, latency_runs=3)
    return out, report


# --------------------------------------------------------------------------- formats and parity


def test_every_format_meets_its_parity_target(exported):
    out, report = exported
    assert report.passed, report.table()
    assert [r.format for r in report.formats] == ALL_FORMATS
    for row in report.formats:
        assert row.kept and row.path == str(out / FILENAMES[row.format])
        assert os.path.exists(row.path) and row.size_bytes > 0
        statistic, value = export_report.TARGETS[row.format]
        assert (row.cosine_min if statistic == "min" else row.cosine_mean) >= value
        assert row.cosine_min <= row.cosine_mean <= 1.0 + 1e-6
    rows = {r.format: r for r in report.formats}
    assert rows["saved_model"].checks["raw_signature_cosine_min"] >= 0.9999
    assert set(rows["tflite_int8"].latency_ms) == {"threads_1", "threads_2"}
    assert rows["tflite_int8"].input["dtype"] == "int8" and rows["tflite_int8"].input["scale"] > 0
    assert rows["tflite_int8"].size_bytes < 0.5 * rows["tflite_float32"].size_bytes
    assert report.calibration_images == 24 and report.parity_images == 12
    # no temporary left behind; the report on disk is the returned one
    assert sorted(os.listdir(out)) == sorted([FILENAMES[f] for f in ALL_FORMATS] + [REPORT_NAME])
    on_disk = json.loads((out / REPORT_NAME).read_text())
    assert on_disk["passed"] is True and on_disk["degraded"] == []
    assert [r["format"] for r in on_disk["formats"]] == ALL_FORMATS
    assert on_disk["formats"][3]["cosine_mean"] == pytest.approx(report.formats[3].cosine_mean)
    # paths inside the export folder are recorded relative to it: the folder can be moved
    assert on_disk["out_dir"] == "." and on_disk["report_path"] == REPORT_NAME
    assert [r["path"] for r in on_disk["formats"]] == [FILENAMES[f] for f in ALL_FORMATS]
    assert "tflite_int8" in report.table()


def test_raw_uint8_signature_equals_preprocess_plus_model(exported, checkpoint):
    out, _ = exported
    model = keras.models.load_model(checkpoint, compile=False)
    loaded = tf.saved_model.load(str(out / "saved_model"))
    assert set(loaded.signatures) == {"serving_default", "embed_preprocessed"}
    raw = loaded.signatures["serving_default"]
    rng = np.random.default_rng(3)
    for h, w in ((45, 61), (32, 32), (100, 20)):
        images = rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8)
        expected = model(preprocess_images(images, SIZE, 1.0), training=False).numpy()
        got = raw(images=tf.constant(images))["embeddings"].numpy()
        np.testing.assert_allclose(got, expected, atol=2e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    pre = rng.uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    got = loaded.signatures["embed_preprocessed"](images=tf.constant(pre))["embeddings"].numpy()
    np.testing.assert_allclose(got, model(pre, training=False).numpy(), atol=2e-5)


def test_raw_signature_applies_the_configured_crop(tmp_path):
    model = tiny_model()
    path = export_saved_model(model, str(tmp_path / "sm"), SIZE, crop_fraction=0.5)
    images = np.random.default_rng(0).integers(0, 256, (2, 80, 64, 3), dtype=np.uint8)
    expected = model(preprocess_images(images, SIZE, 0.5), training=False).numpy()
    np.testing.assert_allclose(SavedModelEmbedder(path).embed_raw(images), expected, atol=2e-5)


class _Determinant(keras.layers.Layer):
    """A layer using an op with no TFLite builtin (MatrixDeterminant)."""

    def call(self, x):
        matrix = tf.reshape(x[:, :3, :3, 0], [-1, 3, 3])
        return tf.concat([tf.linalg.det(matrix)[:, None], tf.reduce_mean(x, [1, 2])], axis=1)


def test_flex_op_is_refused_with_its_name(tmp_path):
    inputs = keras.Input((SIZE, SIZE, 3))
    model = keras.Model(inputs, _Determinant()(inputs))
    saved = export_saved_model(model, str(tmp_path / "sm"), SIZE, 1.0)
    with pytest.raises(UserError, match=r"MatrixDeterminant.*Flex"):
        export_tflite(saved, str(tmp_path / "m.tflite"), "float32")
    assert not os.path.exists(tmp_path / "m.tflite")
    assert export_formats.flex_ops_in("TF Select ops: MatrixDeterminant, StringSplit\nDetails:") == [
        "MatrixDeterminant", "StringSplit"]


# --------------------------------------------------------------------------- --force, atomicity


def _snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))
            if (folder / name).is_file()}


def test_force_replaces_the_export_folder_whole(tmp_path, cfg, checkpoint, monkeypatch):
    out = tmp_path / "out"
    export_model(cfg, checkpoint, str(out), formats=["tflite_float32", "tflite_float16"], latency_runs=1)
    before = _snapshot(out)
    assert sorted(before) == ["export_report.json", "model_float16.tflite", "model_float32.tflite"]
    with pytest.raises(UserError, match=r"would overwrite model_float32\.tflite, model_float16\.tflite, "
                                        r"export_report\.json; pass --force"):
        export_model(cfg, checkpoint, str(out), formats=["tflite_float32"], latency_runs=1)
    assert _snapshot(out) == before

    # a failure in the middle of a --force export leaves the earlier export whole, no scratch left

    def fail_after_the_saved_model(saved_model_dir, path, kind, representative_images=None):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "export_tflite", fail_after_the_saved_model)
    with pytest.raises(KeyboardInterrupt):
        export_model(cfg, checkpoint, str(out), formats=["tflite_float32", "tflite_float16"], force=True,
                     latency_runs=1)
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]
    monkeypatch.undo()

    # --force with one format: only its file and the new report remain
    report = export_model(cfg, checkpoint, str(out), formats=["tflite_float32"], force=True, latency_runs=1)
    assert report.passed
    assert sorted(os.listdir(out)) == ["export_report.json", "model_float32.tflite"]
    assert [r["format"] for r in json.loads((out / REPORT_NAME).read_text())["formats"]] == ["tflite_float32"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_out_must_be_an_export_folder(tmp_path, cfg, checkpoint, monkeypatch):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(UserError, match=r"--out .*notes\.txt: is a file; give a folder"):
        export_model(cfg, checkpoint, str(a_file), formats=["tflite_float32"], force=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(UserError, match=r"holds files that are not part of an export \(config\.yaml\)"):
        export_model(cfg, checkpoint, str(run), formats=["tflite_float32"], force=True)
    assert (run / "config.yaml").read_text() == "seed: 1\n" and a_file.read_text() == "mine"
    monkeypatch.chdir(run)
    with pytest.raises(UserError, match="is the current folder or holds it"):
        export_model(cfg, checkpoint, str(tmp_path), formats=["tflite_float32"], force=True)
    result = CliRunner().invoke(main, ["export", "--checkpoint", checkpoint, "--out", str(a_file)])
    assert result.exit_code == 2 and result.output.count("Error:") == 1, result.output
    assert "is a file" in result.output


def test_crash_leaves_no_half_written_model(tmp_path, cfg, checkpoint, monkeypatch):
    out = tmp_path / "out"

    def crash(saved_model_dir, path, kind, representative_images=None):
        with open(path, "wb") as fh:  # half a file, as a crash mid-write would leave
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "export_tflite", crash)
    with pytest.raises(KeyboardInterrupt):
        export_model(cfg, checkpoint, str(out), formats=["saved_model", "tflite_float32"], latency_runs=1)
    assert os.listdir(tmp_path) == []  # no export folder, scratch folder removed


def test_full_disk_at_the_savedmodel_is_one_line_and_leaves_nothing(small_disk, cfg, checkpoint):
    mnt, _ = small_disk  # 640 KiB: the tiny model's SavedModel (~1 MB of variables) does not fit
    with pytest.raises(UserError, match=r"saved_model: cannot write: No space left on device$"):
        export_model(cfg, checkpoint, str(mnt / "out"), formats=["saved_model"], latency_runs=1)
    assert os.listdir(mnt) == []  # scratch folder removed, no export folder


@pytest.mark.parametrize("sub, named", [("out", ".tmp-export-out-"), ("new/out", "new: ")])
def test_read_only_export_folder_is_one_cannot_write_line(small_disk, cfg, checkpoint, sub, named):
    """The scratch folder (and a missing parent) beside --out are made through `atomic.writing`:
    the same ``PATH: cannot write: reason`` as every other write, never a traceback."""
    mnt, read_only = small_disk
    read_only()
    with pytest.raises(UserError, match=r": cannot write: Read-only file system$") as info:
        export_model(cfg, checkpoint, str(mnt / sub), formats=["saved_model"], latency_runs=1)
    assert str(info.value).startswith(os.path.join(str(mnt), named)), info.value
    assert os.listdir(mnt) == []


def test_degraded_format_is_left_out_unless_allowed(tmp_path, cfg, checkpoint, monkeypatch):
    monkeypatch.setitem(export_report.TARGETS, "tflite_float16", ("min", 1.01))
    out = tmp_path / "out"
    report = export_model(cfg, checkpoint, str(out), formats=["tflite_float16"], latency_runs=1)
    assert not report.passed and report.degraded == ["tflite_float16"]
    assert os.listdir(out) == [REPORT_NAME]
    data = json.loads((out / REPORT_NAME).read_text())
    assert data["degraded"] == ["tflite_float16"] and data["formats"][0]["kept"] is False
    [line] = report.parity_warnings()
    assert line.startswith("Not written: tflite_float16 misses its parity target: cosine min")

    report = export_model(cfg, checkpoint, str(out), formats=["tflite_float16"], force=True,
                          allow_degraded=True, latency_runs=1)
    assert report.degraded == ["tflite_float16"] and "kept anyway" in report.parity_warnings()[0]
    assert sorted(os.listdir(out)) == ["export_report.json", "model_float16.tflite"]


def test_cli_export_stderr_is_quiet_and_a_parity_miss_exits_1(tmp_path, checkpoint):
    """A real process (native output goes to fd 2): no converter or interpreter chatter, no
    TensorFlow warnings; a format below target gets a "Not written:" line (no "Error:") and exit 1."""
    import subprocess
    import sys

    code = ("import sys; from mobilenet_embed import export_report; "
            "export_report.TARGETS['tflite_float16'] = ('min', 1.01); "
            "from mobilenet_embed.cli import main; main()")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", code, "export", *cli_sets(), "--checkpoint", checkpoint,
                           "--out", str(out), "--format", "tflite_float16", "--format", "tflite_int8",
                           "--latency-runs", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    for chatter in ("fully_quantize", "XNNPACK", "WARNING:", "tensorflow", "INFO:", "Error:"):
        assert chatter not in proc.stderr, proc.stderr
    assert "Not written: tflite_float16 misses its parity target" in proc.stderr
    assert "converting tflite_int8" in proc.stderr and "tflite_int8" in proc.stdout
    assert sorted(os.listdir(out)) == ["export_report.json", "model_int8.tflite"]


# --------------------------------------------------------------------------- CLI


def test_cli_export_prints_the_report_and_refuses_to_overwrite(tmp_path, checkpoint):
    runner = CliRunner()
    args = ["export", *cli_sets(), "--checkpoint", checkpoint, "--out", str(tmp_path / "out"),
            "--format", "tflite_int8", "--latency-runs", "2"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "tflite_int8" in result.output and "cos mean" in result.output
    assert "input: int8 = round(x /" in result.output
    assert (tmp_path / "out" / FILENAMES["tflite_int8"]).exists()
    result = runner.invoke(main, args)
    assert result.exit_code == 2
    assert "Error:" in result.output and "--force" in result.output


def test_cli_export_needs_checkpoint_and_out():
    result = CliRunner().invoke(main, ["export"])
    assert result.exit_code == 2
    assert "--checkpoint and --out required" in result.output


def test_cli_options_before_subcommand_are_an_error(checkpoint):
    result = CliRunner().invoke(main, ["export", "--checkpoint", checkpoint, "embeddings"])
    assert result.exit_code == 2
    assert "put --checkpoint after 'embeddings'" in result.output


def test_verification_accuracy_per_format_with_pairs(tmp_path, checkpoint):
    from PIL import Image

    root = tmp_path / "faces"
    rng = np.random.default_rng(0)
    names = [f"person_{i}" for i in range(4)]
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        base = rng.integers(0, 256, (8, 8, 3))
        for j in range(1, 4):
            image = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).resize((40, 40)).save(root / name / f"{name}_{j:04d}.png")
    lines = ["# mbembed pairs v1"]
    for i, name in enumerate(names):
        lines.append(f"{name}/{name}_0001.png\t{name}/{name}_0002.png\t1")
        other = names[(i + 1) % len(names)]
        lines.append(f"{name}/{name}_0003.png\t{other}/{other}_0001.png\t0")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\n".join(lines) + "\n")
    (root / "person_3" / "person_3_0003.png").write_bytes(b"not a png")  # named by the pair of line 9
    cfg = load_config(None, OVERRIDES + ["data.source=folder", f"data.path={root}", "data.max_bad_fraction=0.1",
                                         "export.representative_samples=6", "export.parity_samples=4"])
    report = export_model(cfg, checkpoint, str(tmp_path / "out"), formats=["tflite_float32", "tflite_int8"],
                          pairs=str(pairs), latency_runs=1)
    assert report.pairs["n_pairs"] == 7  # the pair naming the unreadable image is skipped and counted
    [skipped] = report.pairs["skipped_pairs"]
    assert skipped["line"] == 9 and skipped["image"].endswith("person_3_0003.png")
    for row in [report.reference] + report.formats:
        assert 0.0 <= row.verification["accuracy"] <= 1.0
    assert report.formats[0].verification["accuracy"] == report.reference.verification["accuracy"]
    assert "accuracy" in report.table()
    assert "skipped 1 pair: unreadable image person_3/person_3_0003.png (" in report.table()


# --------------------------------------------------------------------------- checkpoints


def test_run_directory_config_and_checkpoint_are_used(tmp_path, checkpoint):
    """A run directory: its config.yaml sets model/data, its best checkpoint is exported."""
    import yaml

    from mobilenet_embed.checkpoints import CheckpointManager
    from mobilenet_embed.config import config_to_dict
    from mobilenet_embed.checkpoints import load_checkpoint_model, resolve_checkpoint

    run = tmp_path / "run"
    run_cfg = load_config(None, OVERRIDES + ["data.crop_fraction=0.8"])
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(run_cfg)))
    model = tiny_model()
    manager = CheckpointManager(str(run / "checkpoints"), tf.train.Checkpoint(model=model))
    manager.save(5)
    best = model.get_layer("bottleneck").kernel.numpy().copy()
    manager.save_best(5, {"accuracy": 0.9})
    model.get_layer("bottleneck").kernel.assign(np.zeros_like(best))
    manager.save(10)
    (run / "model.keras").write_bytes(b"")  # the final model is not what a run dir resolves to

    resolved = resolve_checkpoint(str(run))
    assert resolved.which == "best" and resolved.step == 5 and resolved.kind == "tf_checkpoint"
    loaded, used = load_checkpoint_model(str(run), load_config(None, []))  # defaults: alpha 1, 64 px
    assert used.data.crop_fraction == 0.8 and used.model.alpha == 0.25 and used.data.image_size == SIZE
    np.testing.assert_array_equal(loaded.get_layer("bottleneck").kernel.numpy(), best)
    embedder = load_embedder(str(run))
    assert embedder.crop_fraction == 0.8 and embedder.image_size == SIZE
    latest = resolve_checkpoint(str(run / "checkpoints" / "ckpt-00000010"))
    assert latest.step == 10 and latest.which == "file"

    with pytest.raises(UserError, match="checkpoint not found"):
        resolve_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no checkpoint"):
        resolve_checkpoint(str(tmp_path))


# --------------------------------------------------------------------------- embeddings


def _run_embeddings(tmp_path, name, checkpoint, extra=()):
    return CliRunner().invoke(main, ["export", "embeddings", *cli_sets(), "--checkpoint", checkpoint,
                                     "--data", "synthetic", "--out", str(tmp_path / name),
                                     "--chunk-size", "10", "--no-progress", *extra])


def test_embeddings_export_resumes_without_duplicates(tmp_path, checkpoint, monkeypatch):
    result = _run_embeddings(tmp_path, "full", checkpoint)
    assert result.exit_code == 0, result.output
    full = np.load(tmp_path / "full" / "embeddings.npy")
    assert full.shape == (48, 16) and full.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)

    real_write = embeddings_mod._write_chunk
    calls = []

    def write_then_die(path, embeddings):
        real_write(path, embeddings)
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the second chunk

    monkeypatch.setattr(embeddings_mod, "_write_chunk", write_then_die)
    result = _run_embeddings(tmp_path, "resumed", checkpoint)
    assert result.exit_code != 0
    chunks = sorted(os.listdir(tmp_path / "resumed" / ".chunks"))
    assert chunks == ["chunk-00000.npy", "chunk-00001.npy", "manifest.json"]
    assert not (tmp_path / "resumed" / "embeddings.npy").exists()

    monkeypatch.setattr(embeddings_mod, "_write_chunk", real_write)
    written = []
    monkeypatch.setattr(embeddings_mod, "_write_chunk", lambda p, e: (written.append(p), real_write(p, e)))
    result = _run_embeddings(tmp_path, "resumed", checkpoint)
    assert result.exit_code == 0, result.output
    assert "2 of 5 chunks reused" in result.output
    assert [os.path.basename(p) for p in written] == ["chunk-00002.npy", "chunk-00003.npy", "chunk-00004.npy"]
    resumed = np.load(tmp_path / "resumed" / "embeddings.npy")
    np.testing.assert_allclose(resumed, full, atol=1e-6)
    with open(tmp_path / "resumed" / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["row"]) for r in rows] == list(range(48))
    assert len({r["path"] for r in rows}) == 48
    assert rows[0]["path"].startswith("synthetic:") and rows[0]["identity"]
    assert sorted(os.listdir(tmp_path / "resumed")) == ["embeddings.npy", "index.csv"]

    result = _run_embeddings(tmp_path, "resumed", checkpoint)
    assert result.exit_code == 2 and "--force" in result.output
    result = _run_embeddings(tmp_path, "resumed", checkpoint, ["--force"])
    assert result.exit_code == 0, result.output


def test_embeddings_export_refuses_foreign_chunks(tmp_path, checkpoint, cfg):
    chunks = tmp_path / "out" / ".chunks"
    chunks.mkdir(parents=True)
    (chunks / "manifest.json").write_text(json.dumps({"n_images": 3}))
    with pytest.raises(UserError, match="unfinished export"):
        export_embeddings(cfg, checkpoint, "synthetic", str(tmp_path / "out"), chunk_size=10, progress=False)
    result = export_embeddings(cfg, checkpoint, "synthetic", str(tmp_path / "out"), chunk_size=100,
                               force=True, progress=False)
    assert result.n_images == 48 and result.chunks == 1


def test_embeddings_of_a_folder_and_of_an_exported_tflite(tmp_path, exported, cfg):
    from PIL import Image

    out, _ = exported
    root = tmp_path / "gallery"
    rng = np.random.default_rng(1)
    for name, count in (("alice", 2), ("bob", 1)):
        (root / name).mkdir(parents=True)
        for j in range(count):
            Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(root / name / f"{j}.png")
    model_path = str(out / FILENAMES["tflite_float32"])
    assert load_embedder(model_path).crop_fraction == 1.0  # recorded in export_report.json
    result = export_embeddings(cfg, model_path, str(root), str(tmp_path / "emb"), progress=False)
    assert result.n_images == 3
    with open(tmp_path / "emb" / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["identity"] for r in rows] == ["alice", "alice", "bob"]
    emb = np.load(tmp_path / "emb" / "embeddings.npy")
    reference = load_embedder(str(out / "saved_model"))
    from mobilenet_embed.export_report import load_images

    images = load_images(cfg.data, [r["path"] for r in rows])
    np.testing.assert_allclose(emb, reference.embed(images), atol=1e-4)


def test_embeddings_export_out_file_and_non_utf8_names(tmp_path, checkpoint):
    """--out naming a file is one Error: line; a file name that is not UTF-8 is an unreadable image,
    counted and left out (no traceback)."""
    from PIL import Image

    root = tmp_path / "faces"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for j in range(3):
            Image.new("RGB", (40, 40), (40 * j, 90, 20)).save(root / name / f"{j}.png")
    with open(os.path.join(os.fsencode(root / "a"), b"\xff.png"), "wb") as fh:
        fh.write((root / "a" / "0.png").read_bytes())
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    result = _run_embeddings(tmp_path, "taken", checkpoint)
    assert result.exit_code == 2 and result.output.count("Error:") == 1, result.output
    assert "--out " + str(a_file) + ": is a file" in result.output and a_file.read_text() == "x"

    result = CliRunner().invoke(main, ["export", "embeddings", *cli_sets(["data.max_bad_fraction=0.5"]),
                                       "--checkpoint", checkpoint, "--data", str(root), "--out",
                                       str(tmp_path / "emb"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "1 unreadable image(s) left out" in result.output
    assert np.load(tmp_path / "emb" / "embeddings.npy").shape == (6, 16)



def test_quiet_native_hides_fd2_chatter_but_shows_it_on_failure(capfd):
    import logging

    from mobilenet_embed.quiet import quiet_native

    level = logging.getLogger("tensorflow").level
    with quiet_native() as captured:
        os.write(2, b"fully_quantize: 0, inference_type: 6\n")
        logging.getLogger("tensorflow").warning("a TensorFlow warning")
    assert capfd.readouterr().err == "" and "fully_quantize" in captured[0]
    with pytest.raises(RuntimeError):
        with quiet_native():
            os.write(2, b"converter: the reason it failed\n")
            raise RuntimeError("conversion failed")
    assert "converter: the reason it failed" in capfd.readouterr().err
    assert logging.getLogger("tensorflow").level == level  # restored
