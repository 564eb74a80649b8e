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
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

import tensorflow as tf

from mobilenet_embed.errors import UserError

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


def _write_json_atomic(path: str, data: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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


def latest_checkpoint(directory: str) -> Optional[CheckpointInfo]:
    """The latest complete checkpoint in `directory` (``<run_dir>/checkpoints``), or None."""
    index = read_index(directory)
    if not index or not index.get("latest"):
        return None
    latest = index["latest"]
    return CheckpointInfo(os.path.join(directory, latest["name"]), int(latest["step"]),
                          dict(index.get("state", {})))


def best_checkpoint(directory: str) -> Optional[CheckpointInfo]:
    """The best-validation checkpoint in `directory`, or None (its state holds the metrics)."""
    index = read_index(directory)
    if not index or not index.get("best"):
        return None
    best = index["best"]
    return CheckpointInfo(os.path.join(directory, best["name"]), int(best["step"]),
                          dict(best.get("metrics", {})))


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
        match = _NAME.match(os.path.basename(os.path.normpath(path)))
        step = int(match.group(2)) if match else -1
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
        if os.path.exists(final):  # renamed by a run killed before its index update
            shutil.rmtree(final)
        os.replace(tmp, final)
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
                _write_json_atomic(os.path.join(self.directory, INDEX), index)
            return CheckpointInfo(os.path.join(self.directory, name), step, dict(state or {}))
        path = self._write(name, step)
        self.last_step = int(step)
        if self.is_chief:
            index = self.index()
            kept = [n for n in index.get("kept", []) if n != name] + [name]
            kept = kept[-self.keep:]
            index.update(latest={"name": name, "step": int(step)}, kept=kept, state=dict(state or {}))
            _write_json_atomic(os.path.join(self.directory, INDEX), index)
            self._clean()
        return CheckpointInfo(path, step, dict(state or {}))

    def save_best(self, step: int, metrics: dict) -> CheckpointInfo:
        """Write the current state as the best checkpoint (replacing the previous best)."""
        name = f"best-{step:08d}"
        path = self._write(name, step)
        if self.is_chief:
            index = self.index()
            index["best"] = {"name": name, "step": int(step), "metrics": dict(metrics)}
            _write_json_atomic(os.path.join(self.directory, INDEX), index)
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
            if entry.startswith("ckpt-tmp-") or entry.startswith(INDEX + ".tmp-"):
                # A temporary of another live process cannot exist: one chief per run directory.
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else _unlink(path)
            elif _NAME.match(entry) and entry not in wanted:
                shutil.rmtree(path, ignore_errors=True)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
