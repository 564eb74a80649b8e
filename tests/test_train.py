"""`mbembed train`: run-directory artefacts, logs, resume after SIGINT / SIGKILL, --fresh/--force,
the non-finite-loss stop, precision policies and (shortly) that learning happens."""

from __future__ import annotations

import glob
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from mobilenet_embed.cli import main
from mobilenet_embed.config import load_config
from mobilenet_embed.errors import UserError

# A run of a few seconds: 32 px, alpha 0.25, P=4 x K=2, 2 epochs of 3 steps.
TINY = [
    "data.source=synthetic", "data.image_size=32", "data.synthetic_identities=12",
    "data.synthetic_images_per_identity=4", "data.val_identities=0.25",
    "model.alpha=0.25", "model.embedding_size=16",
    "train.identities_per_batch=4", "train.images_per_identity=2", "train.epochs=2",
    "train.steps_per_epoch=3", "train.log_every_steps=1", "train.checkpoint_every_steps=2",
    "train.keep_checkpoints=2", "train.val_pairs=20", "eval.folds=2", "eval.batch_size=16",
]

PLAIN_LINE = re.compile(r"step (\d+)/(\d+) epoch (\d+)/(\d+) loss \d+\.\d{4} active \d\.\d{3} pos \d+\.\d{3} "
                        r"neg \d+\.\d{3} lr \d\.\de[-+]\d\d( img/s \d+\.\d)?( eta \d+:\d\d:\d\d)?")


def _sets(overrides):
    out = []
    for item in overrides:
        out += ["--set", item]
    return out


def _cfg(*extra):
    return load_config(None, TINY + list(extra))


def _event_tags(run_dir):
    import tensorflow as tf

    tags = set()
    for path in glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.add(value.tag)
    return tags


def _jsonl(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [r for r in map(json.loads, fh) if r["kind"] == kind]


def _index(run_dir):
    with open(os.path.join(run_dir, "checkpoints", "checkpoint.json"), encoding="utf-8") as fh:
        return json.load(fh)


def _latest_weights(run_dir, cfg):
    """The model weights of the run's latest checkpoint, loaded into a fresh model."""
    from mobilenet_embed.checkpoints import load_weights
    from mobilenet_embed.model import build_model_from_config

    model = build_model_from_config(cfg.model, cfg.data.image_size)
    load_weights(model, run_dir)
    return [w.numpy() for w in model.weights]


def _checkpoint_value(run_dir, fragment):
    """A variable of the latest checkpoint whose name contains `fragment`."""
    import tensorflow as tf

    index = _index(run_dir)
    prefix = os.path.join(run_dir, "checkpoints", index["latest"]["name"], "ckpt")
    names = [n for n, _ in tf.train.list_variables(prefix) if fragment in n]
    assert names, f"no variable containing {fragment!r}"
    return tf.train.load_checkpoint(prefix).get_tensor(names[0])


def test_run_writes_every_artefact_and_plain_log(tmp_path):
    run = str(tmp_path / "run")
    result = CliRunner().invoke(main, ["train", *_sets(TINY), "--run-dir", run])
    assert result.exit_code == 0, result.output

    # plain log: stdout is not a terminal here, so one line per logging step (every step)
    lines = [line for line in result.output.splitlines() if line.startswith("step ")]
    assert len(lines) == 6
    for n, line in enumerate(lines, start=1):
        match = PLAIN_LINE.fullmatch(line)
        assert match, line
        assert (int(match.group(1)), int(match.group(2)), int(match.group(4))) == (n, 6, 2)
    assert "img/s" in lines[-1] and "eta" in lines[-1]
    assert re.search(r"validation step 3 epoch 1: accuracy \d\.\d{4}", result.output)
    assert re.search(r"training finished at step 6: 6 steps in \d+:\d\d:\d\d, \d+\.\d images/s", result.output)
    assert "final validation accuracy" in result.output and "best validation accuracy" in result.output

    # config.yaml: the resolved config and the versions
    import yaml

    with open(os.path.join(run, "config.yaml"), encoding="utf-8") as fh:
        saved = yaml.safe_load(fh)
    assert saved["train"]["steps_per_epoch"] == 3 and saved["run_dir"] == os.path.abspath(run)
    assert {"mbembed", "tensorflow", "keras", "python"} <= set(saved["versions"])

    # checkpoints: latest at the end, the last 2 kept, a best one
    index = _index(run)
    assert index["latest"]["step"] == 6
    assert len(index["kept"]) == 2
    kept = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run, "checkpoints", "ckpt-*")))
    assert kept == sorted(index["kept"])
    assert index["best"]["step"] in (3, 6)
    assert os.path.isfile(os.path.join(run, "checkpoints", index["best"]["name"], "ckpt.index"))

    # metrics.jsonl: one line per logging step, validations at the epoch ends
    train_lines = _jsonl(run, "train")
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "active_fraction", "mean_pos_dist", "mean_neg_dist", "embedding_spread", "learning_rate"):
        assert all(np.isfinite(r[key]) for r in train_lines), key
    assert "images_per_second" in train_lines[-1]
    assert [r["step"] for r in _jsonl(run, "validation")] == [3, 6]

    # TensorBoard events
    tags = _event_tags(run)
    for tag in ("train/loss", "train/learning_rate", "train/active_fraction", "train/mean_pos_dist",
                "train/mean_neg_dist", "train/embedding_spread", "train/images_per_second", "val/accuracy"):
        assert tag in tags, tag

    # model.keras: the embedding model
    import keras

    model = keras.models.load_model(os.path.join(run, "model.keras"), compile=False)
    emb = model(np.zeros((2, 32, 32, 3), np.float32), training=False)
    assert tuple(emb.shape) == (2, 16)
    with open(os.path.join(run, "summary.json"), encoding="utf-8") as fh:
        assert json.load(fh)["steps"] == 6

    # again on the same directory: resumes, nothing left to do
    again = CliRunner().invoke(main, ["train", *_sets(TINY), "--run-dir", run])
    assert again.exit_code == 0, again.output
    assert "already at step 6" in again.output

    # --fresh refuses to overwrite without --force; --force alone is a usage error
    refused = CliRunner().invoke(main, ["train", *_sets(TINY), "--run-dir", run, "--fresh"])
    assert refused.exit_code == 2
    assert "--force" in refused.output and "Error:" in refused.output
    assert _index(run)["latest"]["step"] == 6  # untouched
    assert CliRunner().invoke(main, ["train", *_sets(TINY), "--run-dir", run, "--force"]).exit_code == 2

    # --fresh --force starts over
    fresh = CliRunner().invoke(main, ["train", *_sets(TINY + ["train.epochs=1"]), "--run-dir", run,
                                      "--fresh", "--force"])
    assert fresh.exit_code == 0, fresh.output
    assert "from scratch" in fresh.output
    assert _index(run)["latest"]["step"] == 3
    assert [r["step"] for r in _jsonl(run, "train")] == [1, 2, 3]


def test_resume_with_another_model_is_refused(tmp_path):
    from mobilenet_embed.train import train

    run = str(tmp_path / "run")
    train(_cfg("train.epochs=1", "data.val_identities=0"), run_dir=run, stream=io.StringIO())
    with pytest.raises(UserError, match="model.alpha"):
        train(_cfg("train.epochs=2", "model.alpha=0.5"), run_dir=run, stream=io.StringIO())


class _NanLoss:
    """A loss that is NaN: stands in for a diverged run."""

    def call(self, labels, embeddings):
        import tensorflow as tf

        return tf.reduce_mean(embeddings) * float("nan")


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from mobilenet_embed import losses
    from mobilenet_embed.train import TrainingDiverged, train

    run = str(tmp_path / "run")
    cfg = _cfg("train.epochs=1", "train.steps_per_epoch=4", "data.val_identities=0")
    train(cfg, run_dir=run, stream=io.StringIO())
    assert _index(run)["latest"]["step"] == 4
    before = _latest_weights(run, cfg)

    monkeypatch.setattr(losses, "loss_from_config", lambda *a, **k: _NanLoss())
    with pytest.raises(TrainingDiverged) as info:
        train(_cfg("train.epochs=2", "train.steps_per_epoch=4", "data.val_identities=0"), run_dir=run,
              stream=io.StringIO())
    message = str(info.value)
    assert "step 5" in message and "learning_rate" in message and "step 4" in message
    assert isinstance(info.value, UserError)  # the CLI prints it as `Error: ...`, exit code 2
    assert _index(run)["latest"]["step"] == 4
    for a, b in zip(_latest_weights(run, cfg), before):
        np.testing.assert_array_equal(a, b)
    assert not os.path.exists(os.path.join(run, "checkpoints", "ckpt-00000005"))

    result = CliRunner().invoke(main, ["train", *_sets(TINY + ["train.epochs=2", "train.steps_per_epoch=4",
                                                                "data.val_identities=0"]), "--run-dir", run])
    assert result.exit_code == 2
    assert "Error: step 5: the loss is nan" in result.output


def _cli_process(args, log_path):
    code = "from mobilenet_embed.cli import run; run()"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    log = open(log_path, "w", encoding="utf-8")
    return subprocess.Popen([sys.executable, "-c", code, "train", *args], stdout=log, stderr=subprocess.STDOUT,
                            env=env, text=True), log


def _wait_for_step(log_path, proc, step, timeout=180.0):
    """Wait until the plain log shows `step` (or more); returns the step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, encoding="utf-8") as fh:
            seen = [int(m.group(1)) for m in re.finditer(r"^step (\d+)/", fh.read(), re.M)]
        if seen and seen[-1] >= step:
            return seen[-1]
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with open(log_path, encoding="utf-8") as fh:
        output = fh.read()
    proc.kill()
    pytest.fail(f"training did not reach step {step}:\n{output[-3000:]}")


@pytest.mark.slow
def test_sigint_then_sigkill_then_resume_reaches_the_same_final_step(tmp_path):
    from mobilenet_embed.train import train

    total = 30
    overrides = TINY + ["train.epochs=1", f"train.steps_per_epoch={total}", "train.checkpoint_every_steps=3",
                        "train.keep_checkpoints=3", "data.val_identities=0"]
    run = str(tmp_path / "run")
    args = [*_sets(overrides), "--run-dir", run]

    # 1. Ctrl-C: a checkpoint at the step reached, exit code 130
    proc, log = _cli_process(args, tmp_path / "first.log")
    _wait_for_step(tmp_path / "first.log", proc, 4)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    log.close()
    output = (tmp_path / "first.log").read_text()
    stopped = int(re.search(r"SIGINT: stopped at step (\d+); checkpoint written", output).group(1))
    assert stopped >= 4
    assert _index(run)["latest"]["step"] == stopped

    # 2. SIGKILL at whatever moment, after a few more checkpoints were due
    proc, log = _cli_process(args, tmp_path / "second.log")
    _wait_for_step(tmp_path / "second.log", proc, stopped + 7)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    log.close()
    assert f"resuming {run} from step {stopped}" in (tmp_path / "second.log").read_text()
    killed_at = _index(run)["latest"]["step"]
    assert stopped < killed_at < total

    # 3. resume to the end: same final step as an uninterrupted run, optimizer state restored
    result = train(load_config(None, overrides), run_dir=run, stream=io.StringIO())
    assert result.resumed_from == killed_at
    assert result.steps == total and result.steps_this_run == total - killed_at
    assert _index(run)["latest"]["step"] == total
    # the optimizer's own step counter went on from the checkpoint: it counts every step once
    assert int(_checkpoint_value(run, "optimizer/_iterations")) == total
    # the Adam moments were restored too, not rebuilt from zeros (which the counter alone cannot show)
    assert np.any(_checkpoint_value(run, "optimizer/_variables/1/") != 0)
    steps = [r["step"] for r in _jsonl(run, "train")]
    assert steps == list(range(1, total + 1))  # every logging step exactly once
    assert not glob.glob(os.path.join(run, "checkpoints", "ckpt-tmp-*"))


def test_optimizer_state_is_restored_exactly(tmp_path):
    """Restoring a checkpoint brings back the optimizer's moments and counter, not fresh ones."""
    import tensorflow as tf

    from mobilenet_embed.train import train

    run = str(tmp_path / "run")
    cfg = _cfg("train.epochs=1", "train.steps_per_epoch=2", "data.val_identities=0")
    first = train(cfg, run_dir=run, stream=io.StringIO())
    prefix = os.path.join(run, "checkpoints", _index(run)["latest"]["name"], "ckpt")
    saved = {n: tf.train.load_checkpoint(prefix).get_tensor(n) for n, _ in tf.train.list_variables(prefix)
             if n.startswith("optimizer/")}
    assert first.steps == 2

    from mobilenet_embed import checkpoints as ck
    from mobilenet_embed.model import build_model_from_config
    from mobilenet_embed.optim import build_optimizer

    model = build_model_from_config(cfg.model, cfg.data.image_size)
    opt = build_optimizer(cfg.train, model)
    opt.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)
    manager = ck.CheckpointManager(os.path.join(run, "checkpoints"),
                                   tf.train.Checkpoint(model=model, optimizer=opt, step=step))
    manager.restore(manager.latest())
    assert int(step.numpy()) == 2 and int(opt.iterations.numpy()) == 2
    restored = {v.path: v.numpy() for v in opt.variables}
    moments = [k for k in saved if k.startswith("optimizer/_variables/")]
    assert moments and any(np.any(saved[k] != 0) for k in moments)
    total_saved = sum(float(np.abs(saved[k]).sum()) for k in moments)
    total_restored = sum(float(np.abs(v).sum()) for k, v in restored.items() if "iteration" not in k)
    assert total_restored == pytest.approx(total_saved, rel=1e-6)


def test_killed_checkpoint_write_leaves_latest_intact(tmp_path):
    """A save that dies before its index update (the kill window) leaves the previous checkpoint."""
    import tensorflow as tf

    from mobilenet_embed import checkpoints as ck

    var = tf.Variable([1.0, 2.0])
    directory = str(tmp_path / "checkpoints")
    manager = ck.CheckpointManager(directory, tf.train.Checkpoint(v=var), keep=2)
    manager.save(1, {"best_accuracy": 0.5})
    var.assign([3.0, 4.0])
    # simulate a kill after the temporary write and after the rename, before the index update
    tf.train.Checkpoint(v=var).write(os.path.join(directory, "ckpt-tmp-2-999", "ckpt"))
    tf.train.Checkpoint(v=var).write(os.path.join(directory, "ckpt-00000002", "ckpt"))
    with open(os.path.join(directory, "checkpoint.json.tmp-999"), "w") as fh:
        fh.write("{half")
    again = ck.CheckpointManager(directory, tf.train.Checkpoint(v=var), keep=2)
    latest = again.latest()
    assert latest.step == 1 and latest.state == {"best_accuracy": 0.5}
    assert sorted(os.listdir(directory)) == ["checkpoint.json", "ckpt-00000001"]
    again.restore(latest)
    np.testing.assert_array_equal(var.numpy(), [1.0, 2.0])


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_with_float32_head(tmp_path, precision):
    import keras

    from mobilenet_embed.train import train

    result = train(_cfg("train.epochs=1", "train.steps_per_epoch=2", "data.val_identities=0",
                        f"train.precision={precision}", "train.clip_norm=1.0"),
                   run_dir=str(tmp_path / "run"), stream=io.StringIO())
    assert result.steps == 2
    model = result.model
    assert model.get_layer("conv1").compute_dtype == precision.split("_")[1]
    assert model.get_layer("embedding").compute_dtype == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    assert all(np.isfinite(r["loss"]) for r in _jsonl(result.run_dir, "train"))


def test_terminal_progress_bar(tmp_path):
    from mobilenet_embed.runlog import RunLog

    stream = io.StringIO()
    log = RunLog(str(tmp_path), total_steps=4, steps_per_epoch=2, start_step=0, log_every=1, stream=stream,
                 tty=True)
    for step in range(1, 5):
        log.advance(step, 0.01)
        log.log_train(step, {"loss": 0.25, "active_fraction": 0.5, "images_per_second": 100.0})
    log.close()
    text = stream.getvalue()
    assert "epoch 1/2" in text and "epoch 2/2" in text
    assert "loss=0.2500" in text and "active=0.500" in text and "img/s=100.0" in text
    assert not re.search(r"^step \d", text, re.M)  # no plain lines on a terminal


def test_collapse_is_warned_once(tmp_path):
    from mobilenet_embed.train import train

    out = io.StringIO()
    train(_cfg("train.epochs=1", "train.steps_per_epoch=4", "data.val_identities=0",
               "train.collapse_distance=100.0", "train.collapse_patience=2"),
          run_dir=str(tmp_path / "run"), stream=out)
    assert out.getvalue().count("warning: the embedding looks collapsed") == 1


@pytest.mark.slow
def test_learning_happens_on_held_out_synthetic_identities(tmp_path):
    """A short quick start: 300 steps at 32 px; held-out identities are told apart well above chance."""
    from mobilenet_embed.train import train

    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "quickstart.yaml"),
                      ["data.image_size=32", "data.synthetic_identities=60", "data.synthetic_images_per_identity=10",
                       "data.val_identities=0.25", "model.embedding_size=32", "model.dropout_keep_prob=1.0",
                       "train.identities_per_batch=8", "train.epochs=1", "train.steps_per_epoch=300",
                       "train.learning_rate=0.003", "train.warmup_epochs=0.1", "train.log_every_steps=50",
                       "train.val_pairs=300", "eval.folds=5"])
    result = train(cfg, run_dir=str(tmp_path / "run"), stream=io.StringIO())
    logged = _jsonl(result.run_dir, "train")
    assert logged[-1]["mean_pos_dist"] < 0.7 * logged[0]["mean_pos_dist"]  # positives pulled together
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert result.final_validation["accuracy"] >= 0.65  # chance: 0.5 (measured: 0.76)
    assert result.final_validation["auc"] >= 0.7


def test_folder_source_with_eval_pairs_validation(tmp_path):
    """data.source=folder trains, and eval.pairs (an LFW pairs file) is what validation scores."""
    from PIL import Image

    from mobilenet_embed.train import train

    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    names = [f"Person_{i}" for i in range(6)]
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        base = rng.integers(0, 255, size=(40, 40, 3))
        for n in range(1, 5):
            noisy = np.clip(base + rng.normal(0, 20, size=base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / name / f"{name}_{n:04d}.png")
    same = [f"{names[i]}\t1\t{2 + i % 3}" for i in range(4)]
    diff = [f"{names[i]}\t1\t{names[i + 1]}\t2" for i in range(4)]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\n".join(["4", *same, *diff]) + "\n")

    cfg = load_config(None, TINY + ["data.source=folder", f"data.path={root}", "data.check_cache=null",
                                    f"eval.pairs={pairs}", "train.epochs=1"])
    out = io.StringIO()
    result = train(cfg, run_dir=str(tmp_path / "run"), stream=out)
    assert result.steps == 3
    assert f"validation: {pairs} (8 pairs)" in out.getvalue()
    assert [r["pairs"] for r in _jsonl(result.run_dir, "validation")] == [8]
    assert 0.0 <= result.final_validation["accuracy"] <= 1.0


def _result(**kw):
    from mobilenet_embed.train import TrainResult

    base = dict(run_dir="r", steps=1, steps_this_run=1, seconds=1.0, images_per_second=1.0, final_validation=None,
                best_validation=None, best_step=None, resumed_from=None, interrupted=True, paths={})
    return TrainResult(**{**base, **kw})


def test_interrupted_before_validation_does_not_say_validation_is_unset():
    lines = _result(val_source="3 held-out identities (20 pairs)").summary_lines()
    assert "no validation yet (3 held-out identities (20 pairs); the run stopped before the first one)" in lines
    assert not any("set eval.pairs" in line for line in lines)
    assert "no validation (set eval.pairs or data.val_identities > 0)" in _result().summary_lines()


@pytest.mark.parametrize("per_batch, advice", [
    (2, "raise data.val_identities to at least 0.5 (2 of 4 identities)"),
    (3, "the 4 identities are too few to hold two out beside train.identities_per_batch (3): set "
        "data.val_identities to 0 or give eval.pairs"),
])
def test_one_held_out_identity_gets_the_right_advice(per_batch, advice):
    from mobilenet_embed.data import build_index
    from mobilenet_embed.train import _validation_pairs

    cfg = _cfg("data.synthetic_identities=4", "data.val_identities=0.1", f"train.identities_per_batch={per_batch}")
    index, _ = build_index(cfg.data, check=True)
    with pytest.raises(UserError) as info:
        _validation_pairs(cfg, index, print)
    assert str(info.value) == ("data.val_identities: 1 held-out identity gives no different pairs for "
                               f"validation; {advice}")


@pytest.mark.parametrize("text, what", [
    ("train: [unclosed\n", ":2: not valid YAML: expected ',' or ']'"),
    ("train:\n  epochs: 2\n  epochs: 3\n", ":3: not valid YAML: duplicate key 'epochs' (first given on line 2)"),
    ("- a list\n- of things\n", ": the run's saved config is a list, not a mapping of settings"),
    ("", ": the run's saved config is empty, not a mapping of settings"),
])
def test_corrupt_run_config_is_refused_before_anything_is_written(tmp_path, text, what):
    """A resumable run whose config.yaml cannot be read is not overwritten (it guards the resume);
    bad YAML and duplicate keys read as in a --config file (`config.read_yaml_file`)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    saved = run / "config.yaml"
    saved.write_text(text)
    result = CliRunner().invoke(main, ["train", *_sets(TINY), "--run-dir", str(run)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: {saved}{what}"), errors
    assert "the run's saved config" in errors[0] and "--fresh --force" in errors[0]
    assert saved.read_text() == text  # untouched
    assert sorted(os.listdir(run)) == ["checkpoints", "config.yaml"] and not os.listdir(run / "checkpoints")


def _strings(data):
    if isinstance(data, dict):
        return [s for v in data.values() for s in _strings(v)]
    if isinstance(data, list):
        return [s for v in data for s in _strings(v)]
    return [data] if isinstance(data, str) else []


def test_summary_holds_relative_paths_and_a_moved_run_resumes(tmp_path):
    from mobilenet_embed.checkpoints import load_checkpoint_model
    from mobilenet_embed.train import train

    first = tmp_path / "first"
    result = train(_cfg("train.epochs=1"), run_dir=str(first), stream=io.StringIO())
    assert os.path.isabs(result.paths["model"])  # the returned result keeps usable absolute paths
    summary = json.loads((first / "summary.json").read_text())
    assert summary["run_dir"] == "." and summary["paths"]["model"] == "model.keras"
    assert summary["paths"]["best_checkpoint"].startswith("checkpoints" + os.sep)
    assert not [s for s in _strings(summary) if os.path.isabs(s) or str(tmp_path) in s]

    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    os.rename(first, moved)
    for key, rel in summary["paths"].items():
        assert os.path.exists(moved / rel), key  # every recorded path resolves in the new place
    model, _ = load_checkpoint_model(str(moved))  # what eval and export load
    assert tuple(model(np.zeros((1, 32, 32, 3), np.float32)).shape) == (1, 16)
    again = train(_cfg("train.epochs=2"), run_dir=str(moved), stream=io.StringIO())
    assert again.resumed_from == 3 and again.steps == 6
    summary = json.loads((moved / "summary.json").read_text())
    assert not [s for s in _strings(summary) if os.path.isabs(s)]


def test_sigterm_before_the_first_validation_does_not_say_validation_is_unset(tmp_path, monkeypatch):
    """SIGTERM at step 1 of a run with held-out validation: the summary says validation is set up."""
    from mobilenet_embed.train import train
    from mobilenet_embed.training.step import TrainStep

    original = TrainStep.__call__

    def step_then_sigterm(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(TrainStep, "__call__", step_then_sigterm)
    out = io.StringIO()
    result = train(_cfg("train.epochs=1"), run_dir=str(tmp_path / "run"), stream=out)
    assert result.interrupted and result.steps == 1
    assert "SIGTERM: stopped at step 1; checkpoint written" in out.getvalue()
    lines = result.summary_lines()
    assert not any("set eval.pairs" in line for line in lines), lines
    assert any(line.startswith("no validation yet (3 held-out identities") for line in lines), lines
