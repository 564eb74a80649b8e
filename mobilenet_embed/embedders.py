"""One inference code path (the runtimes) for every kind of model mbembed writes: Keras, SavedModel, TFLite.

An `Embedder` maps preprocessed images (float32 ``[N, S, S, 3]`` in [-1, 1], as
`mobilenet_embed.data.preprocess_images` makes them) to L2-normalised embeddings
(float32 ``[N, D]``). `mbembed eval`, `mbembed export` (parity report, verification
accuracy) and `mbembed export embeddings` all go through `load_embedder`, so an exported
SavedModel or .tflite file is evaluated exactly as the checkpoint it came from.

    >>> embedder = load_embedder("exports/model_int8.tflite", num_threads=2)
    >>> embedder.image_size, embedder.embedding_size
    (160, 128)
    >>> embeddings = embedder.embed(images)          # images: float32 [N, 160, 160, 3]

What `load_embedder(path)` accepts, by what `path` is:

* ``*.tflite``: `TFLiteEmbedder` (float32, float16 or full-integer int8 files);
* a directory holding ``saved_model.pb``: `SavedModelEmbedder`;
* a ``*.keras`` / ``*.weights.h5`` file, a training checkpoint directory (``ckpt-<step>/``,
  ``best-<step>/``) or a run directory (its best checkpoint, else its latest, else its final
  ``model.keras``): `KerasEmbedder`, via `mobilenet_embed.checkpoints.load_checkpoint_model`.

The input contract of every embedder is the preprocessed float image; quantised TFLite
models get their inputs quantised (and outputs dequantised and re-normalised) inside
`TFLiteEmbedder.embed`. Preprocess to `embedder.image_size`, with `embedder.crop_fraction`
when it is known (else the config's ``data.crop_fraction``).

How images must be preprocessed is recorded inside every exported file
(`mobilenet_embed.preprocessing_metadata`): `embedder.metadata` is that record (None for a file
without one), `embedder.recorded` its ``data.*`` values (or a run config's, for a checkpoint)
and `embedder.recorded_from` where they come from; `preprocessing_metadata.model_data_config`
turns them into the data config `eval` and `export embeddings` read images with.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Protocol, runtime_checkable

import numpy as np

from mobilenet_embed.errors import UserError
from mobilenet_embed.quiet import quiet_native

if TYPE_CHECKING:
    import keras

    from mobilenet_embed.config import Config

#: name of the SavedModel signature on raw uint8 images (what TF Serving calls by default)
RAW_SIGNATURE = "serving_default"
#: name of the SavedModel signature on preprocessed float32 images (what TFLite is converted from)
PREPROCESSED_SIGNATURE = "embed_preprocessed"
#: output key of both signatures
OUTPUT_KEY = "embeddings"


@runtime_checkable
class Embedder(Protocol):
    """Preprocessed images float32 [N, S, S, 3] in [-1, 1] -> L2-normalised float32 [N, D]."""

    kind: str
    image_size: int
    embedding_size: int
    crop_fraction: Optional[float]  # preprocessing the model expects, None when unknown
    recorded: Optional[dict]  # data.* preprocessing values the model records (file metadata, run config)
    recorded_from: Optional[str]  # where `recorded` comes from, for messages

    def embed(self, images: np.ndarray) -> np.ndarray:
        ...


def _check_images(images: Any, image_size: int, where: str) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1:] != (image_size, image_size, 3):
        raise UserError(f"{where}: expected preprocessed images [N, {image_size}, {image_size}, 3], "
                        f"received shape {list(images.shape)}")
    return images


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of `x` scaled to unit length (rows of zeros stay zero); float64 stays float64, any
    other input becomes float32."""
    x = np.asarray(x)
    x = x if x.dtype == np.float64 else x.astype(np.float32, copy=False)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, eps)


class _BatchedEmbedder:
    """Shared batching: `embed` splits the input into batches of at most `batch_size`."""

    kind = "?"
    image_size: int
    embedding_size: int
    batch_size: int = 64
    crop_fraction: Optional[float] = None  # set by `load_embedder` when known
    metadata: Optional[dict] = None  # the preprocessing record inside an exported file
    recorded: Optional[dict] = None  # set by `load_embedder`: data.* values the model records
    recorded_from: Optional[str] = None
    notes: tuple = ()  # lines about user settings applied over the recorded ones

    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def embed(self, images: np.ndarray) -> np.ndarray:
        images = _check_images(images, self.image_size, f"{self.kind} embedder")
        if len(images) == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        out = [self._embed_batch(images[i:i + self.batch_size])
               for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out).astype(np.float32, copy=False)

    __call__ = embed

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_size={self.image_size}, "
                f"embedding_size={self.embedding_size})")


class KerasEmbedder(_BatchedEmbedder):
    """A Keras embedding model, called in inference mode inside one `tf.function`."""

    kind = "keras"

    def __init__(self, model: "keras.Model", batch_size: int = 64):
        import tensorflow as tf

        shape = model.input_shape
        if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 3:
            raise UserError(f"expected an embedding model on images [N, S, S, 3], "
                            f"received input shape {shape}")
        self.model = model
        self.image_size = int(shape[1])
        self.embedding_size = int(model.output_shape[-1])
        self.batch_size = batch_size
        spec = tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.float32)
        self._fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])

    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        return self._fn(batch).numpy()


class SavedModelEmbedder(_BatchedEmbedder):
    """A SavedModel, called through its preprocessed-float signature (`embed_preprocessed`).

    Other SavedModels work too when they have a signature on float32 [N, S, S, 3] with one
    output (e.g. Keras' `model.export()`). `embed_raw` calls the raw-uint8 signature of
    mbembed exports (`serving_default`), which preprocesses inside the graph.
    """

    kind = "saved_model"

    def __init__(self, path: str, batch_size: int = 64):
        import tensorflow as tf

        self.path = str(path)
        try:
            self.loaded = tf.saved_model.load(self.path)
        except Exception as exc:  # noqa: BLE001 - TF raises many types for a bad directory
            raise UserError(f"{self.path}: cannot load SavedModel: {str(exc).splitlines()[0]}") from None
        signatures = dict(self.loaded.signatures)
        self.signature_name, self._fn = self._float_signature(signatures)
        spec = self._input_spec(self._fn)
        self.image_size = int(spec.shape[1])
        outputs = self._fn.structured_outputs
        self._output_key = OUTPUT_KEY if OUTPUT_KEY in outputs else next(iter(outputs))
        self.embedding_size = int(outputs[self._output_key].shape[-1])
        self._input_name = self._input_key(self._fn)
        self._raw = signatures.get(RAW_SIGNATURE)
        if self._raw is not None and self._input_spec(self._raw).dtype != tf.uint8:
            self._raw = None
        self.batch_size = batch_size
        from mobilenet_embed.preprocessing_metadata import read_saved_model_asset, read_saved_model_object

        self.metadata = read_saved_model_object(self.loaded, self.path) or read_saved_model_asset(self.path)

    @staticmethod
    def _input_key(fn) -> str:
        return next(iter(fn.structured_input_signature[1]))

    @classmethod
    def _input_spec(cls, fn):
        kwargs = fn.structured_input_signature[1]
        return kwargs[cls._input_key(fn)]

    def _float_signature(self, signatures: dict):
        import tensorflow as tf

        order = [PREPROCESSED_SIGNATURE] + sorted(k for k in signatures if k != PREPROCESSED_SIGNATURE)
        for name in order:
            fn = signatures.get(name)
            if fn is None or len(fn.structured_input_signature[1]) != 1:
                continue
            spec = self._input_spec(fn)
            shape = spec.shape
            if (spec.dtype == tf.float32 and shape.rank == 4 and shape[1] is not None
                    and shape[1] == shape[2] and shape[3] == 3):
                return name, fn
        raise UserError(f"{self.path}: no signature on preprocessed float32 images [N, S, S, 3] "
                        f"(signatures: {', '.join(signatures) or 'none'})")

    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        return self._fn(**{self._input_name: tf.constant(batch)})[self._output_key].numpy()

    def embed_raw(self, images: np.ndarray) -> np.ndarray:
        """Raw uint8 images [N, H, W, 3] (any H, W) through the `serving_default` signature."""
        import tensorflow as tf

        if self._raw is None:
            raise UserError(f"{self.path}: no raw-image signature '{RAW_SIGNATURE}' on uint8 input")
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(f"expected uint8 images [N, H, W, 3], received {images.dtype} "
                            f"{list(images.shape)}")
        out = self._raw(**{self._input_key(self._raw): tf.constant(images)})
        return out[OUTPUT_KEY if OUTPUT_KEY in out else next(iter(out))].numpy()


class TFLiteEmbedder(_BatchedEmbedder):
    """A .tflite file run with `ai_edge_litert`.

    Float models take the preprocessed images as they are. Quantised models (int8/uint8
    input) get them quantised with the input's scale and zero point, and their output
    dequantised and re-normalised to unit length (int8 rounding leaves it near, not at, 1).
    A model with a dynamic batch dimension is resized to the batch (at most `batch_size`);
    a fixed batch-1 model is called image by image.
    """

    kind = "tflite"

    def __init__(self, path: str, num_threads: Optional[int] = None, batch_size: int = 32):
        from ai_edge_litert.interpreter import Interpreter

        self.path = str(path)
        self.num_threads = num_threads
        try:
            with quiet_native():  # the interpreter's native INFO lines on fd 2
                self.interpreter = Interpreter(model_path=self.path, num_threads=num_threads)
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"{self.path}: cannot load TFLite model: {str(exc).splitlines()[0]}") from None
        inputs = self.interpreter.get_input_details()
        outputs = self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"{self.path}: expected one input and one output, received "
                            f"{len(inputs)} and {len(outputs)}")
        self._in, self._out = inputs[0], outputs[0]
        shape = list(self._in["shape_signature"])
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3 or shape[1] < 1:
            raise UserError(f"{self.path}: expected input [N, S, S, 3], received {shape}")
        self.image_size = int(shape[1])
        self.embedding_size = int(self._out["shape_signature"][-1])
        self.dynamic_batch = shape[0] == -1
        self.batch_size = batch_size if self.dynamic_batch else 1
        self.input_dtype = np.dtype(self._in["dtype"])
        self.output_dtype = np.dtype(self._out["dtype"])
        self.input_quantization = tuple(self._in["quantization"])  # (scale, zero_point)
        self.output_quantization = tuple(self._out["quantization"])
        self.quantized = self.input_dtype in (np.int8, np.uint8)
        self._batch = None
        from mobilenet_embed.preprocessing_metadata import read_tflite_metadata

        with open(self.path, "rb") as fh:
            self.metadata = read_tflite_metadata(fh.read(), self.path)

    def _resize(self, n: int) -> None:
        if self._batch == n:
            return
        if self.dynamic_batch or self._batch is None:
            if self.dynamic_batch:
                self.interpreter.resize_tensor_input(
                    self._in["index"], [n, self.image_size, self.image_size, 3], strict=True)
            with quiet_native():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
                self.interpreter.allocate_tensors()
        self._batch = n

    def _quantize(self, batch: np.ndarray) -> np.ndarray:
        if not self.quantized:
            return batch.astype(self.input_dtype, copy=False)
        scale, zero = self.input_quantization
        info = np.iinfo(self.input_dtype)
        q = np.round(batch / scale + zero)
        return np.clip(q, info.min, info.max).astype(self.input_dtype)

    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        self._resize(len(batch))
        self.interpreter.set_tensor(self._in["index"], self._quantize(batch))
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self._out["index"])
        if self.output_dtype in (np.int8, np.uint8):
            scale, zero = self.output_quantization
            out = (out.astype(np.float32) - zero) * scale
            return l2_normalize(out)
        return out.astype(np.float32)

    def input_contract(self) -> dict:
        """What a device program must feed: dtype, shape and (quantised models) scale/zero point.

        float input: preprocessed float32 in [-1, 1]; int8 input: round(x / scale + zero_point)
        of those values, clipped to [-128, 127].
        """
        contract = {"dtype": self.input_dtype.name,
                    "shape": [int(d) for d in self._in["shape_signature"]],
                    "values": "preprocessed image in [-1, 1] (resize, scale: x / 127.5 - 1)"}
        if self.quantized:
            scale, zero = self.input_quantization
            contract.update(scale=float(scale), zero_point=int(zero),
                            values="round(preprocessed / scale + zero_point), clipped")
            oscale, ozero = self.output_quantization
            contract["output"] = {"dtype": self.output_dtype.name, "scale": float(oscale),
                                  "zero_point": int(ozero),
                                  "values": "(q - zero_point) * scale, then L2-normalise"}
        return contract


def is_saved_model(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "saved_model.pb"))


def exported_preprocessing(path: str) -> Optional[dict]:
    """``{"image_size", "crop_fraction"}`` recorded by `mbembed export` for an exported model
    (from the ``export_report.json`` beside a .tflite file or a SavedModel directory), or None."""
    import json

    report = os.path.join(os.path.dirname(os.path.abspath(str(path)).rstrip(os.sep)), "export_report.json")
    try:
        with open(report, encoding="utf-8") as fh:
            data = json.load(fh)
        return {"image_size": int(data["image_size"]), "crop_fraction": float(data["crop_fraction"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_embedder(path: str, cfg: Optional["Config"] = None, num_threads: Optional[int] = None,
                  batch_size: Optional[int] = None) -> Embedder:
    """The `Embedder` for `path`, chosen by what it is (see the module doc).

    `cfg` matters for checkpoints (weights-only files are built from `cfg.model`; a run
    directory's own config wins, with the user's ``--set`` keys applied over it, see
    `checkpoints.config_for_checkpoint`); `num_threads` only for .tflite files (None: the
    runtime's default). `recorded` / `recorded_from` / `notes` say which preprocessing the model
    records (an exported file's metadata, a run's config) and which user settings changed it.
    The embedder's `crop_fraction` is the one its images must be preprocessed with when known
    (the metadata, a run's config, or for older exports the export report beside the file),
    else None: then use ``cfg.data.crop_fraction``. `image_size` is always known.
    """
    from mobilenet_embed.preprocessing_metadata import PREPROCESSING_KEYS, data_settings

    path = str(path)
    kwargs = {} if batch_size is None else {"batch_size": batch_size}
    if not os.path.exists(path):
        raise UserError(f"{path}: model not found")
    if path.endswith(".tflite") or is_saved_model(path):
        embedder = (TFLiteEmbedder(path, num_threads=num_threads, **kwargs) if path.endswith(".tflite")
                    else SavedModelEmbedder(path, **kwargs))
        if embedder.metadata is not None:
            recorded = data_settings(embedder.metadata)
            if recorded["image_size"] != embedder.image_size:
                raise UserError(f"{path}: damaged preprocessing metadata (image_size {recorded['image_size']}, "
                                f"the model's input is {embedder.image_size})")
            embedder.recorded, embedder.recorded_from = recorded, f"the metadata inside {path}"
            embedder.crop_fraction = recorded["crop_fraction"]
        else:
            legacy = exported_preprocessing(path)
            if legacy is not None and legacy["image_size"] == embedder.image_size:
                embedder.crop_fraction = legacy["crop_fraction"]
        return embedder
    from mobilenet_embed.checkpoints import config_for_checkpoint, load_checkpoint_model, run_config_path
    from mobilenet_embed.config import given_settings

    model, used = load_checkpoint_model(path, cfg)
    embedder = KerasEmbedder(model, **kwargs)
    embedder.path = path
    found = run_config_path(path)
    notes: list = []
    wanted = config_for_checkpoint(cfg, path, notes) if found is not None else cfg
    if (cfg is not None and "data.image_size" in given_settings(cfg)["set"]
            and wanted.data.image_size != embedder.image_size):
        raise UserError(f"--set data.image_size={wanted.data.image_size}: {path} is a whole Keras model with a "
                        f"fixed {embedder.image_size}x{embedder.image_size} input; use a training checkpoint "
                        "(a run directory) to run it at another size")
    if found is not None:
        embedder.crop_fraction = used.data.crop_fraction
        embedder.recorded = {k: getattr(wanted.data, k) for k in PREPROCESSING_KEYS}
        embedder.recorded["image_size"] = embedder.image_size
        embedder.recorded_from, embedder.notes = f"the checkpoint's run ({found})", tuple(notes)
    return embedder
