"""tf.data pipelines: `pk_batches` for training, `images_dataset` for evaluation and export.

`pk_batches` builds, per step, a *plan* (which P identities, which K images of each, one
six uniform augmentation draws per image: pure stateless TF, see `sampler`), then loads the P*K images of
the plan and batches them. Steps are loaded concurrently (`interleave` with
``num_parallel_calls=AUTOTUNE``, deterministic order), each step's images one after the other
inside its own small dataset, then `prefetch`. Per image: read (or take the record's bytes, or
render the synthetic image), decode (TF ops; Pillow only for files the check routed there),
augment or preprocess. No Python runs per image for TF-decodable formats.

Unreadable files during training. The check in `build_index` decodes every file and is the
gate: training sees only files that passed it. A file that turns unreadable afterwards makes
its step's small dataset fail; `ignore_errors` then drops that whole batch (so every batch that
comes out is still exactly P x K) and, when a `DataCounters` is passed, the skipped step is
counted in ``counters.skipped_batches`` for the training log. Training never crashes on it.

Determinism and resumption: batch n depends only on (cfg.seed, worker_index, num_workers, n)
and the data; ``start_step=n`` starts the stream at batch n. A skipped batch is a missing
step (the stream does not shift).

Distribution: batches are identity-major (K images of the first identity, then the second,
...), so the R contiguous slices `strategy.experimental_distribute_dataset` makes of a batch
hold P/R whole identities each (P must be a multiple of R). Workers shard explicitly (seeds
and identity groups per worker for folder/synthetic, shard files for tfrecord): the dataset
carries ``AutoShardPolicy.OFF``.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import tensorflow as tf

from mobilenet_embed.data import decode, sampler, synthetic, tfrecord
from mobilenet_embed.data.index import ImageIndex, build_index, split_identities
from mobilenet_embed.data.preprocess import (color_jitter, crop_resize_decoded, crop_resize_encoded,
                                             preprocess_images)
from mobilenet_embed.errors import UserError
from mobilenet_embed.image_files import display_path

_INF = np.iinfo(np.int64).max


class DataCounters:
    """Counters the training pipeline updates (pass one to `pk_batches`; log `.as_dict()`).

    ``skipped_batches``: batches dropped because an image could not be read or decoded after
    the index check (each such batch held at least one unreadable image).
    """

    def __init__(self) -> None:
        with tf.init_scope():
            self.skipped_batches = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_batches")
            self.last_step = tf.Variable(-1, dtype=tf.int64, trainable=False, name="last_data_step")

    def as_dict(self) -> dict:
        return {"skipped_batches": int(self.skipped_batches.numpy())}


def _options(dataset: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)


def _crop_jitter(data_cfg) -> tuple[float, float, float]:
    """(min_crop, max_crop, shift) of the random crop, from `data.augment_*`."""
    return data_cfg.augment_min_crop, data_cfg.augment_max_crop, data_cfg.augment_shift


def _from_decoded(data_cfg, augment: bool):
    """Decoded uint8/float image + augmentation draws -> float32 [S, S, 3] (0..255 when augmenting:
    `color_jitter` runs on the batch; else the final [-1, 1] preprocessing)."""
    size, crop, jitter = data_cfg.image_size, data_cfg.crop_fraction, _crop_jitter(data_cfg)
    if augment:
        return lambda image, draws: crop_resize_decoded(image, draws, size, crop, *jitter)
    return lambda image, draws: preprocess_images(image, size, crop)


def _from_bytes(data_cfg, augment: bool):
    """Encoded bytes + augmentation draws -> float32 [S, S, 3] (TF decoders only), as `_from_decoded`."""
    size, crop, jitter = data_cfg.image_size, data_cfg.crop_fraction, _crop_jitter(data_cfg)
    if augment:
        return lambda contents, draws: crop_resize_encoded(contents, draws, size, crop, *jitter)
    return lambda contents, draws: preprocess_images(decode.decode_image_bytes(contents), size, crop)


def _batch_finish(data_cfg, augment: bool):
    """What runs on each whole batch: `color_jitter` when augmenting, else nothing."""
    if not augment:
        return None
    return lambda images, draws: color_jitter(images, draws, data_cfg.augment_brightness, data_cfg.augment_contrast)


def _file_loader(data_cfg, augment: bool, any_pillow: bool):
    """(path, pillow flag, draws) -> float32 [S, S, 3]."""
    from_bytes = _from_bytes(data_cfg, augment)
    from_decoded = _from_decoded(data_cfg, augment)

    def load(path, pillow, draws):
        if not any_pillow:
            return from_bytes(tf.io.read_file(path), draws)
        return tf.cond(pillow, lambda: from_decoded(decode.pillow_decode_tf(path), draws),
                       lambda: from_bytes(tf.io.read_file(path), draws))

    return load


def _synthetic_loader(data_cfg, augment: bool):
    tables = synthetic.SyntheticTables.from_config(data_cfg)
    from_decoded = _from_decoded(data_cfg, augment)

    atlas = tables.atlas(data_cfg.image_size)
    if atlas is not None:  # rendered once up front: each image is drawn many times in training
        per_identity = tables.images_per_identity

        def load(identity, image, draws):
            row = tf.cast(identity, tf.int64) * per_identity + tf.cast(image, tf.int64)
            return from_decoded(tf.cast(tf.gather(atlas, row), tf.float32), draws)

        return load, tables

    def load(identity, image, draws):
        return from_decoded(tables.render(identity, image, data_cfg.image_size), draws)

    return load, tables


def _synthetic_ids(index: ImageIndex, tables: synthetic.SyntheticTables):
    ids, imgs = np.zeros(len(index), np.int64), np.zeros(len(index), np.int64)
    for i, key in enumerate(index.paths):
        a, b = synthetic.parse_key(key)
        tables.check_key(a, b, key)
        ids[i], imgs[i] = a, b
    return ids, imgs


def _check_pk(cfg, num_replicas: int, worker_index: int, num_workers: int) -> tuple[int, int]:
    p, k = cfg.train.identities_per_batch, cfg.train.images_per_identity
    if num_replicas < 1 or p % num_replicas:
        raise UserError(f"train.identities_per_batch: expected a multiple of the number of replicas "
                        f"({num_replicas}), received {p}")
    if num_workers < 1 or not 0 <= worker_index < num_workers:
        raise UserError(f"worker_index: expected 0..{num_workers - 1}, received {worker_index}")
    return p, k


def _batches(plans: tf.data.Dataset, load_one, finish, pk: int, start_step: int,
             counters: Optional[DataCounters], shared: int = 0) -> tf.data.Dataset:
    """Plans (shared..., sources..., labels, draws, step) -> (images, labels) batches (module doc).

    ``load_one(*shared, *source_row, draws_row)``: the first `shared` plan entries are passed
    whole to every image (the TFRecord round's contents), the sources row by row.
    """

    def one_step(*plan):
        common, (*sources, labels, draws, step) = plan[:shared], plan[shared:]
        images = tf.data.Dataset.from_tensor_slices((tuple(sources), draws)).map(
            lambda src, row: load_one(*common, *src, row))
        batch = images.batch(pk, drop_remainder=True)
        if finish is None:
            return batch.map(lambda x: (x, tf.cast(labels, tf.int32), step))
        return batch.map(lambda x: (finish(x, draws), tf.cast(labels, tf.int32), step))

    # One step (P*K images, decoded one after the other) per parallel call, as many calls as CPUs:
    # AUTOTUNE ramps up too slowly for such coarse elements (measured: one core busy of two).
    cycle = max(2, os.cpu_count() or 1)
    ds = plans.interleave(one_step, cycle_length=cycle, block_length=1, num_parallel_calls=cycle,
                          deterministic=True)
    ds = ds.ignore_errors()
    if counters is None:
        ds = ds.map(lambda x, y, step: (x, y))
    else:
        first = tf.constant(int(start_step), tf.int64)

        def count(x, y, step):
            last = counters.last_step.read_value()
            expected = tf.where(last < 0, first, last + 1)
            up = counters.skipped_batches.assign_add(tf.maximum(step - expected, 0))
            with tf.control_dependencies([up]):
                mark = counters.last_step.assign(step)
            with tf.control_dependencies([mark]):
                return tf.identity(x), tf.identity(y)

        ds = ds.map(count)
    return _options(ds.prefetch(tf.data.AUTOTUNE))


def _index_plans(index: ImageIndex, sources: tuple, p: int, k: int, seed: int, start_step: int,
                 worker_index: int, num_workers: int, min_images: int, sampling: str = "pk") -> tf.data.Dataset:
    """Per-step plans over an in-memory index (folder and synthetic sources); `sampling` "pk" or
    "uniform" (`sampler.uniform_rows`: P*K images drawn over the usable identities' images)."""
    counts_all = index.counts()
    usable = np.flatnonzero(counts_all >= max(1, min_images))
    if len(usable) < p * num_workers:
        who = f" ({num_workers} workers x P)" if num_workers > 1 else ""
        raise UserError(f"train.identities_per_batch: expected at most the number of usable identities"
                        f"{who} ({len(usable) // num_workers}), received {p}")
    order = np.argsort(index.labels, kind="stable")
    offsets_all = np.concatenate([[0], np.cumsum(counts_all)[:-1]])
    counts = tf.constant(counts_all[usable], tf.int64)
    offsets = tf.constant(offsets_all[usable], tf.int64)
    labels_of = tf.constant(usable, tf.int64)
    sources = tuple(tf.constant(np.asarray(s)[order]) for s in sources)
    if sampling == "uniform":
        return _uniform_plans(counts_all, offsets_all, usable, sources, p * k, seed, start_step, worker_index,
                              num_workers)

    def plan(step):
        ids = sampler.choose_identities(len(usable), p, step,
                                        lambda n: sampler.fold_key(seed, sampler.TAG_PASS, num_workers, n),
                                        group=num_workers, member=worker_index)
        key = sampler.fold_key(seed, sampler.TAG_STEP, worker_index, step)
        rows, owners = sampler.pk_plan(offsets, counts, ids, k, key)
        picked = tuple(tf.gather(s, rows) for s in sources)
        return (*picked, tf.gather(labels_of, owners), sampler.image_draws(key, p * k), step)

    return tf.data.Dataset.range(start_step, _INF).map(plan)


def _uniform_plans(counts_all: np.ndarray, offsets_all: np.ndarray, usable: np.ndarray, sources: tuple,
                   batch: int, seed: int, start_step: int, worker_index: int,
                   num_workers: int) -> tf.data.Dataset:
    """Per-step plans of `batch` images drawn uniformly (without replacement within a pass) from
    the images of the `usable` identities of a label-sorted index."""
    rows_all = np.concatenate([np.arange(offsets_all[u], offsets_all[u] + counts_all[u]) for u in usable])
    if len(rows_all) < batch * num_workers:
        who = " per worker" if num_workers > 1 else ""
        raise UserError(f"train.identities_per_batch: with data.sampling 'uniform' P x K{who} must be at most the "
                        f"number of usable images ({len(rows_all) // num_workers}), received {batch}")
    rows_of = tf.constant(rows_all, tf.int64)
    labels_of = tf.constant(np.repeat(usable, counts_all[usable]), tf.int64)

    def plan(step):
        picked_rows = sampler.uniform_rows(len(rows_all), batch, step, seed, worker_index, num_workers)
        rows = tf.gather(rows_of, picked_rows)
        picked = tuple(tf.gather(s, rows) for s in sources)
        key = sampler.fold_key(seed, sampler.TAG_STEP, worker_index, step)
        return (*picked, tf.gather(labels_of, picked_rows), sampler.image_draws(key, batch), step)

    return tf.data.Dataset.range(start_step, _INF).map(plan)


def train_val_indexes(cfg) -> tuple[ImageIndex, ImageIndex, "DataReport"]:  # noqa: F821
    """`build_index(cfg.data)` split by `split_identities(data.val_identities, cfg.seed)`."""
    index, report = build_index(cfg.data, check=True)
    train, val = split_identities(index, cfg.data.val_identities, cfg.seed)
    return train, val, report


def pk_batches(cfg, index: Optional[ImageIndex] = None, start_step: int = 0, num_replicas: int = 1,
               worker_index: int = 0, num_workers: int = 1,
               counters: Optional[DataCounters] = None) -> tf.data.Dataset:
    """Endless training batches ``(images float32 [P*K, S, S, 3], labels int32 [P*K])``.

    With ``data.sampling: uniform``, P*K images drawn uniformly over all usable images instead
    (`sampler.uniform_rows`; for margin heads, whose batch need not hold positive pairs).
    Otherwise exactly K images of each of P distinct identities per batch, identity-major; augmented when
    `data.augment`. `index`: the identities and images to train on (default: `build_index` of
    `cfg.data` minus the validation identities of `split_identities`). Batch n is a function of
    (cfg.seed, worker_index, num_workers, n): ``start_step=n`` resumes the sampler. `num_replicas`:
    the total number of replicas (P must be a multiple). `counters`: see `DataCounters`.
    """
    data_cfg = cfg.data
    p, k = _check_pk(cfg, num_replicas, worker_index, num_workers)
    if start_step < 0:
        raise UserError(f"start_step: expected an integer >= 0, received {start_step}")
    if index is None:
        index, _, _ = train_val_indexes(cfg)
    augment = bool(data_cfg.augment)
    seed = int(cfg.seed)
    sampling = getattr(data_cfg, "sampling", "pk")
    if data_cfg.source == "tfrecord":
        uniform = sampling == "uniform"
        man = tfrecord.load_manifest(data_cfg.path)
        plan = tfrecord.RoundPlan(man, index, p, k, data_cfg.shuffle_buffer, worker_index, num_workers, uniform)
        plans = tfrecord.tfrecord_pk_plans(man, plan, p, k, seed, start_step, worker_index, uniform)
        from_bytes = _from_bytes(data_cfg, augment)

        def load(content, pos, length, draws):
            return from_bytes(tf.strings.substr(content, pos, length), draws)

        return _batches(plans, load, _batch_finish(data_cfg, augment), p * k, start_step, counters, shared=1)
    if data_cfg.source == "synthetic" or (len(index) and synthetic.is_synthetic_key(index.paths[0])):
        load, tables = _synthetic_loader(data_cfg, augment)
        sources = _synthetic_ids(index, tables)
    else:
        pillow = index.pillow_flags()
        load = _file_loader(data_cfg, augment, bool(pillow.any()))
        sources = (np.asarray(index.paths, dtype=object).astype(str), pillow)
    plans = _index_plans(index, sources, p, k, seed, start_step, worker_index, num_workers,
                         data_cfg.min_images_per_identity, sampling)
    return _batches(plans, load, _batch_finish(data_cfg, augment), p * k, start_step, counters)


def images_dataset(data_cfg, paths: list, batch_size: int, check: bool = True) -> tf.data.Dataset:
    """Preprocessed float32 batches ``[B, S, S, 3]`` of `paths`, in order, no augmentation.

    `paths`: files, ``synthetic:...`` keys (rendered deterministically) or ``tfrecord:...`` keys
    (read from the shards of `data_cfg.path`). Files are decode-checked first (cached, see
    `decode.check_files`, unless ``check=False``): an unreadable file is a UserError naming it.
    """
    paths = [str(p) for p in paths]
    size, crop = data_cfg.image_size, data_cfg.crop_fraction
    if batch_size < 1:
        raise UserError(f"batch_size: expected an integer >= 1, received {batch_size}")

    def finish(ds):
        return _options(ds.batch(batch_size).prefetch(tf.data.AUTOTUNE))

    if paths and all(synthetic.is_synthetic_key(p) for p in paths):
        tables = synthetic.SyntheticTables.from_config(data_cfg)
        ids = np.zeros(len(paths), np.int64)
        imgs = np.zeros(len(paths), np.int64)
        for i, key in enumerate(paths):
            ids[i], imgs[i] = synthetic.parse_key(key)
            tables.check_key(int(ids[i]), int(imgs[i]), key)
        ds = tf.data.Dataset.from_tensor_slices((ids, imgs)).map(
            lambda a, b: preprocess_images(tables.render(a, b, size), size, crop),
            num_parallel_calls=tf.data.AUTOTUNE)
        return finish(ds)
    if paths and all(p.startswith(tfrecord.KEY_PREFIX) for p in paths):
        blobs = tfrecord.read_records(data_cfg, paths)
        ds = tf.data.Dataset.from_tensor_slices(tf.constant(blobs, tf.string)).map(
            lambda b: preprocess_images(decode.decode_image_bytes(b), size, crop),
            num_parallel_calls=tf.data.AUTOTUNE)
        return finish(ds)
    odd = [p for p in paths if synthetic.is_synthetic_key(p) or p.startswith(tfrecord.KEY_PREFIX)]
    if odd:
        raise UserError(f"{odd[0]}: image keys cannot be mixed with file paths")
    if check and paths:
        result = decode.check_files(paths, getattr(data_cfg, "check_cache", None),
                                    max_pixels=getattr(data_cfg, "max_pixels", decode.DEFAULT_MAX_PIXELS))
        bad = [(p, result.results[p].reason) for p in paths if not result.results[p].ok]
        if bad:
            more = f" (and {len(bad) - 1} more unreadable images)" if len(bad) > 1 else ""
            raise UserError(f"{display_path(bad[0][0])}: unreadable image: {bad[0][1]}{more}")
        pillow = np.array([result.results[p].route == decode.ROUTE_PILLOW for p in paths], bool)
    else:
        pillow = np.array([decode.route_by_extension(p) == decode.ROUTE_PILLOW for p in paths], bool)
    any_pillow = bool(pillow.any())

    @tf.autograph.experimental.do_not_convert  # plain graph code; AutoGraph's gast trips on it
    def load(path, flag):
        if not any_pillow:
            image = decode.decode_image_bytes(tf.io.read_file(path))
        else:
            image = tf.cond(flag, lambda: decode.pillow_decode_tf(path),
                            lambda: decode.decode_image_bytes(tf.io.read_file(path)))
        return preprocess_images(image, size, crop)

    ds = tf.data.Dataset.from_tensor_slices((np.asarray(paths, dtype=object).astype(str) if paths
                                             else np.zeros(0, str), pillow))
    return finish(ds.map(load, num_parallel_calls=tf.data.AUTOTUNE))
