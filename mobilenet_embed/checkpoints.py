"""Crash-safe training checkpoints: written to a temporary name, renamed, then indexed.

Layout under ``<run_dir>/checkpoints/``::

    checkpoint.json          the index: latest checkpoint, kept ones, best one, training state
    ckpt-00000120/ckpt.*     one `tf.train.Checkpoint` (model, optimizer, step) per directory,
    ckpt-00000120/state.json   with the training state saved with it
    best-00000100/ckpt.*     the checkpoint with the best validation accuracy so far
    best-00000100/state.json   (its validation metrics)

A save writes the `tf.train.Checkpoint` and its ``state.json`` into ``ckpt-tmp-<step>-<pid>/``,
renames that directory to ``ckpt-<step>/`` (one atomic ``os.replace``) and only then replaces
``checkpoint.json`` (again written to a temporary file and renamed). Whatever instant a process
is killed at (SIGKILL included), the index names a complete checkpoint: the one before, or the
new one. Directories the index does not name (a half-written temporary one, a renamed one whose
index update was lost, pruned ones) are removed on the next start.

What goes wrong, and what happens:

* ``checkpoint.json`` missing or unreadable while checkpoint directories exist: the index is
  rebuilt from the directories (`rebuild_index`: every ``ckpt-N`` kept, the highest complete one
  latest, the newest ``best-N`` best, each with its own ``state.json``), said in one line; nothing
  is deleted before the index is known.
* a damaged checkpoint (truncated or bit-flipped file, missing ``.index``, deleted directory):
  `CheckpointManager.restore` falls back, newest first, to the newest kept one that restores,
  one line per damaged one; when none restores, a `UserError` naming the directory and nothing
  deleted.
* a failed write (disk full, read-only folder): a `UserError` ``<dir>/ckpt-N: cannot write:
  <reason>`` (`mobilenet_embed.atomic.writing`), the temporary directory removed, the previous
  checkpoint and its index as they were.

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
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import tensorflow as tf

from mobilenet_embed import atomic
from mobilenet_embed.errors import UserError

if TYPE_CHECKING:
    import keras

    from mobilenet_embed.config import Config

INDEX = "checkpoint.json"
PREFIX = "ckpt"  # file prefix inside each checkpoint directory
STATE = "state.json"  # inside each checkpoint directory: the state (or, for best-N, the metrics) saved with it
_NAME = re.compile(r"^(ckpt|best)-(\d+)$")
_DATA = re.compile(r"^" + PREFIX + r"\.data-\d{5}-of-(\d{5})$")


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


def checkpoint_problem(path: str) -> Optional[str]:
    """What is missing from the checkpoint directory `path` (its folder, ``ckpt.index``, a data
    shard), or None when every file is there. Contents are checked only by restoring."""
    if not os.path.isdir(path):
        return "its folder is missing"
    names = set(os.listdir(path))
    index = os.path.join(path, PREFIX + ".index")
    if PREFIX + ".index" not in names or not os.path.isfile(index):
        return f"no {PREFIX}.index"
    if os.path.getsize(index) == 0:
        return f"{PREFIX}.index is empty"
    shards = [m for m in map(_DATA.match, sorted(names)) if m]
    if not shards:
        return f"no {PREFIX}.data file"
    total = int(shards[0].group(1))
    missing = [f"{PREFIX}.data-{i:05d}-of-{total:05d}" for i in range(total)
               if f"{PREFIX}.data-{i:05d}-of-{total:05d}" not in names]
    return f"{missing[0]} is missing" if missing else None


def _folder_state(path: str) -> dict:
    """The ``state.json`` saved in a checkpoint directory ({} when none or unreadable)."""
    try:
        with open(os.path.join(path, STATE), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_index(directory: str, index: dict) -> None:
    atomic.write_json(os.path.join(directory, INDEX), index, indent=1, sort_keys=True)


def _checkpoint_dirs(directory: str) -> dict[str, list[tuple[int, str]]]:
    """``{"ckpt": [(step, name)...], "best": [...]}``, each sorted by step."""
    found: dict[str, list[tuple[int, str]]] = {"ckpt": [], "best": []}
    try:
        entries = os.listdir(directory)
    except OSError:
        return found
    for entry in entries:
        match = _NAME.match(entry)
        if match and os.path.isdir(os.path.join(directory, entry)):
            found[match.group(1)].append((int(match.group(2)), entry))
    return {kind: sorted(items) for kind, items in found.items()}


def rebuild_index(directory: str) -> Optional[dict]:
    """An index made from the checkpoint directories themselves, for a lost ``checkpoint.json``.

    Every ``ckpt-N`` is kept; the latest is the highest complete one (`checkpoint_problem`; the
    highest at all when none is), with the state of its ``state.json``; the best is the newest
    complete ``best-N`` (a best is only ever replaced by a better one), with its metrics. None
    when there is no checkpoint directory.
    """
    found = _checkpoint_dirs(directory)
    if not found["ckpt"] and not found["best"]:
        return None

    def pick(items: list[tuple[int, str]]) -> tuple[int, str]:
        complete = [item for item in items if checkpoint_problem(os.path.join(directory, item[1])) is None]
        return (complete or items)[-1]

    index: dict = {"kept": [name for _, name in found["ckpt"]]}
    if found["ckpt"]:
        step, name = pick(found["ckpt"])
        index["latest"] = {"name": name, "step": step}
        index["state"] = _folder_state(os.path.join(directory, name))
    if found["best"]:
        step, name = pick(found["best"])
        index["best"] = {"name": name, "step": step, "metrics": _folder_state(os.path.join(directory, name))}
    return index


def _index_problem(index: object) -> Optional[str]:
    """Why a parsed ``checkpoint.json`` cannot be used, or None."""
    if not isinstance(index, dict):
        return "not a JSON object"
    for which in ("latest", "best"):
        entry = index.get(which)
        if entry is None:
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and _NAME.match(entry["name"])
                and isinstance(entry.get("step"), int)):
            return f"its '{which}' entry is malformed"
    kept = index.get("kept", [])
    if not (isinstance(kept, list) and all(isinstance(n, str) and _NAME.match(n) for n in kept)):
        return "its 'kept' list is malformed"
    if not isinstance(index.get("state", {}), dict):
        return "its 'state' is malformed"
    return None


def load_index(directory: str) -> tuple[Optional[dict], Optional[str]]:
    """The index of a checkpoint directory, and a note when it was not read as it is.

    A missing or unreadable ``checkpoint.json`` beside checkpoint directories gives the index
    `rebuild_index` makes (the note says so; nothing is written here). No index and no checkpoint
    directory: ``(None, None)``, or a note when an unreadable index was ignored.
    """
    path = os.path.join(directory, INDEX)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                index = json.load(fh)
            problem = _index_problem(index)
        except (OSError, ValueError) as exc:
            problem = f"unreadable ({exc.__class__.__name__})"
        if problem is None:
            return index, None
    else:
        problem = "not a file" if os.path.lexists(path) else "missing"
    rebuilt = rebuild_index(directory)
    if rebuilt is None:
        if problem == "missing":
            return None, None
        return None, f"note: {path} is {problem} and there is no checkpoint folder: nothing to resume from"
    parts = [f"latest {rebuilt['latest']['name']}" if "latest" in rebuilt else "no latest",
             f"best {rebuilt['best']['name']}" if "best" in rebuilt else "no best",
             f"{len(rebuilt['kept'])} ckpt folder(s) kept"]
    return rebuilt, f"note: {path} is {problem}: rebuilt the index from the checkpoint folders ({', '.join(parts)})"


def read_index(directory: str) -> Optional[dict]:
    """The index of a checkpoint directory (`load_index`: rebuilt when lost), or None."""
    return load_index(directory)[0]


def _indexed(directory: str, which: str) -> Optional[CheckpointInfo]:
    """The checkpoint the index names under `which` (``latest`` or ``best``), or None."""
    index = read_index(directory)
    if not index or not index.get(which):
        return None
    entry = index[which]
    path = os.path.join(directory, entry["name"])
    state = index.get("state") if which == "latest" else entry.get("metrics")
    return CheckpointInfo(path, int(entry["step"]), dict(state or _folder_state(path)))


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
    if os.path.isfile(os.path.join(path, PREFIX + ".index")):
        prefix = os.path.join(path, PREFIX)
        step = checkpoint_step(path)
        step = -1 if step is None else step
    else:
        info = latest_checkpoint(path)
        if info is None:
            raise UserError(f"{checkpoint_path}: no checkpoint written yet")
        prefix, step = info.prefix, info.step
    if not os.path.isfile(prefix + ".index"):
        raise UserError(f"{checkpoint_path}: not a training checkpoint (no {prefix}.index)")
    try:
        tf.train.Checkpoint(model=model).read(prefix).expect_partial()
    except Exception:  # noqa: BLE001 - a broken file raises IndexError, OSError, DataLossError...
        damage = checkpoint_damage(prefix)
        if damage is None:
            raise
        raise UserError(f"{os.path.dirname(prefix)}: checkpoint is damaged ({damage})") from None
    return step


def _error_line(exc: BaseException) -> str:
    """The first meaningful line of an exception, without TF's ``{{function_node ...}}`` prefix."""
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", str(exc)).strip()
    first = text.splitlines()[0].strip() if text else ""
    return f"{exc.__class__.__name__}: {first}" if first else exc.__class__.__name__


def checkpoint_damage(prefix: str) -> Optional[str]:
    """Why the `tf.train.Checkpoint` at `prefix` cannot be read back (a truncated, bit-flipped or
    missing file: every tensor is read, its checksum checked), or None when it reads whole."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as exc:  # noqa: BLE001 - a broken file raises IndexError, OSError, DataLossError...
        return _error_line(exc)
    return None


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class CheckpointManager:
    """Atomic saves, pruning to the last `keep`, and a separately kept best checkpoint.

    `checkpoint` is the `tf.train.Checkpoint` to write and restore (model, optimizer, step...).
    `state` passed to `save` (JSON-able: best accuracy so far, elapsed time...) is stored in the
    index and in the checkpoint's directory, and comes back with `latest()` and `restore()`.
    `log` receives the one-line notes (a rebuilt index, a damaged checkpoint skipped; default:
    stderr); only the chief's are said.
    """

    def __init__(self, directory: str, checkpoint: tf.train.Checkpoint, keep: int = 3,
                 is_chief: bool = True, log: Optional[Callable[[str], None]] = None):
        self.directory = directory
        self.checkpoint = checkpoint
        self.keep = max(int(keep), 1)
        self.is_chief = is_chief
        self.log: Callable[[str], None] = (log or _stderr) if is_chief else (lambda _text: None)
        self.last_step: Optional[int] = None  # step of the latest checkpoint written or restored
        if is_chief:
            with atomic.writing(directory):
                os.makedirs(directory, exist_ok=True)
            index, note = load_index(directory)
            if note:
                self.log(note)
                if index is not None:
                    _write_index(directory, index)  # the index is known before anything is removed
            self._clean()

    # ------------------------------------------------------------------ reading

    def index(self) -> dict:
        return read_index(self.directory) or {}

    def latest(self) -> Optional[CheckpointInfo]:
        return latest_checkpoint(self.directory)

    def best(self) -> Optional[CheckpointInfo]:
        return best_checkpoint(self.directory)

    def _older_kept(self, step: int) -> list[CheckpointInfo]:
        """The kept ``ckpt-N`` checkpoints before `step`, newest first (with their own state)."""
        steps = sorted((checkpoint_step(name), name) for name in self.index().get("kept", [])
                       if name.startswith("ckpt-"))
        return [CheckpointInfo(os.path.join(self.directory, name), s, _folder_state(os.path.join(self.directory, name)))
                for s, name in reversed(steps) if s is not None and s < step]

    def _restore_one(self, info: CheckpointInfo) -> Optional[str]:
        """Restore `info`; None when done, else why the checkpoint is damaged. A checkpoint that
        reads whole but does not fit the objects (a changed model) raises `UserError`."""
        problem = checkpoint_problem(info.path)
        if problem:
            return problem
        try:
            self.checkpoint.read(info.prefix).assert_existing_objects_matched()
            return None
        except Exception as exc:  # noqa: BLE001 - sorted below: damage, a mismatch, or a bug
            damage = checkpoint_damage(info.prefix)
            if damage:
                return damage
            if not isinstance(exc, (tf.errors.OpError, ValueError, AssertionError)):
                raise
            raise UserError(f"{info.path}: cannot resume from this checkpoint ({_error_line(exc)}); did the "
                            "model or optimizer config change? Train with the run's config, or start over "
                            "in another --run-dir") from None

    def restore(self, info: Optional[CheckpointInfo] = None) -> Optional[CheckpointInfo]:
        """Restore every tracked object of `info` (default: the latest); returns the checkpoint
        restored, with its state, or None when there is none.

        A damaged checkpoint is skipped for the newest older kept one that restores, each skipped
        one said in one line (``warning: checkpoint ckpt-N is damaged (<why>); resuming from
        ckpt-M``). None restoring raises `UserError` naming the directory; nothing is deleted.
        A missing piece (a changed model) is an error at once, not a silent skip.
        """
        info = info if info is not None else self.latest()
        if info is None:
            return None
        failures: list[tuple[str, str]] = []
        for candidate in [info] + self._older_kept(info.step):
            why = self._restore_one(candidate)
            if why is None:
                for name, reason in failures:
                    self.log(f"warning: checkpoint {name} is damaged ({reason}); resuming from "
                             f"{os.path.basename(candidate.path)}")
                self.last_step = int(candidate.step)
                return candidate
            failures.append((os.path.basename(candidate.path), why))
        best = self.best()
        intact_best = (f"; {os.path.basename(best.path)} still loads for eval and export"
                       if best is not None and checkpoint_problem(best.path) is None
                       and checkpoint_damage(best.prefix) is None else "")
        raise UserError(f"{self.directory}: no checkpoint restores ("
                        + "; ".join(f"{name}: {reason}" for name, reason in failures)
                        + f"); nothing was deleted{intact_best}. To start over, use another --run-dir")

    # ------------------------------------------------------------------ writing

    def _write(self, name: str, step: int, state: dict) -> str:
        """Write the checkpoint and its `state` as directory `name` (atomically); returns its path.
        A failed write raises `UserError` naming the directory and leaves no temporary behind."""
        if not self.is_chief:
            scratch = tempfile.mkdtemp(prefix="mbembed-ckpt-")
            try:
                self.checkpoint.write(os.path.join(scratch, PREFIX))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return os.path.join(self.directory, name)
        tmp = os.path.join(self.directory, f"ckpt-tmp-{step}-{os.getpid()}")
        final = os.path.join(self.directory, name)
        try:
            with atomic.writing(final):
                shutil.rmtree(tmp, ignore_errors=True)
                self.checkpoint.write(os.path.join(tmp, PREFIX))
                with open(os.path.join(tmp, STATE), "w", encoding="utf-8") as fh:
                    json.dump(state, fh, indent=1, sort_keys=True)
            atomic.replace_dir(tmp, final)  # a `final` there was renamed by a run killed before its index update
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _index_checkpoint(self, index: dict, path: str, named_before: set[str]) -> None:
        """Write `index` naming the new checkpoint `path`; if that fails, remove `path` again
        (unless the old index named it), so the old index and its checkpoints stand as they were."""
        try:
            _write_index(self.directory, index)
        except UserError:
            if os.path.basename(path) not in named_before:
                shutil.rmtree(path, ignore_errors=True)
            raise

    def save(self, step: int, state: dict | None = None) -> CheckpointInfo:
        """Write checkpoint `step`, make it the latest, prune to the last `keep`."""
        name = f"ckpt-{step:08d}"
        state = dict(state or {})
        if step == self.last_step:
            # Already saved at this step (an epoch end on a checkpoint_every boundary, a resume,
            # Ctrl-C right after a save): only the state is refreshed. Same decision on every
            # worker, so collective ops inside `write` stay matched.
            if self.is_chief:
                index = self.index()
                index["state"] = state
                _write_index(self.directory, index)
                if os.path.isdir(os.path.join(self.directory, name)):
                    atomic.write_json(os.path.join(self.directory, name, STATE), state, indent=1, sort_keys=True)
            return CheckpointInfo(os.path.join(self.directory, name), step, state)
        path = self._write(name, step, state)
        self.last_step = int(step)
        if self.is_chief:
            index = self.index()
            before = _named(index)
            # by step: after a fall-back past a damaged checkpoint, the newer damaged one stays
            # listed (nothing removed behind the user's back) until this run overwrites it
            kept = sorted(set(index.get("kept", [])) | {name}, key=lambda n: checkpoint_step(n) or 0)
            index.update(latest={"name": name, "step": int(step)}, kept=kept[-self.keep:], state=state)
            self._index_checkpoint(index, path, before)
            self._clean()
        return CheckpointInfo(path, step, state)

    def save_best(self, step: int, metrics: dict) -> CheckpointInfo:
        """Write the current state as the best checkpoint (replacing the previous best)."""
        name = f"best-{step:08d}"
        metrics = dict(metrics)
        path = self._write(name, step, metrics)
        if self.is_chief:
            index = self.index()
            before = _named(index)
            index["best"] = {"name": name, "step": int(step), "metrics": metrics}
            self._index_checkpoint(index, path, before)
            self._clean()
        return CheckpointInfo(path, step, metrics)

    def _clean(self) -> None:
        """Remove every checkpoint directory and temporary file the index does not name."""
        wanted = _named(self.index())
        for entry in os.listdir(self.directory):
            path = os.path.join(self.directory, entry)
            if entry == INDEX:
                continue
            if entry.startswith(("ckpt-tmp-", INDEX + ".tmp-", atomic.TMP_PREFIX + INDEX, ".old-")):
                # A temporary of another live process cannot exist: one chief per run directory.
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else _unlink(path)
            elif _NAME.match(entry) and entry not in wanted:
                shutil.rmtree(path, ignore_errors=True)


def _named(index: dict) -> set[str]:
    """The checkpoint directories an index names (kept, latest, best)."""
    wanted = set(index.get("kept", []))
    for which in ("latest", "best"):
        if index.get(which):
            wanted.add(index[which]["name"])
    return wanted


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
    from mobilenet_embed.config import Config, config_from_dict, given_settings, read_settings_file
    from mobilenet_embed.preprocessing_metadata import ARCHITECTURE_KEYS, overlay_user_settings

    cfg = cfg if cfg is not None else Config()
    found = run_config_path(checkpoint)
    if found is None:
        return cfg
    run_cfg = config_from_dict(read_settings_file(found, "the checkpoint's run config"), source=found)
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
    if resolved.kind == "keras" and os.path.isfile(path) and not zipfile.is_zipfile(path):
        # Keras says "File not found" for any file it cannot open as a zip archive
        raise UserError(f"{path}: not a .keras model: a .keras file is a zip archive, this one is not "
                        f"({os.path.getsize(path):,} bytes; damaged or another format?)")
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
