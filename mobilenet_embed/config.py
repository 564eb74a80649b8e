"""Typed experiment configuration: defaults in code, a YAML file on top, `--set` overrides last.

Every key is a dataclass field with a type and, where it matters, a range or a set of choices.
`load_config` refuses an unknown key, a wrong type or an out-of-range value before any work
starts, with one line naming the file, the dotted key and what was received.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import yaml

from mobilenet_embed.align.templates import TEMPLATE_NAMES
from mobilenet_embed.errors import UserError


#: every format `mbembed export` can write (`mobilenet_embed.export_formats`)
EXPORT_FORMATS = ("saved_model", "tflite_float32", "tflite_float16", "tflite_int8")


def _spec(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
          low: float | None = None, high: float | None = None, low_open: bool = False,
          high_open: bool = False, choices: tuple | None = None, doc: str = "") -> Any:
    """A dataclass field with its validation rule and one-line documentation attached."""
    meta = {"low": low, "high": high, "low_open": low_open, "high_open": high_open,
            "choices": choices, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    source: str = _spec("synthetic", choices=("synthetic", "folder", "tfrecord"),
                        doc="where images come from")
    path: Optional[str] = _spec(None, doc="identity folder (folder) or shard glob (tfrecord)")
    image_size: int = _spec(64, low=32, doc="square input size in pixels")
    crop_fraction: float = _spec(1.0, low=0.0, high=1.0, low_open=True,
                                 doc="central crop kept before resizing (LFW: about 0.6)")
    augment: bool = _spec(True, doc="random crop, flip and colour jitter during training")
    min_images_per_identity: int = _spec(2, low=1, doc="identities with fewer images are not trained on")
    max_bad_fraction: float = _spec(0.01, low=0.0, high=1.0,
                                    doc="refuse to train when more images than this are unreadable")
    identities_file: Optional[str] = _spec(None, doc="train only on identities listed here (one per line, or LFW people.txt)")
    exclude_identities_file: Optional[str] = _spec(None, doc="never train on identities listed here")
    identities_folds: Optional[list] = _spec(None, doc="with an LFW people.txt as identities_file: the folds to use, e.g. [1, 2, ..., 9]")
    val_identities: float = _spec(0.1, low=0.0, high=1.0, high_open=True,
                                  doc="fraction of identities held out for validation pairs")
    synthetic_identities: int = _spec(200, low=2, doc="synthetic source: number of identities")
    synthetic_images_per_identity: int = _spec(20, low=2, doc="synthetic source: images per identity")
    shuffle_buffer: int = _spec(1024, low=0, doc="tfrecord source: shuffle buffer of records")
    augment_min_crop: float = _spec(0.8, low=0.0, high=1.0, low_open=True,
                                    doc="augment: random crop side, as a fraction of the central crop (min)")
    augment_max_crop: float = _spec(1.0, low=0.0, low_open=True,
                                    doc="augment: random crop side, as a fraction of the central crop (max); above 1 a looser framing, up to the whole image")
    augment_shift: float = _spec(0.0, low=0.0, doc="augment: the crop may move this fraction of the central crop's side past each of its edges (an off-centre face)")
    augment_brightness: float = _spec(0.1, low=0.0, doc="augment: brightness shift, +- this fraction of the range")
    augment_contrast: float = _spec(0.2, low=0.0, high=1.0, doc="augment: contrast factor 1 +- this")
    check_cache: Optional[str] = _spec("~/.cache/mbembed", doc="folder remembering decode checks by (path relative to the data folder, size, mtime); may be shared storage beside the data; null: check every file every time")
    max_pixels: int = _spec(40_000_000, low=1, doc="images with more pixels (width x height, read from the file header) are unreadable: counted and listed by the check, never decoded")
    synthetic_seed: int = _spec(0, low=0, doc="synthetic source: seed of the identities and their images")
    synthetic_nuisance: float = _spec(1.0, low=0.0, doc="synthetic source: nuisance strength (shift, scale, rotation, light, noise); 0: none")
    align_template: Optional[str] = _spec(None, choices=TEMPLATE_NAMES, doc="the data are face crops aligned to this landmark template by `mbembed align` (eval / export --align align raw photos the same way); null: not aligned")
    align_size: int = _spec(112, low=16, doc="side in pixels of the aligned crops (data.align_template)")
    align_select: str = _spec("center", choices=("center", "largest"), doc="aligning: the face kept when there are several (nearest the image centre, or largest)")
    sampling: str = _spec("pk", choices=("pk", "uniform"),
                          doc="training batches: pk (P identities x K images, for triplets) or uniform (P*K images drawn over all images)")


@dataclass
class ModelConfig:
    alpha: float = _spec(1.0, low=0.0, low_open=True, doc="MobileNet width multiplier")
    depth_multiplier: int = _spec(1, low=1, doc="depthwise channel multiplier")
    embedding_size: int = _spec(128, low=2, doc="dimensions of the embedding")
    dropout_keep_prob: float = _spec(0.4, low=0.0, high=1.0, low_open=True,
                                     doc="keep probability of the dropout before the embedding layer")
    backbone_weights: Optional[str] = _spec(
        None, doc="weights file of keras.applications.MobileNet(include_top=False) to start from")


# ---- loss: one registry of choices, each with its own options nested under its name

#: distances the triplet losses mine with, and those verification / search compare by
LOSS_DISTANCES = ("L2", "squared-L2", "angular")
EVAL_DISTANCES = ("squared-L2", "cosine")


@dataclass
class TripletSemiHardOptions:
    margin: float = _spec(0.2, low=0.0, doc="triplet margin")
    distance: str = _spec("squared-L2", choices=LOSS_DISTANCES, doc="distance the loss uses")


@dataclass
class TripletHardOptions:
    margin: float = _spec(0.2, low=0.0, doc="triplet margin (unused when soft)")
    distance: str = _spec("squared-L2", choices=LOSS_DISTANCES, doc="distance the loss uses")
    soft: bool = _spec(False, doc="softplus instead of the margin hinge")


@dataclass
class TripletBatchAllOptions(TripletSemiHardOptions):
    """Batch-all triplets take the semi-hard options (margin, distance)."""


@dataclass
class SoftmaxOptions:
    scale: float = _spec(64.0, low=0.0, low_open=True, doc="scale s of the cosine logits (normalised softmax)")


@dataclass
class CosFaceOptions:
    margin: float = _spec(0.4, low=0.0, doc="additive cosine margin m: s (cos - m) for the true class")
    scale: float = _spec(64.0, low=0.0, low_open=True, doc="scale s of the cosine logits")


@dataclass
class ArcFaceOptions:
    margin: float = _spec(0.5, low=0.0, high=3.14159, doc="additive angular margin m: s cos(theta + m) for the true class")
    scale: float = _spec(64.0, low=0.0, low_open=True, doc="scale s of the cosine logits")
    easy_margin: bool = _spec(False, doc="margin only where cos > 0; else (default) cos - m sin(m) where theta + m > pi")


@dataclass
class SubcenterArcFaceOptions:
    margin: float = _spec(0.5, low=0.0, high=3.14159, doc="additive angular margin m")
    scale: float = _spec(64.0, low=0.0, low_open=True, doc="scale s of the cosine logits")
    easy_margin: bool = _spec(False, doc="as loss.arcface.easy_margin")
    subcenters: int = _spec(3, low=1, doc="k sub-centres per identity; the logit is the max over them")


@dataclass(frozen=True)
class LossChoice:
    """One `loss.name`: its options dataclass, its kind, where it is implemented, one line of doc."""

    options: type
    kind: str  # "triplet" (in-batch mining) or "margin" (a head with class centres)
    implementation: str  # "module:attribute", imported when the loss is built (keeps config TF-free)
    doc: str


LOSS_REGISTRY: dict[str, LossChoice] = {
    "triplet_semihard": LossChoice(TripletSemiHardOptions, "triplet", "mobilenet_embed.losses:TripletSemiHardLoss",
                                   "semi-hard triplets (FaceNet)"),
    "triplet_hard": LossChoice(TripletHardOptions, "triplet", "mobilenet_embed.losses:TripletHardLoss",
                               "batch-hard triplets"),
    "triplet_batch_all": LossChoice(TripletBatchAllOptions, "triplet", "mobilenet_embed.losses:TripletBatchAllLoss",
                                    "batch-all triplets"),
    "softmax": LossChoice(SoftmaxOptions, "margin", "mobilenet_embed.heads:SoftmaxHead",
                          "normalised softmax over class centres"),
    "cosface": LossChoice(CosFaceOptions, "margin", "mobilenet_embed.heads:CosFaceHead", "additive cosine margin"),
    "arcface": LossChoice(ArcFaceOptions, "margin", "mobilenet_embed.heads:ArcFaceHead", "additive angular margin"),
    "subcenter_arcface": LossChoice(SubcenterArcFaceOptions, "margin", "mobilenet_embed.heads:SubcenterArcFaceHead",
                                    "ArcFace with k sub-centres per identity (noisy labels)"),
}
"""``loss.name`` -> its choice. The config's `loss` section, its choices and its nested option
sections are all derived from this one table; `mobilenet_embed.heads` and `losses` implement them."""

TRIPLET_LOSSES = tuple(n for n, c in LOSS_REGISTRY.items() if c.kind == "triplet")
MARGIN_HEADS = tuple(n for n, c in LOSS_REGISTRY.items() if c.kind == "margin")

# Flat keys of mbembed <= 0.1 (before the per-loss sections): where each one went.
_FLAT_LOSS_KEYS = ("margin", "distance", "soft")


def _loss_moved_key(self, key: str, updates: dict) -> Optional[str]:
    """The new dotted key of an old flat `loss.<key>`, for the unknown-key error (None: not moved)."""
    if key not in _FLAT_LOSS_KEYS:
        return None
    name = updates.get("name", self.name)
    if name not in TRIPLET_LOSSES or key not in {f.name for f in dataclasses.fields(LOSS_REGISTRY[name].options)}:
        name = "triplet_hard" if key == "soft" else "triplet_semihard"
    return f"loss.{name}.{key}"


def migrate_flat_loss_keys(data: dict) -> dict:
    """A saved run config of mbembed <= 0.1 (flat ``loss.margin/distance/soft``) in the nested form.

    Used when reading a run directory's own ``config.yaml`` (written by mbembed: it carries a
    ``versions:`` block), also as ``--config``; a user's config file with flat keys gets the
    one-line "moved to" error instead.
    """
    loss = data.get("loss")
    if not isinstance(loss, dict) or not any(k in loss for k in _FLAT_LOSS_KEYS):
        return data
    loss = dict(loss)
    name = loss.get("name", "triplet_semihard")
    section = dict(loss.get(name) or {}) if name in TRIPLET_LOSSES else {}
    allowed = {f.name for f in dataclasses.fields(LOSS_REGISTRY[name].options)} if name in TRIPLET_LOSSES else set()
    for key in _FLAT_LOSS_KEYS:
        if key in loss:
            value = loss.pop(key)
            if key in allowed:
                section[key] = value
            elif key == "soft" and value:
                raise UserError(f"loss.soft: only applies to loss.name 'triplet_hard', received loss.name {name!r}")
    if name in TRIPLET_LOSSES:
        loss[name] = section
    return {**data, "loss": loss}


def _validate_loss(self, data_cfg: "DataConfig", source: str) -> None:
    """Rules across the loss keys: no option set for a loss that is not used, and what needs a head."""
    chosen = LOSS_REGISTRY[self.name]
    used = {self.name}
    if chosen.kind == "margin" and self.triplet_weight > 0:
        used.add(self.triplet_term)
    for name, choice in LOSS_REGISTRY.items():
        if name in used:
            continue
        options, defaults = getattr(self, name), choice.options()
        for f in dataclasses.fields(options):
            value = getattr(options, f.name)
            if value != getattr(defaults, f.name):
                why = (f"loss.name is {self.name!r}" if name != self.triplet_term or chosen.kind == "triplet"
                       else "loss.triplet_weight is 0")
                raise UserError(f"{source}: loss.{name}.{f.name}: not used ({why}), received {_describe(value)}")
    if chosen.kind == "triplet":
        for key, value, neutral in (("triplet_weight", self.triplet_weight, 0.0), ("sample_rate", self.sample_rate, 1.0),
                                    ("centre_lr_multiplier", self.centre_lr_multiplier, 1.0),
                                    ("margin_warmup_epochs", self.margin_warmup_epochs, 0.0),
                                    ("triplet_term", self.triplet_term, "triplet_semihard")):
            if value != neutral:
                raise UserError(f"{source}: loss.{key}: only applies to a margin head ({', '.join(MARGIN_HEADS)}); "
                                f"loss.name is {self.name!r}, received {_describe(value)}")
    elif self.margin_warmup_epochs and "margin" not in {f.name for f in dataclasses.fields(chosen.options)}:
        raise UserError(f"{source}: loss.margin_warmup_epochs: {self.name} has no margin to warm up, "
                        f"received {_describe(self.margin_warmup_epochs)}")
    if chosen.kind == "margin" and self.triplet_weight == 0 and self.triplet_term != "triplet_semihard":
        raise UserError(f"{source}: loss.triplet_term: not used (loss.triplet_weight is 0), "
                        f"received {_describe(self.triplet_term)}")
    if self.head_fade_epochs and (chosen.kind == "triplet" or self.triplet_weight == 0):
        why = f"loss.name is {self.name!r}" if chosen.kind == "triplet" else "loss.triplet_weight is 0"
        raise UserError(f"{source}: loss.head_fade_epochs: fades a margin head into its triplet term, so it needs "
                        f"a head and loss.triplet_weight > 0 ({why}), received {_describe(self.head_fade_epochs)}")
    if data_cfg.sampling != "pk" and (chosen.kind == "triplet" or self.triplet_weight > 0):
        raise UserError(f"{source}: data.sampling: triplet losses mine positives inside P x K batches, "
                        f"so they need 'pk', received {data_cfg.sampling!r}")


LossConfig = dataclasses.make_dataclass(
    "LossConfig",
    [("name", str, _spec("triplet_semihard", choices=tuple(LOSS_REGISTRY),
                         doc="a triplet loss (in-batch mining) or a margin head over class centres; its options: loss.<name>.*")),
     ("triplet_weight", float, _spec(0.0, low=0.0, doc="margin heads: weight of a triplet term on the same P x K batch (0: none)")),
     ("triplet_term", str, _spec("triplet_semihard", choices=TRIPLET_LOSSES,
                                 doc="margin heads with triplet_weight > 0: which triplet loss (its options: loss.<that name>.*)")),
     ("head_fade_epochs", list, _spec(factory=list, doc="margin heads with a triplet term: [start, end] epochs over which the head's weight falls linearly from 1 to 0, leaving the triplet term ([]: the head throughout)")),
     ("sample_rate", float, _spec(1.0, low=0.0, high=1.0, low_open=True,
                                  doc="margin heads (Partial FC): fraction of the class centres each step uses, positives always included")),
     ("margin_warmup_epochs", float, _spec(0.0, low=0.0,
                                          doc="margin heads: epochs over which the margin grows linearly from 0 (a plain normalised softmax) to its value (0: none)")),
     ("centre_lr_multiplier", float, _spec(1.0, low=0.0, low_open=True,
                                           doc="margin heads: the class centres step at this times train.learning_rate's schedule (weight decay keeps the schedule's rate)")),
     *[(name, choice.options, field(default_factory=choice.options)) for name, choice in LOSS_REGISTRY.items()]],
    namespace={"moved_key": _loss_moved_key, "validate": _validate_loss,
               "__doc__": "The `loss` section: `name` picks an entry of `LOSS_REGISTRY`; each entry's options "
                          "sit under its own name (``loss.arcface.margin``)."},
)
LossConfig.__module__ = __name__


@dataclass
class TrainConfig:
    identities_per_batch: int = _spec(16, low=2, doc="P: identities per batch")
    images_per_identity: int = _spec(4, low=2, doc="K: images per identity")
    epochs: int = _spec(1, low=1, doc="number of epochs")
    steps_per_epoch: int = _spec(100, low=1, doc="optimizer steps per epoch")
    optimizer: str = _spec("adam", choices=("adam", "adamw", "sgd", "rmsprop", "adagrad"), doc="optimizer")
    learning_rate: float = _spec(0.001, low=0.0, low_open=True, doc="base learning rate")
    momentum: float = _spec(0.9, low=0.0, high=1.0, doc="sgd / rmsprop momentum")
    nesterov: bool = _spec(False, doc="sgd: Nesterov momentum")
    weight_decay: float = _spec(0.0, low=0.0, doc="decoupled weight decay (adamw, sgd, ...)")
    clip_norm: Optional[float] = _spec(None, low=0.0, low_open=True, doc="clip gradients to this global norm")
    lr_schedule: str = _spec("constant", choices=("constant", "piecewise", "cosine"), doc="learning-rate schedule")
    lr_piecewise: list = _spec(factory=list, doc="piecewise schedule: [[epoch, lr], ...] (FaceNet's schedule file)")
    warmup_epochs: float = _spec(0.0, low=0.0, doc="cosine: linear warm-up length in epochs")
    precision: str = _spec("float32", choices=("float32", "mixed_float16", "mixed_bfloat16"),
                           doc="compute precision (embedding head and loss stay float32)")
    jit_compile: bool = _spec(False, doc="compile the train step with XLA")
    strategy: str = _spec("auto", choices=("auto", "default", "mirrored", "multi_worker"),
                          doc="tf.distribute strategy")
    cross_replica_mining: bool = _spec(False, doc="mine triplets over the global batch, not per replica")
    sync_batch_norm: bool = _spec(False, doc="several replicas: batch-norm statistics over the global batch, not per replica")
    bn_momentum: Optional[float] = _spec(None, low=0.0, high=1.0, high_open=True,
                                         doc="momentum of every batch-norm moving average while training (null: the model's 0.99); lower warms up faster in short runs")
    checkpoint_every_steps: int = _spec(500, low=1, doc="write a checkpoint every N steps")
    keep_checkpoints: int = _spec(3, low=1, doc="how many recent checkpoints to keep")
    val_every_epochs: int = _spec(1, low=1, doc="validate every N epochs")
    val_pairs: int = _spec(1000, low=10, doc="same + different pairs drawn from held-out identities")
    log_every_steps: int = _spec(20, low=1, doc="logging interval (metrics.jsonl, TensorBoard, plain log)")
    collapse_distance: float = _spec(0.01, low=0.0, doc="warn when the mean negative distance stays below this")
    collapse_patience: int = _spec(5, low=1, doc="... for this many logging steps")


@dataclass
class EvalConfig:
    pairs: Optional[str] = _spec(None, doc="pairs file (LFW pairs.txt format)")
    data: Optional[str] = _spec(None, doc="image root the pairs refer to (default: data.path)")
    pairs_folds: Optional[list] = _spec(None, doc="use only these folds of a View 2 pairs file, e.g. [10]")
    folds: int = _spec(10, low=2, doc="cross-validation folds")
    far_target: float = _spec(0.001, low=0.0, high=1.0, low_open=True, doc="FAR for VAL@FAR")
    distance: str = _spec("squared-L2", choices=EVAL_DISTANCES, doc="verification distance")
    flip: bool = _spec(False, doc="average each embedding with its mirror image's")
    batch_size: int = _spec(64, low=1, doc="images per inference batch")


@dataclass
class ExportConfig:
    formats: list = _spec(factory=lambda: ["saved_model"],
                          choices=EXPORT_FORMATS,
                          doc="what `mbembed export` writes")
    representative_samples: int = _spec(200, low=1, doc="int8 calibration images")
    parity_samples: int = _spec(64, low=1, doc="held-out images for the parity report")


@dataclass
class Config:
    seed: int = _spec(0, low=0, doc="seed of everything random")
    run_dir: str = _spec("runs/quickstart", doc="where checkpoints, logs and results go")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


SECTIONS = ("data", "model", "loss", "train", "eval", "export")

# Top-level blocks a run's saved config.yaml records beside the settings (`train` writes the
# versions it ran with). They are accepted by name and ignored for the config values, so that
# a run's config.yaml is itself a valid --config file.
RECORDED_KEYS = ("versions",)


def _settings(data: dict) -> dict:
    """`data` without the recorded (non-setting) top-level blocks."""
    return {k: v for k, v in data.items() if k not in RECORDED_KEYS}


# The largest integer any key takes: an int32, so that step counts and sizes fit every tensor.
INT_MAX = 2**31 - 1


class StrictSafeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last
    silently), naming the line of the duplicate and of the first occurrence."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first given on line {first})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(stream: Any) -> Any:
    """YAML text or file -> Python values, refusing duplicate keys (see `StrictSafeLoader`)."""
    return yaml.load(stream, Loader=StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_file(path: str | os.PathLike) -> Any:
    """The values of the YAML file at `path` (`parse_yaml`: duplicate keys refused); a one-line
    `UserError` naming the file, and the line when YAML gives one, when it cannot be read or parsed."""
    source = str(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return parse_yaml(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise UserError(f"{where}: not valid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise UserError(f"{source}: not a text (UTF-8) file") from None
    except OSError as exc:
        raise UserError(f"{source}: cannot read: {exc.strerror or exc}") from None


def read_settings_file(path: str | os.PathLike, what: str) -> dict:
    """`read_yaml_file` of a file that must hold a mapping of settings (a run's saved
    ``config.yaml``): empty or another type is a one-line `UserError` saying `what` the file is."""
    data = read_yaml_file(path)
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise UserError(f"{path}: {what} is {kind}, not a mapping of settings")
    return data


def _describe(value: Any) -> str:
    return repr(value)


def _non_finite(value: Any) -> bool:
    """True when `value` is, or a list holds (at any depth), a NaN or infinite float."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    return False


def _expected(tp: Any, meta: dict) -> str:
    """Human words for a field's type and range, e.g. 'an integer >= 2'."""
    origin = typing.get_origin(tp)
    optional = False
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp, optional = args[0], True
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             list: "a list"}[tp]
    if meta.get("choices") and tp is not list:
        words = "one of " + ", ".join(meta["choices"])
    rng = []
    if meta.get("low") is not None:
        rng.append(("> " if meta["low_open"] else ">= ") + f"{meta['low']:g}")
    if meta.get("high") is not None:
        rng.append(("< " if meta["high_open"] else "<= ") + f"{meta['high']:g}")
    if rng:
        words += " " + " and ".join(rng)
    if optional:
        words += " (or null)"
    return words


def _coerce(value: Any, tp: Any, meta: dict, where: str) -> Any:
    """Check one value against its field's type and rule; return it converted (int -> float)."""
    declared, received = tp, value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]

    def fail() -> None:
        raise UserError(f"{where}: expected {_expected(declared, meta)}, received {_describe(received)}")

    if _non_finite(value):
        raise UserError(f"{where}: expected {_expected(declared, meta)} (not NaN or infinite), "
                        f"received {_describe(received)}")

    if tp is bool:
        if not isinstance(value, bool):
            fail()
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        if abs(value) > INT_MAX:
            raise UserError(f"{where}: expected {_expected(declared, meta)} and at most {INT_MAX:,}, "
                            f"received {_describe(received)}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            fail()
    elif tp is list:
        if not isinstance(value, list):
            fail()
        if meta.get("choices"):
            for item in value:
                if item not in meta["choices"]:
                    raise UserError(f"{where}: expected a list of {', '.join(meta['choices'])}, "
                                    f"received {_describe(value)}")
        return value
    if meta.get("choices") and value not in meta["choices"]:
        fail()
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        fail()
    if high is not None and (value > high or (meta["high_open"] and value == high)):
        fail()
    return value


def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _apply(obj: Any, updates: dict, prefix: str, source: str) -> None:
    """Set fields of dataclass `obj` from a mapping, validating each; unknown keys are errors."""
    hints = _hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            moved = obj.moved_key(key, updates) if hasattr(obj, "moved_key") else None
            if moved:
                raise UserError(f"{source}: {dotted}: moved to {moved}")
            known = ", ".join(fields)
            raise UserError(f"{source}: {dotted}: unknown key (known here: {known})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"{source}: {dotted}: expected a mapping of keys, received {_describe(value)}")
            _apply(getattr(obj, key), value, dotted + ".", source)
        else:
            setattr(obj, key, _coerce(value, tp, fields[key].metadata, f"{source}: {dotted}"))


def _check_augment(data_cfg: DataConfig, source: str | None) -> None:
    """The random crop's range is not empty, and no `data.augment_*` is set with augmentation off."""
    if data_cfg.augment_max_crop < data_cfg.augment_min_crop:
        raise UserError(f"{source or '--set'}: data.augment_max_crop: expected >= data.augment_min_crop "
                        f"({_describe(data_cfg.augment_min_crop)}), received {_describe(data_cfg.augment_max_crop)}")
    if not data_cfg.augment:
        defaults = DataConfig()
        for f in dataclasses.fields(DataConfig):
            value = getattr(data_cfg, f.name)
            if f.name.startswith("augment_") and value != getattr(defaults, f.name):
                raise UserError(f"{source or '--set'}: data.{f.name}: not used (data.augment is false), "
                                f"received {_describe(value)}")


def _check_head_fade(cfg: Config, source: str | None) -> None:
    """``loss.head_fade_epochs`` is [] or [start, end] with 0 <= start <= end and start inside the run."""
    fade = cfg.loss.head_fade_epochs
    if not fade:
        return
    key = f"{source or '--set'}: loss.head_fade_epochs"
    numbers = len(fade) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in fade)
    if not numbers or not 0 <= fade[0] <= fade[1]:
        raise UserError(f"{key}: expected [start, end] epochs with 0 <= start <= end, received {_describe(fade)}")
    if fade[0] >= cfg.train.epochs:
        raise UserError(f"{key}: the fade would start at epoch {fade[0]:g}, when the run has ended "
                        f"(train.epochs {cfg.train.epochs}), so it would never happen; received {_describe(fade)}")


def _check_consistency(cfg: Config, source: str | None) -> None:
    """Rules that tie several keys together; `source` is the config file, None without one."""
    if cfg.data.source in ("folder", "tfrecord") and not cfg.data.path:
        where = f"{source}: " if source is not None else ""
        how = "set it in the file or give --set data.path=..." if source is not None else \
            "give --config FILE or --set data.path=..."
        raise UserError(f"{where}data.path: required when data.source is '{cfg.data.source}' ({how})")
    if cfg.train.lr_schedule == "piecewise":
        sched = cfg.train.lr_piecewise
        ok = bool(sched) and all(isinstance(p, list) and len(p) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in p) for p in sched)
        if not ok:
            raise UserError(f"{source or '--set'}: train.lr_piecewise: expected [[epoch, lr], ...] when "
                            f"train.lr_schedule is 'piecewise', received {_describe(sched)}")
    _check_augment(cfg.data, source)
    cfg.loss.validate(cfg.data, source)
    _check_head_fade(cfg, source)
    if cfg.loss.margin_warmup_epochs > cfg.train.epochs:
        raise UserError(f"{source or '--set'}: loss.margin_warmup_epochs: the warm-up is longer than the run "
                        f"(train.epochs {cfg.train.epochs}), so the margin would never reach "
                        f"loss.{cfg.loss.name}.margin; received {_describe(cfg.loss.margin_warmup_epochs)}")
    if not cfg.export.formats:
        raise UserError(f"{source or '--set'}: export.formats: expected at least one format, received []")


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.key=value`, parsing the value as YAML (so lists and numbers work)."""
    if "=" not in text:
        raise UserError(f"--set {text}: expected key=value, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise UserError(f"--set {text}: expected KEY=VALUE with a non-empty key, e.g. train.epochs=3")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UserError(f"--set {text}: value is not valid YAML ({exc.__class__.__name__})") from None
    return key.strip(), value


def _nest(dotted: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at `path` (if any), then each `key=value` override in order."""
    cfg = Config()
    source = None
    if path is not None:
        source = str(path)
        if not os.path.isfile(path):
            raise UserError(f"{source}: config file not found")
        data = read_yaml_file(path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a mapping of sections at the top level, received {_describe(data)}")
        if "versions" in data:  # a run's own config.yaml (older ones have flat loss keys)
            data = migrate_flat_loss_keys(data)
        _apply(cfg, _settings(data), "", source)
    given: dict = {"file": _dotted(_settings(data)) if path is not None else {}, "set": {}}
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value), "", "--set")
        given["set"].update(_dotted(_nest(key, value)))
    _check_consistency(cfg, source)
    cfg._given = given  # not a setting: what the user gave, for `given_settings`
    return cfg


def _dotted(data: Any, prefix: str = "") -> dict:
    """A nested mapping flattened to ``{"section.key": value}``."""
    if not isinstance(data, dict):
        return {prefix[:-1]: data} if prefix else {}
    out: dict = {}
    for key, value in data.items():
        out.update(_dotted(value, f"{prefix}{key}."))
    return out


def given_settings(cfg: Config) -> dict:
    """The dotted keys the user gave to `load_config`: ``{"file": {key: value}, "set": {key:
    value}}`` (the config file's keys and the ``--set`` ones); both empty for a config made any
    other way. Commands use it to tell a value the user chose from a default."""
    given = getattr(cfg, "_given", None)
    return given if given is not None else {"file": {}, "set": {}}


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict of the config (YAML- and JSON-ready)."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict, source: str = "config") -> Config:
    """Rebuild a validated config from `config_to_dict` output (e.g. a run's saved config.yaml)."""
    cfg = Config()
    _apply(cfg, migrate_flat_loss_keys(_settings(data)), "", source)
    _check_consistency(cfg, source)
    return cfg


def dump_yaml(cfg: Config, extra: dict | None = None) -> str:
    """The resolved config as YAML, keys in definition order; `extra` keys appended (e.g. versions)."""
    data = config_to_dict(cfg)
    if extra:
        data.update(extra)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def reference_rows() -> list[tuple[str, Any, str, str]]:
    """(dotted key, default, expected type/range, description) for every key: the README's reference."""
    rows = []

    def walk(obj: Any, prefix: str) -> None:
        hints = _hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, prefix + f.name + ".")
            else:
                meta = f.metadata
                expected = _expected(hints[f.name], meta)
                if hints[f.name] is list and meta.get("choices"):
                    expected = "a list of " + ", ".join(meta["choices"])
                rows.append((prefix + f.name, value, expected, meta.get("doc", "")))

    walk(Config(), "")
    return rows
