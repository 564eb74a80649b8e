"""Verification of pairs: embed their images with a model, distance per pair, metrics (train and eval).

- `embed_paths(model_or_fn, data_cfg, paths, batch_size, flip=False)`: embeddings ``[N, D]`` in
  the order of `paths`, each distinct path read and embedded once (LFW pairs repeat images).
- `pair_distances(emb_by_path, pairs, distance)`: one distance per pair.
- `evaluate_pairs(...)`: both, then `mobilenet_embed.metrics.verification_metrics`.

Images go through `mobilenet_embed.data.images_dataset`, the preprocessing training uses (no
augmentation). With `flip`, each embedding is the mean of the image's and its mirror image's
embeddings, L2-normalised again so distances keep their range; the mirror is taken of the
decoded, preprocessed batch, so every image is decoded once.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from mobilenet_embed.config import EVAL_DISTANCES
from mobilenet_embed.embedders import l2_normalize
from mobilenet_embed.errors import UserError

if TYPE_CHECKING:
    import keras

    from mobilenet_embed.config import DataConfig
    from mobilenet_embed.pairs import Pair

ModelOrFn = Union["keras.Model", Callable[[Any], Any]]

DISTANCES = (*EVAL_DISTANCES, "L2")  # L2 too, for pair distances outside eval

_INFERENCE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _embed_fn(model_or_fn: ModelOrFn) -> Callable[[Any], np.ndarray]:
    """A function images -> NumPy embeddings (a Keras model runs in inference mode, traced once)."""
    import keras
    import tensorflow as tf

    if isinstance(model_or_fn, keras.Model):
        fn = _INFERENCE.get(model_or_fn)
        if fn is None:  # one traced function per model, reused by every validation of a run
            model = model_or_fn
            fn = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32), reduce_retracing=True)
            _INFERENCE[model_or_fn] = fn
    elif hasattr(model_or_fn, "embed"):  # an mbembed Embedder (Keras, SavedModel, TFLite)
        fn = model_or_fn.embed
    else:
        fn = model_or_fn

    def run(images):
        out = fn(images)
        return np.asarray(out.numpy() if hasattr(out, "numpy") else out, dtype=np.float32)

    return run


def embed_paths(model_or_fn: ModelOrFn, data_cfg: "DataConfig", paths: Sequence[str], batch_size: int = 64,
                flip: bool = False, batches: Optional[Callable[[list], Iterable[np.ndarray]]] = None
                ) -> np.ndarray:
    """Embeddings ``[len(paths), D]`` of the images at `paths` (each distinct path embedded once).

    `model_or_fn`: a Keras embedding model, an object with ``embed(images)`` (see
    `mobilenet_embed.embedders`), or any callable on preprocessed float32 ``[B, S, S, 3]``
    batches returning ``[B, D]``. `batches`: paths -> preprocessed batches in their order, in
    place of `images_dataset` (e.g. `align.inference.aligned_batches` for raw photos).
    """
    from mobilenet_embed.data import flip_images, images_dataset

    import tensorflow as tf

    paths = [str(p) for p in paths]
    if not paths:
        raise UserError("no images to embed")
    unique = list(dict.fromkeys(paths))
    run = _embed_fn(model_or_fn)
    chunks = []
    try:
        # check=False: each image is read and decoded exactly once (no separate check pass)
        source = batches(unique) if batches is not None else images_dataset(data_cfg, unique, batch_size, check=False)
        for batch in source:
            out = run(batch)
            if flip:
                # the mirror of a preprocessed image is the preprocessed mirror image (the central
                # crop and the resize are symmetric): no second decode
                out = l2_normalize(out + run(flip_images(batch)))
            chunks.append(out)
    except tf.errors.OpError:
        # an image that does not decode: the checked dataset names it (UserError)
        images_dataset(data_cfg, unique, batch_size, check=True)
        raise
    embeddings = np.concatenate(chunks, axis=0)
    if len(embeddings) != len(unique):
        raise UserError(f"embedded {len(embeddings)} images, expected {len(unique)} (unreadable images?)")
    position = {p: i for i, p in enumerate(unique)}
    return embeddings[[position[p] for p in paths]]


def pair_distances(emb_by_path: dict, pairs: Iterable["Pair"], distance: str = "squared-L2") -> np.ndarray:
    """Distance of each pair's two embeddings (``squared-L2``, ``cosine`` = 1 - cos, or ``L2``)."""
    if distance not in DISTANCES:
        raise UserError(f"distance: expected one of {', '.join(DISTANCES)}, received {distance!r}")
    pairs = list(pairs)
    try:
        a = np.stack([np.asarray(emb_by_path[p.path_a], np.float64) for p in pairs])
        b = np.stack([np.asarray(emb_by_path[p.path_b], np.float64) for p in pairs])
    except KeyError as exc:
        raise UserError(f"no embedding for {exc.args[0]}") from None
    if distance == "cosine":
        cos = np.sum(l2_normalize(a) * l2_normalize(b), axis=1)
        return 1.0 - cos
    sq = np.sum(np.square(a - b), axis=1)
    return np.sqrt(sq) if distance == "L2" else sq


def evaluate_pairs(model_or_fn: ModelOrFn, data_cfg: "DataConfig", pairs: Sequence["Pair"], batch_size: int = 64,
                   flip: bool = False, n_folds: int = 10, far_target: float = 1e-3,
                   distance: str = "squared-L2", batches: Optional[Callable[[list], Iterable[np.ndarray]]] = None
                   ) -> dict:
    """`verification_metrics` of `pairs` embedded by `model_or_fn` (plus ``distances``, ``issame``);
    `batches` as in `embed_paths`."""
    from mobilenet_embed.metrics import verification_metrics

    pairs = list(pairs)
    if not pairs:
        raise UserError("no pairs to evaluate")
    paths = list(dict.fromkeys([p.path_a for p in pairs] + [p.path_b for p in pairs]))
    emb = embed_paths(model_or_fn, data_cfg, paths, batch_size, flip=flip, batches=batches)
    emb_by_path = dict(zip(paths, emb))
    distances = pair_distances(emb_by_path, pairs, distance)
    issame = np.array([bool(p.issame) for p in pairs])
    folds = min(n_folds, len(pairs))
    metrics = verification_metrics(distances, issame, n_folds=folds, far_target=far_target, distance=distance)
    metrics["distances"] = distances
    metrics["issame"] = issame
    return metrics
