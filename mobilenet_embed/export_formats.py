"""The export formats: a SavedModel with two signatures, and TFLite files (float32, float16, int8).

* ``saved_model/`` (`export_saved_model`): ``serving_default`` takes raw images (uint8
  ``[N, H, W, 3]``, any H and W) and preprocesses them inside the graph with the very function
  training uses (`mobilenet_embed.data.preprocess_images`: central crop, resize, scale to
  [-1, 1]); ``embed_preprocessed`` takes float32 ``[N, S, S, 3]`` already preprocessed. Both
  return ``{"embeddings": float32 [N, D]}``, L2-normalised. No Python is needed to serve it
  (TF Serving, `tf.saved_model.load`).
* ``model_float32.tflite``, ``model_float16.tflite`` (float16 weights, float32 compute on
  CPU), ``model_int8.tflite`` (full-integer post-training quantisation, int8 input and
  output, calibrated on representative images) (`export_tflite`): converted from the
  ``embed_preprocessed`` signature with builtin ops only. Their input is the preprocessed image
  (batch dimension dynamic); for int8 the input is ``round(x / scale + zero_point)``. A model
  that would need Flex (TF Select) ops is refused with the ops named.

Both carry the model's preprocessing record (image size, crop, alignment, normalisation,
embedding size, distance, mbembed version; `mobilenet_embed.preprocessing_metadata`): the
SavedModel as a variable collection ``mbembed_preprocessing`` and as
``assets.extra/mbembed_preprocessing.json``, each .tflite file as the ``mbembed_preprocessing``
entry of its flatbuffer metadata (copied from the SavedModel it is converted from). A file
copied away alone still says how to feed it (`mbembed eval --model FILE` reads it).

`FORMATS` (`mobilenet_embed.config.EXPORT_FORMATS`) is the one list of format names (the config's
``export.formats`` choices and ``mbembed export --format``); `FILENAMES` their names under an
output directory.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from mobilenet_embed import atomic
from mobilenet_embed.config import EXPORT_FORMATS
from mobilenet_embed.embedders import OUTPUT_KEY, PREPROCESSED_SIGNATURE, RAW_SIGNATURE
from mobilenet_embed.errors import UserError

if TYPE_CHECKING:
    import keras

FORMATS = EXPORT_FORMATS
TFLITE_KINDS = {"tflite_float32": "float32", "tflite_float16": "float16", "tflite_int8": "int8"}
#: file (or directory) name of each format under the output directory
FILENAMES = {
    "saved_model": "saved_model",
    "tflite_float32": "model_float32.tflite",
    "tflite_float16": "model_float16.tflite",
    "tflite_int8": "model_int8.tflite",
}


def check_formats(formats: Sequence[str]) -> list[str]:
    """`formats` in canonical order without duplicates; unknown names or none are a `UserError`."""
    formats = list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UserError(f"export formats: unknown {', '.join(map(repr, unknown))}; expected some of "
                        f"{', '.join(FORMATS)}")
    if not formats:
        raise UserError("export formats: expected at least one format, received []")
    return [f for f in FORMATS if f in formats]


# --------------------------------------------------------------------------- SavedModel


def export_saved_model(model: "keras.Model", path: str, image_size: Optional[int] = None,
                       crop_fraction: float = 1.0, metadata: Optional[dict] = None) -> str:
    """Write `model` as a SavedModel at `path` with two signatures (see the module doc):
    ``serving_default`` on raw uint8 images [N, H, W, 3] (any H, W), preprocessed in the graph
    by `preprocess_images(images, image_size, crop_fraction)`, and ``embed_preprocessed`` on
    float32 [N, S, S, 3]. Both return ``{"embeddings": [N, D]}``. Returns `path`.

    `metadata` (`preprocessing_metadata.build_metadata`, e.g. with the alignment and distance
    of the run) is stored inside; its image size and crop are always those of the graph. None:
    a record of `image_size` and `crop_fraction`, not aligned.
    """
    import json

    import keras
    import tensorflow as tf

    from mobilenet_embed.config import DataConfig
    from mobilenet_embed.data import preprocess_images
    from mobilenet_embed.preprocessing_metadata import METADATA_NAME, build_metadata, write_saved_model_asset

    size = int(model.input_shape[1])
    if image_size is not None and int(image_size) != size:
        raise UserError(f"export: image_size {image_size} differs from the model's input size {size}")

    def embed_raw(images):
        return {OUTPUT_KEY: model(preprocess_images(images, size, crop_fraction), training=False)}

    def embed_preprocessed(images):
        return {OUTPUT_KEY: model(images, training=False)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(RAW_SIGNATURE, embed_raw, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    archive.add_endpoint(PREPROCESSED_SIGNATURE, embed_preprocessed, input_signature=[
        tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
    if metadata is None:
        metadata = build_metadata(DataConfig(), int(model.output_shape[-1]))
    metadata = {**metadata, "image_size": size, "crop_fraction": float(crop_fraction)}
    archive.add_variable_collection(METADATA_NAME, [tf.Variable(json.dumps(metadata), trainable=False,
                                                                name=METADATA_NAME)])
    archive.write_out(str(path), verbose=False)
    write_saved_model_asset(str(path), metadata)
    return str(path)


# --------------------------------------------------------------------------- TFLite


_FLEX_PATTERNS = (
    re.compile(r"TF Select ops: ([^\n]+)"),
    re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op"),
)


def flex_ops_in(message: str) -> list[str]:
    """TensorFlow op names a failed conversion reports as needing Flex (TF Select)."""
    ops: list[str] = []
    for pattern in _FLEX_PATTERNS:
        for match in pattern.finditer(message):
            for name in re.split(r"[,\s]+", match.group(1)):
                name = name.strip().removeprefix("tf.")
                if name and name not in ops:
                    ops.append(name)
    return ops


def export_tflite(saved_model_dir: str, path: str, kind: str,
                  representative_images: Optional[np.ndarray] = None,
                  signature: str = PREPROCESSED_SIGNATURE) -> str:
    """Convert `signature` of a SavedModel to a .tflite file at `path`, builtin ops only.

    `kind`: ``float32``; ``float16`` (weights stored as float16); ``int8`` (full-integer
    post-training quantisation with int8 input and output, calibrated on
    `representative_images`, preprocessed float32 [N, S, S, 3]). Raises `UserError` naming the
    ops when the model needs Flex ops, which devices do not have. The SavedModel's preprocessing
    record (``assets.extra``), when it has one, goes into the file's metadata. Returns `path`.
    """
    import tensorflow as tf

    from mobilenet_embed.preprocessing_metadata import add_tflite_metadata, read_saved_model_asset

    kind = TFLITE_KINDS.get(kind, kind)
    if kind not in ("float32", "float16", "int8"):
        raise UserError(f"tflite kind: expected float32, float16 or int8, received {kind!r}")
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=[signature])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if kind == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif kind == "int8":
        if representative_images is None or len(representative_images) == 0:
            raise UserError("tflite int8: calibration needs representative images, received none")
        calibration = np.asarray(representative_images, np.float32)

        def representative_dataset():
            for image in calibration:
                yield [image[None]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    try:
        flatbuffer = converter.convert()
    except Exception as exc:  # noqa: BLE001 - ConverterError and friends are not public types
        message = str(exc)
        ops = flex_ops_in(message)
        if ops:
            raise UserError(
                f"tflite {kind}: {saved_model_dir}: the model uses TensorFlow ops with no TFLite "
                f"builtin: {', '.join(ops)}. They would need Flex (TF Select) ops, which devices do "
                "not have; replace them with ops TFLite supports "
                "(https://ai.google.dev/edge/litert/models/ops_compatibility)") from None
        if type(exc).__name__ != "ConverterError":
            raise
        lines = [ln.strip() for ln in message.splitlines() if "error" in ln.lower()]
        raise UserError(f"tflite {kind}: {saved_model_dir}: conversion failed: "
                        f"{(lines or [message.strip()])[-1][:500]}") from None
    metadata = read_saved_model_asset(str(saved_model_dir))
    if metadata is not None:
        flatbuffer = add_tflite_metadata(flatbuffer, metadata)
    return atomic.write_bytes(str(path), flatbuffer)


