"""Typed config: defaults, YAML, --set overrides, and the one-line errors with exit code 2."""

import pytest
import yaml
from click.testing import CliRunner

from mobilenet_embed.cli import main
from mobilenet_embed.config import Config, config_from_dict, config_to_dict, dump_yaml, load_config, reference_rows
from mobilenet_embed.errors import UserError


def run_cli(*args):
    return CliRunner().invoke(main, list(args))


def write(tmp_path, text, name="x.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_match_the_documented_sections():
    cfg = load_config()
    assert cfg.seed == 0 and cfg.run_dir == "runs/quickstart"
    assert (cfg.data.source, cfg.data.path, cfg.data.image_size, cfg.data.min_images_per_identity) == ("synthetic", None, 64, 2)
    assert (cfg.model.alpha, cfg.model.depth_multiplier, cfg.model.embedding_size, cfg.model.dropout_keep_prob) == (1.0, 1, 128, 0.4)
    assert (cfg.loss.name, cfg.loss.triplet_semihard.margin, cfg.loss.triplet_semihard.distance) == ("triplet_semihard", 0.2, "squared-L2")
    assert (cfg.train.identities_per_batch, cfg.train.images_per_identity, cfg.train.epochs) == (16, 4, 1)
    assert (cfg.eval.pairs, cfg.eval.folds, cfg.eval.far_target) == (None, 10, 0.001)
    assert cfg.export.formats == ["saved_model"]


def test_yaml_then_overrides_in_order(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 2\n  learning_rate: 1\nmodel:\n  alpha: 0.5\n")
    cfg = load_config(path, ["train.epochs=3", "export.formats=[saved_model,tflite_int8]", "train.epochs=4"])
    assert cfg.train.epochs == 4
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.model.alpha == 0.5
    assert cfg.export.formats == ["saved_model", "tflite_int8"]


def test_dump_and_reload_round_trip():
    cfg = load_config(None, ["model.alpha=0.25", "eval.pairs_folds=[10]"])
    again = config_from_dict(yaml.safe_load(dump_yaml(cfg, extra={"versions": {"tensorflow": "x"}})))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_every_key_is_documented():
    rows = reference_rows()
    assert len(rows) == len({r[0] for r in rows})
    assert all(doc for *_, doc in rows), [r[0] for r in rows if not r[3]]


@pytest.mark.parametrize("yaml_text, message", [
    ("train:\n  identities_per_batch: many\n",
     "x.yaml: train.identities_per_batch: expected an integer >= 2, received 'many'"),
    ("train:\n  bogus: 1\n", "x.yaml: train.bogus: unknown key"),
    ("trian:\n  epochs: 1\n", "x.yaml: trian: unknown key"),
    ("model:\n  alpha: 0\n", "x.yaml: model.alpha: expected a number > 0, received 0"),
    ("data:\n  image_size: 16\n", "x.yaml: data.image_size: expected an integer >= 32, received 16"),
    ("loss:\n  triplet_semihard:\n    margin: -0.1\n", "x.yaml: loss.triplet_semihard.margin: expected a number >= 0, received -0.1"),
    ("loss:\n  margin: 0.3\n", "x.yaml: loss.margin: moved to loss.triplet_semihard.margin"),
    ("loss:\n  name: contrastive\n", "x.yaml: loss.name: expected one of triplet_semihard, triplet_hard, triplet_batch_all, softmax, cosface, arcface, subcenter_arcface, received 'contrastive'"),
    ("train:\n  jit_compile: 1\n", "x.yaml: train.jit_compile: expected true or false, received 1"),
    ("export:\n  formats: [onnx]\n", "x.yaml: export.formats: expected a list of saved_model"),
    ("data:\n  source: folder\n", "x.yaml: data.path: required when data.source is 'folder'"),
    ("train: [\n", "x.yaml:2: not valid YAML"),
    ("- 1\n- 2\n", "x.yaml: expected a mapping of sections"),
    ("train:\n  learning_rate: .nan\n", "x.yaml: train.learning_rate: expected a number > 0 (not NaN or infinite), received nan"),
    ("train:\n  learning_rate: .inf\n", "x.yaml: train.learning_rate: expected a number > 0 (not NaN or infinite), received inf"),
    ("loss:\n  triplet_semihard:\n    margin: -.inf\n", "x.yaml: loss.triplet_semihard.margin: expected a number >= 0 (not NaN or infinite), received -inf"),
    ("train:\n  lr_schedule: piecewise\n  lr_piecewise: [[0, .nan]]\n",
     "x.yaml: train.lr_piecewise: expected a list (not NaN or infinite), received [[0, nan]]"),
    ("train:\n  steps_per_epoch: 1.0e+23\n", "x.yaml: train.steps_per_epoch: expected an integer >= 1, received 1e+23"),
    ("train:\n  steps_per_epoch: 100000000000000000000000\n",
     "x.yaml: train.steps_per_epoch: expected an integer >= 1 and at most 2,147,483,647, received 100000000000000000000000"),
    ("train:\n  epochs: 2\nmodel:\n  alpha: 0.5\ntrain:\n  epochs: 3\n",
     "x.yaml:5: not valid YAML: duplicate key 'train' (first given on line 1)"),
    ("train:\n  epochs: 2\n  epochs: 3\n", "x.yaml:3: not valid YAML: duplicate key 'epochs' (first given on line 2)"),
    ("data:\n  source: folder\n", "data.path: required when data.source is 'folder' (set it in the file or give --set data.path=...)"),
    ("data:\n  augment_min_crop: 0.9\n  augment_max_crop: 0.85\n",
     "x.yaml: data.augment_max_crop: expected >= data.augment_min_crop (0.9), received 0.85"),
    ("data:\n  augment: false\n  augment_shift: 0.1\n",
     "x.yaml: data.augment_shift: not used (data.augment is false), received 0.1"),
])
def test_bad_config_file_is_one_line_error_exit_2(tmp_path, yaml_text, message):
    path = write(tmp_path, yaml_text)
    result = run_cli("config", "show", "--config", path)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert message in lines[0]
    assert path in lines[0]


def test_missing_config_file(tmp_path):
    result = run_cli("config", "show", "--config", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: {tmp_path / 'nope.yaml'}: config file not found"


@pytest.mark.parametrize("override, message", [
    ("train.epochs=three", "Error: --set: train.epochs: expected an integer >= 1, received 'three'"),
    ("train.epochs", "Error: --set train.epochs: expected key=value"),
    ("model.width=2", "Error: --set: model.width: unknown key"),
    ("=3", "Error: --set =3: expected KEY=VALUE with a non-empty key"),
    ("train.learning_rate=.nan", "Error: --set: train.learning_rate: expected a number > 0 (not NaN or infinite), received nan"),
    ("data.source=folder", "Error: data.path: required when data.source is 'folder' (give --config FILE or --set data.path=...)"),
])
def test_bad_override(override, message):
    result = run_cli("config", "show", "--set", override)
    assert result.exit_code == 2
    assert result.output.strip().startswith(message)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    text = "train:\n  <<: {epochs: 2, steps_per_epoch: 5}\n  epochs: 3\n"
    cfg = load_config(write(tmp_path, text, "merge.yaml"))
    assert (cfg.train.epochs, cfg.train.steps_per_epoch) == (3, 5)


def test_config_show_prints_resolved_yaml():
    result = run_cli("config", "show", "--set", "train.epochs=3", "--set", "export.formats=[saved_model,tflite_int8]")
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["train"]["epochs"] == 3
    assert shown["export"]["formats"] == ["saved_model", "tflite_int8"]
    assert config_to_dict(config_from_dict(shown)) == config_to_dict(load_config(None, ["train.epochs=3", "export.formats=[saved_model,tflite_int8]"]))


def test_shipped_configs_are_valid():
    import glob
    paths = glob.glob("configs/*.yaml")
    assert paths
    for path in paths:
        assert isinstance(load_config(path), Config)


def test_user_error_is_the_only_exit_2_path():
    with pytest.raises(UserError):
        load_config(None, ["seed=-1"])


def test_readme_documents_every_key():
    with open("README.md", encoding="utf-8") as fh:
        readme = fh.read()
    missing = [key for key, *_ in reference_rows() if f"`{key}`" not in readme]
    assert not missing, f"README's config reference lacks {missing}: run scripts/config_reference.py"
