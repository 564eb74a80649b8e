"""A run's saved config.yaml is itself a valid `--config` file for every command."""

from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner

from mobilenet_embed.cli import main

TINY = [
    "data.source=folder", "data.image_size=32", "data.val_identities=0.25", "data.check_cache=null",
    "model.alpha=0.25", "model.embedding_size=16",
    "train.identities_per_batch=4", "train.images_per_identity=2", "train.epochs=1",
    "train.steps_per_epoch=2", "train.log_every_steps=1", "train.val_pairs=20",
    "eval.folds=2", "eval.batch_size=16", "export.parity_samples=4",
]


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


def _invoke(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A folder of 8 identities x 4 PNGs and a two-step run trained on it."""
    from PIL import Image

    base = tmp_path_factory.mktemp("runcfg")
    rng = np.random.default_rng(0)
    root = base / "faces"
    for i in range(8):
        (root / f"id{i}").mkdir(parents=True)
        for n in range(4):
            Image.fromarray(rng.integers(0, 255, size=(36, 36, 3), dtype=np.uint8)).save(
                root / f"id{i}" / f"{n}.png")
    run_dir = base / "run"
    _invoke(["train", *_sets(TINY + [f"data.path={root}"]), "--run-dir", str(run_dir)])
    config = run_dir / "config.yaml"
    assert "versions:" in config.read_text()
    return {"base": base, "root": str(root), "run_dir": str(run_dir), "config": str(config)}


def test_config_show_reads_a_runs_config(run):
    shown = _invoke(["config", "show", "--config", run["config"]])
    assert "versions" not in shown  # recorded, not a setting
    assert "alpha: 0.25" in shown and f"path: {run['root']}" in shown


def test_train_resumes_from_a_runs_config(run):
    out = _invoke(["train", "--config", run["config"]])
    assert "nothing to train" in out


def test_versions_is_not_a_settable_key():
    result = CliRunner().invoke(main, ["config", "show", "--set", "versions.keras=1"])
    assert result.exit_code == 2 and "versions: unknown key" in result.output


def test_eval_with_a_runs_config(run):
    out_dir = run["base"] / "eval"
    _invoke(["eval", "--config", run["config"], "--checkpoint", run["run_dir"], "--data", run["root"],
             "--make-pairs", "4", "--out", str(out_dir)])
    assert (out_dir / "metrics.json").is_file()


def test_export_with_a_runs_config(run):
    out_dir = run["base"] / "exported"
    _invoke(["export", "--config", run["config"], "--checkpoint", run["run_dir"], "--out", str(out_dir),
             "--latency-runs", "1"])
    assert (out_dir / "export_report.json").is_file()


def test_export_embeddings_with_a_runs_config(run):
    out_dir = run["base"] / "embeddings"
    _invoke(["export", "embeddings", "--config", run["config"], "--checkpoint", run["run_dir"],
             "--data", run["root"], "--out", str(out_dir), "--no-progress"])
    assert os.path.isfile(out_dir / "embeddings.npy")
