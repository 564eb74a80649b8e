"""The run directory: its artefacts, the saved ``config.yaml`` (written, and compared on resume)
and ``summary.json`` (paths relative to the directory, so that it can be moved or shared)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Callable

from mobilenet_embed import atomic
from mobilenet_embed.config import Config, config_from_dict, config_to_dict, dump_yaml, read_settings_file
from mobilenet_embed.errors import UserError
from mobilenet_embed.records import versions

ARTEFACTS = ("config.yaml", "checkpoints", "tensorboard", "metrics.jsonl", "model.keras", "summary.json")

# Keys whose change makes a checkpoint unreadable or meaningless to resume with.
RESUME_KEYS = ("model.alpha", "model.depth_multiplier", "model.embedding_size", "data.image_size",
               "train.optimizer", "train.precision")


def flatten(data: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_saved_config(path: str) -> dict:
    """The mapping of a run's saved ``config.yaml`` (read as a ``--config`` file is:
    `config.read_settings_file`); `UserError` naming the file when it cannot be read, is not valid
    YAML (duplicate keys included) or is not a mapping (it guards a resume, so it must not be
    silently overwritten)."""
    try:
        return read_settings_file(path, "the run's saved config")
    except UserError as exc:
        raise UserError(f"{exc}; the run's saved config guards against resuming with another model, so it "
                        "is left as it is: repair or remove it to resume, or start over with --fresh --force") from None


def compare_with_saved(cfg: Config, path: str) -> list[str]:
    """Keys that changed since the run's saved config; refuse those a resume cannot survive."""
    data = read_saved_config(path)
    try:
        saved = config_from_dict(data, source=path)
    except UserError:
        return []  # written by another mbembed version; the checkpoint restore will tell
    old, new = flatten(config_to_dict(saved)), flatten(config_to_dict(cfg))
    changed = [k for k in new if old.get(k) != new[k] and k != "run_dir"]
    fatal = [k for k in changed if k in RESUME_KEYS]
    if fatal:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in fatal)
        raise UserError(f"{path}: cannot resume this run with a different {details}; "
                        "start over with --fresh --force, or use another --run-dir")
    return [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed]


@dataclass(frozen=True)
class RunDir:
    """Where a run's artefacts live. Only the chief (`is_chief`) writes."""

    path: str
    is_chief: bool = True

    def join(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def config(self) -> str:
        return self.join("config.yaml")

    @property
    def checkpoints(self) -> str:
        return self.join("checkpoints")

    @property
    def model(self) -> str:
        return self.join("model.keras")

    def prepare(self, cfg: Config, fresh: bool, force: bool, say: Callable[[str], None]) -> None:
        """Create the directory (with `fresh`, remove a previous run's artefacts: needs `force`),
        compare the saved ``config.yaml`` when resuming, then write the new one."""
        if not self.is_chief:
            return
        self._make(fresh, force)
        if not fresh and os.path.isfile(self.config) and os.path.isdir(self.checkpoints):
            changed = compare_with_saved(cfg, self.config)
            if changed:
                say("config changed since the last run on this directory: " + "; ".join(changed))
        atomic.write_text(self.config, dump_yaml(cfg, extra={"versions": versions()}))

    def _make(self, fresh: bool, force: bool) -> None:
        present = [a for a in ARTEFACTS if os.path.exists(self.join(a))]
        if fresh and present:
            if not force:
                raise UserError(f"{self.path}: a run directory already exists here ({', '.join(present)}); "
                                "add --force to overwrite it with --fresh, or leave out --fresh to resume it")
            for name in present:
                path = self.join(name)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        os.makedirs(self.path, exist_ok=True)

    def paths(self, best_checkpoint: str | None) -> dict:
        """The artefact paths a result reports (``model`` only when ``model.keras`` exists)."""
        paths = {"run_dir": self.path, "config": self.config, "checkpoints": self.checkpoints,
                 "tensorboard": self.join("tensorboard"), "metrics": self.join("metrics.jsonl")}
        if best_checkpoint is not None:
            paths["best_checkpoint"] = best_checkpoint
        if os.path.isfile(self.model):
            paths["model"] = self.model
        return paths

    def save_model(self, model) -> None:
        """``model.keras``, written atomically (chief only)."""
        if self.is_chief:
            atomic.atomic_write(self.model, model.save)

    def write_summary(self, summary: dict) -> None:
        """``summary.json`` with every path under the directory made relative to it (chief only)."""
        if self.is_chief:
            atomic.write_json(self.join("summary.json"), relative_paths(summary, self.path), indent=1)


def relative_paths(data, root: str):
    """`data` with every string that is `root` or a path under it rewritten relative to `root`
    (``"."`` for `root` itself); other values unchanged."""
    root = os.path.abspath(root)
    if isinstance(data, dict):
        return {k: relative_paths(v, root) for k, v in data.items()}
    if isinstance(data, list):
        return [relative_paths(v, root) for v in data]
    if isinstance(data, str) and os.path.isabs(data):
        path = os.path.abspath(data)
        if path == root or path.startswith(root + os.sep):
            return os.path.relpath(path, root)
    return data
