"""The preprocessing a model expects: recorded inside every exported file, and resolved for use.

Every file `mbembed export` writes carries one JSON record of how its input images must be made
(`build_metadata`)::

    {"format": "mbembed-preprocessing", "schema": 1, "image_size": 160, "crop_fraction": 0.55,
     "align": null | {"template": "arcface", "size": 112, "select": "center"},
     "normalization": "RGB, x / 127.5 - 1 (range [-1, 1])", "embedding_size": 128,
     "l2_normalized": true, "distance": "squared-L2", "mbembed_version": "0.1.0"}

* SavedModel: a variable collection ``mbembed_preprocessing`` (one string variable; after
  ``tf.saved_model.load(dir)`` it is ``loaded.mbembed_preprocessing[0]``; no serving signature)
  and the same JSON as ``assets.extra/mbembed_preprocessing.json`` (SavedModel's folder for
  files of higher-level tools; readable without TensorFlow).
* ``.tflite``: an entry ``mbembed_preprocessing`` of the flatbuffer's ``metadata`` table whose
  buffer holds the JSON, added the way the TFLite converter adds its own ``CONVERSION_METADATA``
  (`add_tflite_metadata`, `read_tflite_metadata`).

So a file copied away from its folder still says how to feed it. `overlay_user_settings` puts
what the user gave (``--set`` wins with a printed note; a config file value that differs is
reported and not used) over what a model records (a run's ``config.yaml`` or the metadata), and
`model_data_config` gives `mbembed eval` / `export embeddings` the data config to read images with.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

from mobilenet_embed.errors import UserError

if TYPE_CHECKING:
    from mobilenet_embed.config import Config, DataConfig

METADATA_NAME = "mbembed_preprocessing"
FORMAT = "mbembed-preprocessing"
SCHEMA = 1
NORMALIZATION = "RGB, x / 127.5 - 1 (range [-1, 1])"
#: where the JSON copy lies inside a SavedModel directory
SAVED_MODEL_ASSET = os.path.join("assets.extra", METADATA_NAME + ".json")
#: the data.* keys that say how an image becomes the model's input
PREPROCESSING_KEYS = ("image_size", "crop_fraction", "align_template", "align_size", "align_select")
#: model.* keys a trained model cannot change
ARCHITECTURE_KEYS = ("alpha", "depth_multiplier", "embedding_size")


def build_metadata(data_cfg: "DataConfig", embedding_size: int, distance: str = "squared-L2",
                   image_size: Optional[int] = None) -> dict:
    """The preprocessing record of a model trained with `data_cfg` (see the module doc)."""
    from mobilenet_embed import __version__

    align = None
    if data_cfg.align_template:
        align = {"template": str(data_cfg.align_template), "size": int(data_cfg.align_size),
                 "select": str(data_cfg.align_select)}
    return {"format": FORMAT, "schema": SCHEMA,
            "image_size": int(image_size if image_size is not None else data_cfg.image_size),
            "crop_fraction": float(data_cfg.crop_fraction), "align": align,
            "normalization": NORMALIZATION, "embedding_size": int(embedding_size),
            "l2_normalized": True, "distance": str(distance), "mbembed_version": __version__}


def parse_metadata(text: Any, where: str) -> dict:
    """A preprocessing record from its JSON (str or bytes), checked; UserError naming `where`."""
    try:
        meta = json.loads(text.decode("utf-8") if isinstance(text, (bytes, bytearray)) else text)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError("not an mbembed preprocessing record")
        if int(meta["schema"]) > SCHEMA:
            raise ValueError(f"schema {meta['schema']} is newer than this mbembed reads ({SCHEMA}); upgrade mbembed")
        size, crop = meta["image_size"], meta["crop_fraction"]
        if not (isinstance(size, int) and size > 0 and 0.0 < float(crop) <= 1.0):
            raise ValueError(f"image_size {size!r}, crop_fraction {crop!r}")
        align = meta.get("align")
        if align is not None and not (isinstance(align, dict) and align.get("template")
                                      and int(align.get("size", 0)) > 0):
            raise ValueError(f"align {align!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UserError(f"{where}: damaged preprocessing metadata ({exc})") from None
    return meta


def data_settings(meta: dict) -> dict:
    """The ``data.*`` values (`PREPROCESSING_KEYS`) a preprocessing record stands for."""
    align = meta.get("align") or {}
    out = {"image_size": int(meta["image_size"]), "crop_fraction": float(meta["crop_fraction"]),
           "align_template": align.get("template")}
    if align:
        out.update(align_size=int(align["size"]), align_select=str(align.get("select", "center")))
    return out


def describe(settings: dict) -> str:
    """``64x64, crop 0.55, aligned arcface 112`` (or ``not aligned``) for log lines."""
    align = (f"aligned {settings['align_template']} {settings.get('align_size', 112)}"
             if settings.get("align_template") else "not aligned")
    return f"{settings['image_size']}x{settings['image_size']}, crop {settings['crop_fraction']:g}, {align}"


# --------------------------------------------------------------------------- SavedModel


def write_saved_model_asset(saved_dir: str, meta: dict) -> str:
    """The JSON copy of `meta` at ``<saved_dir>/assets.extra/mbembed_preprocessing.json``."""
    from mobilenet_embed import atomic

    path = os.path.join(str(saved_dir), SAVED_MODEL_ASSET)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return atomic.write_text(path, json.dumps(meta, indent=1) + "\n")


def read_saved_model_asset(saved_dir: str) -> Optional[dict]:
    """The record in a SavedModel directory's ``assets.extra`` (None when it has none)."""
    path = os.path.join(str(saved_dir), SAVED_MODEL_ASSET)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as fh:
        return parse_metadata(fh.read(), path)


def read_saved_model_object(loaded: Any, where: str) -> Optional[dict]:
    """The record of a loaded SavedModel (its ``mbembed_preprocessing`` variable), or None."""
    collection = getattr(loaded, METADATA_NAME, None)
    if collection is None:
        return None
    try:
        value = collection[0].numpy()
    except (IndexError, TypeError, AttributeError):
        raise UserError(f"{where}: damaged preprocessing metadata (variable {METADATA_NAME})") from None
    return parse_metadata(value, where)


# --------------------------------------------------------------------------- TFLite


def add_tflite_metadata(flatbuffer: bytes, meta: dict) -> bytes:
    """`flatbuffer` (a .tflite model) with `meta` as its ``mbembed_preprocessing`` metadata entry
    (replacing one already there), as the TFLite converter adds ``CONVERSION_METADATA``."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)
    model.buffers = list(model.buffers or [])
    model.metadata = list(model.metadata or [])
    for entry in model.metadata:
        if entry.name in (METADATA_NAME, METADATA_NAME.encode()):
            model.buffers[entry.buffer] = buffer
            break
    else:
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = METADATA_NAME
        entry.buffer = len(model.buffers) - 1
        model.metadata.append(entry)
    return flatbuffer_utils.convert_object_to_bytearray(model)


def read_tflite_metadata(flatbuffer: bytes, where: str) -> Optional[dict]:
    """The ``mbembed_preprocessing`` record of a .tflite model's bytes (None when it has none)."""
    from ai_edge_litert import schema_py_generated as schema

    try:
        model = schema.Model.GetRootAs(flatbuffer, 0)
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if entry.Name() == METADATA_NAME.encode():
                return parse_metadata(bytes(model.Buffers(entry.Buffer()).DataAsNumpy()), where)
    except (IndexError, ValueError, TypeError, AttributeError) as exc:  # not a flatbuffer
        raise UserError(f"{where}: cannot read TFLite metadata ({exc})") from None
    return None


# --------------------------------------------------------------------------- resolution


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) < 1e-12
        except (TypeError, ValueError):
            return False
    return a == b


def overlay_user_settings(section: str, recorded: dict, chosen: Any, given: dict, where: str,
                          notes: list, fixed: Sequence[str] = (), fixed_reason: str = "",
                          report_file: Sequence[str] = PREPROCESSING_KEYS) -> dict:
    """`recorded` (``key -> value`` of config section `section` that a model was made with, from
    `where`) with the user's choices applied.

    `chosen` is the user's config section (a dataclass) and `given` `config.given_settings`: a
    ``--set section.key`` that differs from the record wins, and a line saying so is appended
    to `notes` (for a key in `fixed`: UserError, with `fixed_reason`); a config file value that
    differs (keys in `report_file`) is not used, and a note says so.
    """
    out = dict(recorded)
    for key in recorded:
        dotted = f"{section}.{key}"
        mine = getattr(chosen, key)
        if _same(mine, recorded[key]):
            continue
        if dotted in given["set"]:
            if key in fixed:
                raise UserError(f"--set {dotted}={_show(mine)}: {where} has {_show(recorded[key])}; {fixed_reason}")
            out[key] = mine
            notes.append(f"note: --set {dotted}={_show(mine)} overrides {_show(recorded[key])} of {where}")
        elif dotted in given["file"] and key in report_file:
            notes.append(f"note: {dotted}: using {_show(recorded[key])} of {where}, not the config file's "
                         f"{_show(mine)} (--set {dotted}={_show(mine)} to override)")
    return out


def _show(value: Any) -> str:
    if value is None:
        return "null"
    return f"{value:g}" if isinstance(value, float) else str(value)


def model_data_config(cfg: "Config", embedder: Any, log: Callable[[str], None]) -> "DataConfig":
    """``cfg.data`` with the preprocessing `embedder` expects (`PREPROCESSING_KEYS`).

    An exported file (`embedder.recorded` from its metadata): the record, with ``--set`` keys
    applied (a note is logged; its fixed input size cannot change). A file that records nothing:
    UserError unless the user states ``data.crop_fraction`` (``--set`` or the config file).
    A checkpoint: its run's config (``--set`` keys already applied, `embedder.notes`), else the
    config's values. Every note and where the values come from go to `log`.
    """
    from mobilenet_embed.config import given_settings

    given = given_settings(cfg)
    notes = list(getattr(embedder, "notes", []))
    recorded = getattr(embedder, "recorded", None)
    source = getattr(embedder, "recorded_from", None)
    exported = embedder.kind in ("saved_model", "tflite")
    path = getattr(embedder, "path", "the model")
    if exported and recorded is not None:
        settings = overlay_user_settings(
            "data", recorded, cfg.data, given, source, notes, fixed=("image_size",),
            fixed_reason="an exported file's input size is fixed (export again at another size)")
    elif exported:
        stated = [k for k in ("crop_fraction",) if f"data.{k}" in given["set"] or f"data.{k}" in given["file"]]
        if not stated:
            hint = _report_hint(path)
            raise UserError(f"{path}: the file records no preprocessing (exported before mbembed stored it, or "
                            f"by another tool); state it: --set data.crop_fraction=F, and for faces aligned "
                            f"by mbembed align --set data.align_template=NAME --set data.align_size=N{hint}")
        settings = {k: getattr(cfg.data, k) for k in PREPROCESSING_KEYS}
        settings["image_size"] = embedder.image_size
        source = "the config (the file records none)"
    elif recorded is not None:
        settings = dict(recorded)
    else:
        settings = {k: getattr(cfg.data, k) for k in PREPROCESSING_KEYS}
        source = "the config (no run config.yaml beside the checkpoint)"
    settings["image_size"] = embedder.image_size
    for line in notes:
        log(line)
    log(f"preprocessing: {describe(settings)} (from {source})")
    return dataclasses.replace(cfg.data, **settings)


def _report_hint(path: str) -> str:
    """`` (export_report.json beside it says crop_fraction 0.55)`` when an old export's report is there."""
    report = os.path.join(os.path.dirname(os.path.abspath(str(path)).rstrip(os.sep)), "export_report.json")
    try:
        with open(report, encoding="utf-8") as fh:
            return f" (export_report.json beside it says crop_fraction {float(json.load(fh)['crop_fraction']):g})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""
