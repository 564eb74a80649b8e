"""Crash-safe training checkpoints: written to a temporary name, renamed, then indexed.

Layout under ``<run_dir>/checkpoints/``::

    checkpoint.json          the index: latest checkpoint, kept ones, best one, training state
    ckpt-00000120/ckpt.*     one `tf.train.Checkpoint` (model, optimizer, step) per directory
    best-00000100/ckpt.*     the checkpoint with the best validation accuracy so far

A save writes the `tf.train.Checkpoint` into ``ckpt-tmp-<step>-<pid>/``, renames that directory
to ``ckpt-<step>/`` (one atomic ``os.replace``) and only then replaces ``checkpoint.json`` (again
written to a temporary file and renamed). Whatever instant a process is killed at (SIGKILL
included), the index names a complete checkpoint: the one before, or the new one. Directories
the index does not name (a half-written temporary one, a renamed one whose index update was
lost, pruned ones) are removed on the next start.

Only the chief writes under the run directory. Under `MultiWorkerMirroredStrategy` the other
workers still call `save` (saving may run collective ops that need every worker); they write to a
private temporary directory that is deleted at once. Every worker reads the same files to resume,
so the run directory must be on a filesystem all workers see.

What a ``--checkpoint`` argument names (`resolve_checkpoint`), the run config that comes with it
(`run_config_path`, `config_for_checkpoint`) and the Keras model it holds
(`load_checkpoint_model`) are resolved here too, for `eval`, `export` and the embedders.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np
import tensorflow as tf

from mobilenet_embed import atomic
from mobilenet_embed.errors import UserError

if TYPE_CHECKING:
    import keras

    from mobilenet_embed.config import Config

INDEX = "checkpoint.json"
PREFIX = "ckpt"  # file prefix inside each checkpoint directory
_NAME = re.compile(r"^(ckpt|best)-(\d+)$")


@dataclass
class CheckpointInfo:
    """One indexed checkpoint: its directory, global step, and the training state saved with it."""

    path: str  # the directory
    step: int
    state: dict = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        """The `tf.train.Checkpoint` prefix (what `Checkpoint.read` takes)."""
        return os.path.join(self.path, PREFIX)


def checkpoint_step(path: str) -> Optional[int]:
    """The step of a checkpoint directory named ``ckpt-<step>`` or ``best-<step>``, else None."""
    match = _NAME.match(os.path.basename(os.path.normpath(str(path))))
    return int(match.group(2)) if match else None


def _write_index(directory: str, index: dict) -> None:
    atomic.write_json(os.path.join(directory, INDEX), index, indent=1, sort_keys=True)


def read_index(directory: str) -> Optional[dict]:
    """The parsed ``checkpoint.json`` of a checkpoint directory, or None when there is none."""
    path = os.path.join(directory, INDEX)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable checkpoint index ({exc.__class__.__name__}); "
                        "start over with --fresh --force") from None


def _indexed(directory: str, which: str) -> Optional[CheckpointInfo]:
    """The checkpoint the index names under `which` (``latest`` or ``best``), or None."""
    index = read_index(directory)
    if not index or not index.get(which):
        return None
    entry = index[which]
    state = index.get("state", {}) if which == "latest" else entry.get("metrics", {})
    return CheckpointInfo(os.path.join(directory, entry["name"]), int(entry["step"]), dict(state))


def latest_checkpoint(directory: str) -> Optional[CheckpointInfo]:
    """The latest complete checkpoint in `directory` (``<run_dir>/checkpoints``), or None."""
    return _indexed(directory, "latest")


def best_checkpoint(directory: str) -> Optional[CheckpointInfo]:
    """The best-validation checkpoint in `directory`, or None (its state holds the metrics)."""
    return _indexed(directory, "best")


def load_weights(model, checkpoint_path: str) -> int:
    """Load the model weights of a training checkpoint into `model`; returns its step.

    `checkpoint_path` is a run directory, its ``checkpoints`` directory, or one checkpoint
    directory (``ckpt-<step>`` or ``best-<step>``). Optimizer state is ignored.
    """
    path = checkpoint_path
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if os.path.isfile(os.path.join(path, INDEX)):
        info = latest_checkpoint(path)
        if info is None:
            raise UserError(f"{checkpoint_path}: no checkpoint written yet")
        prefix, step = info.prefix, info.step
    else:
        prefix = os.path.join(path, PREFIX)
        step = checkpoint_step(path)
        step = -1 if step is None else step
    if not os.path.isfile(prefix + ".index"):
        raise UserError(f"{checkpoint_path}: not a training checkpoint (no {prefix}.index)")
    tf.train.Checkpoint(model=model).read(prefix).expect_partial()
    return step


class CheckpointManager:
    """Atomic saves, pruning to the last `keep`, and a separately kept best checkpoint.

    `checkpoint` is the `tf.train.Checkpoint` to write and restore (model, optimizer, step...).
    `state` passed to `save` (JSON-able: best accuracy so far, elapsed time...) is stored in the
    index next to the checkpoint it belongs to and comes back with `latest()`.
    """

    def __init__(self, directory: str, checkpoint: tf.train.Checkpoint, keep: int = 3,
                 is_chief: bool = True):
        self.directory = directory
        self.checkpoint = checkpoint
        self.keep = max(int(keep), 1)
        self.is_chief = is_chief
        self.last_step: Optional[int] = None  # step of the latest checkpoint written or restored
        if is_chief:
            os.makedirs(directory, exist_ok=True)
            self._clean()

    # ------------------------------------------------------------------ reading

    def index(self) -> dict:
        return read_index(self.directory) or {}

    def latest(self) -> Optional[CheckpointInfo]:
        return latest_checkpoint(self.directory)

    def best(self) -> Optional[CheckpointInfo]:
        return best_checkpoint(self.directory)

    def restore(self, info: CheckpointInfo) -> None:
        """Restore every tracked object of `info`; a missing piece is an error, not a silent skip."""
        try:
            status = self.checkpoint.read(info.prefix)
            status.assert_existing_objects_matched()
            self.last_step = int(info.step)
        except (tf.errors.OpError, ValueError, AssertionError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise UserError(f"{info.path}: cannot resume from this checkpoint ({first}); did the model "
                            "or optimizer config change? Start over with --fresh --force") from None

    # ------------------------------------------------------------------ writing

    def _write(self, name: str, step: int) -> str:
        """Write the checkpoint as directory `name` (atomically); returns its path."""
        if not self.is_chief:
            scratch = tempfile.mkdtemp(prefix="mbembed-ckpt-")
            try:
                self.checkpoint.write(os.path.join(scratch, PREFIX))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return os.path.join(self.directory, name)
        tmp = os.path.join(self.directory, f"ckpt-tmp-{step}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.checkpoint.write(os.path.join(tmp, PREFIX))
        final = os.path.join(self.directory, name)
        atomic.replace_dir(tmp, final)  # a `final` there was renamed by a run killed before its index update
        return final

    def save(self, step: int, state: dict | None = None) -> CheckpointInfo:
        """Write checkpoint `step`, make it the latest, prune to the last `keep`."""
        name = f"ckpt-{step:08d}"
        if step == self.last_step:
            # Already saved at this step (an epoch end on a checkpoint_every boundary, a resume,
            # Ctrl-C right after a save): only the state is refreshed. Same decision on every
            # worker, so collective ops inside `write` stay matched.
            if self.is_chief:
                index = self.index()
                index["state"] = dict(state or {})
                _write_index(self.directory, index)
            return CheckpointInfo(os.path.join(self.directory, name), step, dict(state or {}))
        path = self._write(name, step)
        self.last_step = int(step)
        if self.is_chief:
            index = self.index()
            kept = [n for n in index.get("kept", []) if n != name] + [name]
            kept = kept[-self.keep:]
            index.update(latest={"name": name, "step": int(step)}, kept=kept, state=dict(state or {}))
            _write_index(self.directory, index)
            self._clean()
        return CheckpointInfo(path, step, dict(state or {}))

    def save_best(self, step: int, metrics: dict) -> CheckpointInfo:
        """Write the current state as the best checkpoint (replacing the previous best)."""
        name = f"best-{step:08d}"
        path = self._write(name, step)
        if self.is_chief:
            index = self.index()
            index["best"] = {"name": name, "step": int(step), "metrics": dict(metrics)}
            _write_index(self.directory, index)
            self._clean()
        return CheckpointInfo(path, step, dict(metrics))

    def _clean(self) -> None:
        """Remove every checkpoint directory and temporary file the index does not name."""
        index = self.index()
        wanted = set(index.get("kept", []))
        if index.get("latest"):
            wanted.add(index["latest"]["name"])
        if index.get("best"):
            wanted.add(index["best"]["name"])
        for entry in os.listdir(self.directory):
            path = os.path.join(self.directory, entry)
            if entry == INDEX:
                continue
            if entry.startswith(("ckpt-tmp-", INDEX + ".tmp-", atomic.TMP_PREFIX + INDEX, ".old-")):
                # A temporary of another live process cannot exist: one chief per run directory.
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else _unlink(path)
            elif _NAME.match(entry) and entry not in wanted:
                shutil.rmtree(path, ignore_errors=True)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# --------------------------------------------------------------------------- what a --checkpoint names


@dataclasses.dataclass(frozen=True)
class ResolvedCheckpoint:
    """What a `--checkpoint` argument names.

    `kind`: ``keras`` (a whole ``.keras`` model file), ``weights`` (a ``.weights.h5`` file) or
    ``tf_checkpoint`` (a training checkpoint directory ``ckpt-<step>/`` or ``best-<step>/``,
    see the module doc). `which`: ``file`` (named directly), ``best``,
    ``latest`` or ``final`` (a run's ``model.keras``). `step`: the training step, when known.
    """

    path: str
    kind: str
    which: str = "file"
    step: Optional[int] = None


def _is_tf_checkpoint_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, PREFIX + ".index"))


def resolve_checkpoint(path: str) -> ResolvedCheckpoint:
    """The checkpoint `path` means (as `mbembed eval --checkpoint` reads it).

    * a ``.keras`` or ``.weights.h5`` file: that file;
    * a training checkpoint directory (``ckpt-<step>/``, ``best-<step>/``): that checkpoint;
    * a run directory or its ``checkpoints/`` directory: its best checkpoint (by validation
      accuracy, from ``checkpoints/checkpoint.json``), else its latest one, else the run's final
      ``model.keras``.
    """
    path = str(path)
    if os.path.isfile(path):
        if path.endswith(".keras"):
            return ResolvedCheckpoint(path, "keras")
        if path.endswith(".weights.h5"):
            return ResolvedCheckpoint(path, "weights")
        if path.endswith(".index") and os.path.basename(path).startswith(PREFIX):
            return resolve_checkpoint(os.path.dirname(path) or ".")
        raise UserError(f"{path}: not a checkpoint (expected a .keras or .weights.h5 file, a "
                        "checkpoint directory or a run directory)")
    if not os.path.isdir(path):
        raise UserError(f"{path}: checkpoint not found")
    if _is_tf_checkpoint_dir(path):
        return ResolvedCheckpoint(path, "tf_checkpoint", "file", checkpoint_step(path))
    ckpt_dir = path
    if os.path.isdir(os.path.join(path, "checkpoints")):
        ckpt_dir = os.path.join(path, "checkpoints")
    best = best_checkpoint(ckpt_dir)
    if best is not None:
        return ResolvedCheckpoint(best.path, "tf_checkpoint", "best", best.step)
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        return ResolvedCheckpoint(latest.path, "tf_checkpoint", "latest", latest.step)
    final = os.path.join(path, "model.keras")
    if os.path.isfile(final):
        return ResolvedCheckpoint(final, "keras", "final")
    raise UserError(f"{path}: no checkpoint in this directory (no checkpoints/checkpoint.json "
                    "naming a best or latest checkpoint, no model.keras)")


def run_config_path(checkpoint: str) -> Optional[str]:
    """The ``config.yaml`` of the run a checkpoint belongs to, or None.

    Looked for in the run directory itself, the folder of a checkpoint file
    (``<run>/model.keras``), and above ``checkpoints/`` (``<run>/checkpoints/best-N/``,
    ``<run>/checkpoints/x.keras``); never further up.
    """
    path = os.path.abspath(str(checkpoint)).rstrip(os.sep)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    candidates = [folder]
    if checkpoint_step(folder) is not None:
        folder = os.path.dirname(folder)
    if os.path.basename(folder) == "checkpoints":
        candidates.append(os.path.dirname(folder))
    for candidate in candidates:
        found = os.path.join(candidate, "config.yaml")
        if os.path.isfile(found):
            return found
    return None


def config_for_checkpoint(cfg: Optional["Config"], checkpoint: str, notes: Optional[list] = None) -> "Config":
    """`cfg` (defaults when None) with its `model` and `data` sections replaced by those of the
    run `checkpoint` comes from, when that run saved a ``config.yaml``: the model is rebuilt
    and its inputs preprocessed as in training. Other sections (export, eval) stay `cfg`'s.

    What the user gave still counts (`config.given_settings`): a ``--set data.KEY`` that differs
    from the run's value is applied (e.g. another crop, image size or data.max_bad_fraction), a
    ``--set model.KEY`` that differs is a UserError (the trained model cannot change), and a
    config file's preprocessing value that differs is not used; each case appends one line to
    `notes` when given (`preprocessing_metadata.overlay_user_settings`).
    """
    import yaml

    from mobilenet_embed.config import Config, config_from_dict, given_settings
    from mobilenet_embed.preprocessing_metadata import ARCHITECTURE_KEYS, overlay_user_settings

    cfg = cfg if cfg is not None else Config()
    found = run_config_path(checkpoint)
    if found is None:
        return cfg
    try:
        with open(found, encoding="utf-8") as fh:
            run_cfg = config_from_dict(yaml.safe_load(fh) or {}, source=found)
    except yaml.YAMLError as exc:
        raise UserError(f"{found}: not valid YAML ({exc.__class__.__name__})") from None
    given, notes = given_settings(cfg), (notes if notes is not None else [])
    where = f"the checkpoint's run ({found})"
    data = overlay_user_settings("data", dataclasses.asdict(run_cfg.data), cfg.data, given, where, notes)
    model = overlay_user_settings("model", dataclasses.asdict(run_cfg.model), cfg.model, given, where, notes,
                                  fixed=tuple(f.name for f in dataclasses.fields(run_cfg.model)),
                                  fixed_reason="a trained model's architecture cannot change",
                                  report_file=ARCHITECTURE_KEYS)
    out = dataclasses.replace(cfg, model=dataclasses.replace(run_cfg.model, **model),
                              data=dataclasses.replace(run_cfg.data, **data))
    out._given = given  # what the user gave still travels (`given_settings`)
    return out


def load_checkpoint_model(checkpoint: str, cfg: Optional["Config"] = None
                          ) -> tuple["keras.Model", "Config"]:
    """The Keras embedding model of a checkpoint (`resolve_checkpoint`) and the config to use
    with it (`config_for_checkpoint`: a run's saved config wins for `model` and `data`).

    ``.keras`` files are loaded whole (``compile=False``). Weights files and training
    checkpoints are loaded into ``build_model_from_config(cfg.model, cfg.data.image_size)``,
    the latter with `load_weights`. The returned config's
    ``data.image_size`` is the model's input size.
    """
    import keras

    from mobilenet_embed.model import build_model_from_config

    resolved = resolve_checkpoint(checkpoint)
    cfg = config_for_checkpoint(cfg, resolved.path if resolved.which == "file" else checkpoint)
    path = resolved.path
    try:
        if resolved.kind == "keras":
            model = keras.models.load_model(path, compile=False)
        else:
            model = build_model_from_config(dataclasses.replace(cfg.model, backbone_weights=None),
                                            cfg.data.image_size)
            if resolved.kind == "weights":
                model.load_weights(path)
            else:
                before = [w.numpy().copy() for w in model.weights]
                load_weights(model, path)
                if all(np.array_equal(b, w.numpy()) for b, w in zip(before, model.weights)):
                    raise UserError(f"{path}: no weight of the model was found in this checkpoint "
                                    "(does the config's model section match the run's?)")
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{path}: cannot load checkpoint: {str(exc).splitlines()[0]}") from None
    if len(model.outputs) != 1:
        raise UserError(f"{path}: expected an embedding model with one output, received "
                        f"{len(model.outputs)} outputs")
    size = model.input_shape[1]
    if isinstance(size, int) and size != cfg.data.image_size:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=size))
    return model, cfg
