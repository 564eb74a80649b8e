"""TFRecord shards: their layout and the `tfrecord` source that reads them (`tfrecord_write` writes them).

Layout. ``PREFIX-00000-of-000NN.tfrecord`` shards of one `tf.train.Example` per image
(``image``: the encoded bytes, ``label``: int64, ``identity``: the name, ``path``: the file's
path relative to the data folder), and ``PREFIX.manifest.json``: identities (label i is
``identities[i]``), images per identity, and per shard its file name, image count and its
records as runs ``[label, count]`` in file order; next to each shard, ``<shard>.index``: int64
little-endian ``[records, 2]``, the byte offset and length of each record's image bytes inside
the shard file. Every identity lives whole in one shard, its
images contiguous; identities are dealt to shards largest first onto the least-filled shard
(seeded order), so shards hold about the same number of images.

Reading for training (`tfrecord_pk_plans`), designed for exact P x K batches, throughput and
resumption from a step without reading what came before:

- Shards are split across workers by position (shard i -> worker ``i mod num_workers``); no
  tf.data auto-sharding is needed (the pipeline sets AutoShardPolicy.OFF).
- An *epoch* is a seeded permutation of the worker's shards, cut into *rounds* of k shards (k
  chosen so a round holds at least `data.shuffle_buffer` images and at least P identities; the
  shards left over by the cut wait for the next epoch's permutation).
- A round is read whole into memory (one `tf.io.read_file` per shard, the next round read while
  the current one is used), and B = round(k * images per shard / (P K)) batches are drawn from
  it with the same stateless P x K sampler as the folder source: identities whole and distinct.
  Each image's bytes are cut out of the shard contents with `tf.strings.substr` at the offsets
  of the ``.index`` file: no `tf.train.Example` parsing in training (the records stay ordinary
  Examples for any other reader).
- Step n is round ``n // B``, batch ``n mod B``: resuming at step n reads only that round.
- ``data.sampling: uniform``: the same rounds (holding at least P*K images), each batch P*K
  distinct records of the round drawn through a stateless permutation of its records.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Optional

import numpy as np
import tensorflow as tf

from mobilenet_embed.errors import UserError

MANIFEST_SUFFIX = ".manifest.json"
FORMAT = "mbembed-tfrecord"
VERSION = 1
KEY_PREFIX = "tfrecord:"
SHARD_RE = re.compile(r"^(?P<prefix>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.tfrecord$")


INDEX_SUFFIX = ".index"


def shard_name(prefix: str, i: int, n: int) -> str:
    return f"{prefix}-{i:05d}-of-{n:05d}.tfrecord"


def read_shard_index(path: str) -> np.ndarray:
    """int64 ``[records, 2]`` (offset, length) of the image bytes of each record of a shard."""
    try:
        with tf.io.gfile.GFile(path + INDEX_SUFFIX, "rb") as fh:
            data = fh.read()
    except (tf.errors.NotFoundError, OSError):
        raise UserError(f"data.path: shard index not found: {path + INDEX_SUFFIX} (written by `mbembed prepare`)") from None
    return np.frombuffer(data, dtype="<i8").reshape(-1, 2).astype(np.int64)


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


# --------------------------------------------------------------------------- manifest


class Manifest:
    """A parsed ``PREFIX.manifest.json`` and the shard files the config selects."""

    def __init__(self, path: str, data: dict, selected: Optional[list[int]] = None):
        self.path = path
        self.data = data
        self.identities: list[str] = list(data["identities"])
        self.shards: list[dict] = list(data["shards"])
        folder = os.path.dirname(path)
        self.files = [self._join(folder, s["file"]) for s in self.shards]
        self.selected = list(range(len(self.shards))) if selected is None else selected

    @staticmethod
    def _join(folder: str, name: str) -> str:
        return name if "://" in name or os.path.isabs(name) else (os.path.join(folder, name) if folder else name)


def _read_json(path: str) -> dict:
    try:
        with tf.io.gfile.GFile(path, "r") as fh:
            data = json.loads(fh.read())
    except (tf.errors.NotFoundError, OSError):
        raise UserError(f"data.path: manifest not found: {path} (written by `mbembed prepare`)") from None
    except ValueError:
        raise UserError(f"{path}: not a valid manifest (JSON)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path}: not an mbembed TFRecord manifest (format {FORMAT!r} expected)")
    return data


def load_manifest(path: Optional[str]) -> Manifest:
    """The manifest for `data.path`: a shard glob, a PREFIX, a shard file, or the manifest itself."""
    if not path:
        raise UserError("data.path: required when data.source is 'tfrecord', received None")
    path = str(path)
    if path.endswith(MANIFEST_SUFFIX):
        return Manifest(path, _read_json(path))
    if _is_glob(path):
        matches = sorted(p for p in tf.io.gfile.glob(path) if not p.endswith((INDEX_SUFFIX, MANIFEST_SUFFIX)))
        if not matches:
            raise UserError(f"data.path: no files match {path}")
        m = SHARD_RE.match(matches[0])
        if not m:
            raise UserError(f"data.path: {matches[0]} is not a shard written by `mbembed prepare` "
                            f"(PREFIX-NNNNN-of-NNNNN.tfrecord)")
        manifest_path = m.group("prefix") + MANIFEST_SUFFIX
        man = Manifest(manifest_path, _read_json(manifest_path))
        wanted = {os.path.basename(p) for p in matches}
        selected = [i for i, s in enumerate(man.shards) if os.path.basename(s["file"]) in wanted]
        if not selected:
            raise UserError(f"data.path: none of the files matching {path} is listed in {manifest_path}")
        man.selected = selected
        return man
    m = SHARD_RE.match(path)
    if m:
        man = Manifest(m.group("prefix") + MANIFEST_SUFFIX, _read_json(m.group("prefix") + MANIFEST_SUFFIX))
        man.selected = [i for i, s in enumerate(man.shards) if os.path.basename(s["file"]) == os.path.basename(path)]
        return man
    if not tf.io.gfile.exists(path + MANIFEST_SUFFIX):
        raise UserError(f"data.path: no TFRecord data at {path} (expected a shard glob such as "
                        f"PREFIX-*.tfrecord, or PREFIX with {os.path.basename(path)}{MANIFEST_SUFFIX})")
    return Manifest(path + MANIFEST_SUFFIX, _read_json(path + MANIFEST_SUFFIX))


def manifest_checksum(data: dict) -> str:
    """sha256 of the manifest's content without its ``checksum`` entry (keys sorted, compact)."""
    body = {k: v for k, v in data.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def verify_shards(man: Manifest) -> None:
    """Trust check of the selected shards without reading them: the manifest's checksum, each
    shard's size in bytes and its ``.index``'s record count as `prepare` wrote them (manifests of
    earlier versions carry no size or checksum: only the record counts are compared)."""
    again = "; run `mbembed prepare` again"
    if "checksum" in man.data and man.data["checksum"] != manifest_checksum(man.data):
        raise UserError(f"{man.path}: checksum mismatch: the manifest was changed after `mbembed prepare` "
                        f"wrote it{again}")
    missing = [f for i in man.selected for f in (man.files[i], man.files[i] + INDEX_SUFFIX)
               if not tf.io.gfile.exists(f)]
    if missing:
        raise UserError(f"data.path: shard file not found: {missing[0]}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for i in man.selected:
        shard, path = man.shards[i], man.files[i]
        expected = {path + INDEX_SUFFIX: 16 * int(shard["images"])}
        if "bytes" in shard:
            expected[path] = int(shard["bytes"])
        for f, size in expected.items():
            actual = tf.io.gfile.stat(f).length
            if actual != size:
                raise UserError(f"{f}: {actual:,} bytes, the manifest {man.path} says {size:,}: changed after "
                                f"`mbembed prepare` wrote it{again}")


def decode_records(man: Manifest, max_pixels: int) -> list[tuple[int, int, str]]:
    """Decode every record of the selected shards (`data check --full`); (shard, record, reason)
    of those TensorFlow cannot decode or that are above `max_pixels`."""
    from mobilenet_embed.data import decode

    bad = []
    for s in man.selected:
        where = read_shard_index(man.files[s])
        with tf.io.gfile.GFile(man.files[s], "rb") as fh:
            content = fh.read()
        blobs = [content[a:a + n] for a, n in where.tolist()]
        items = tf.data.Dataset.from_tensor_slices((np.arange(len(blobs), dtype=np.int64),
                                                    tf.constant(blobs, tf.string) if blobs else tf.zeros([0], tf.string)))
        good = decode.shapes_of(items, max_pixels)
        for r in range(len(blobs)):
            if r not in good:
                bad.append((s, r, "corrupt record (TensorFlow cannot decode its image)"))
            elif good[r][2]:
                bad.append((s, r, decode.too_large_reason(good[r][0], good[r][1], max_pixels)))
    return bad


def parse_key(key: str) -> tuple[int, int]:
    try:
        prefix, shard, record = key.split(":")
        if prefix + ":" != KEY_PREFIX:
            raise ValueError
        return int(shard), int(record)
    except ValueError:
        raise UserError(f"{key}: not a TFRecord image key (expected tfrecord:SHARD:RECORD)") from None


def read_records(data_cfg, keys: list[str]) -> list[bytes]:
    """Encoded image bytes of `keys` (in order), reading only the shards that hold them."""
    man = load_manifest(data_cfg.path)
    wanted: dict[int, set] = {}
    for key in keys:
        s, r = parse_key(key)
        if not 0 <= s < len(man.shards):
            raise UserError(f"{key}: shard {s} is not in {man.path}")
        wanted.setdefault(s, set()).add(r)
    found: dict[tuple[int, int], bytes] = {}
    for s, records in wanted.items():
        where = read_shard_index(man.files[s])
        with tf.io.gfile.GFile(man.files[s], "rb") as fh:
            content = fh.read()
        for r in records:
            if not 0 <= r < len(where):
                raise UserError(f"tfrecord:{s}:{r}: record not found in {man.files[s]}")
            found[(s, r)] = content[where[r, 0]:where[r, 0] + where[r, 1]]
    return [found[parse_key(key)] for key in keys]


# --------------------------------------------------------------------------- reading for training


class RoundPlan:
    """Rounds of one worker's shards (see the module doc), from the manifest and an index."""

    def __init__(self, man: Manifest, index, p: int, k: int, min_round_images: int, worker_index: int,
                 num_workers: int, uniform: bool = False):
        name_to_label = {n: i for i, n in enumerate(index.identities)}
        self.label_map = np.array([name_to_label.get(n, -1) for n in man.identities], np.int64)
        if len(man.selected) < num_workers:
            raise UserError(f"data.path: {len(man.selected)} shards cannot be split across {num_workers} "
                            f"workers; run `mbembed prepare` with --shards >= {num_workers}")
        mine = [s for j, s in enumerate(man.selected) if j % num_workers == worker_index]
        images, identities = [], []
        for s in mine:
            runs = [(lab, c) for lab, c in man.shards[s]["runs"] if self.label_map[lab] >= 0]
            images.append(sum(c for _, c in runs))
            identities.append(len({lab for lab, _ in runs}))
        keep = [i for i, n in enumerate(images) if n > 0]
        self.files = [man.files[mine[i]] for i in keep]
        # per record of the kept shards, flat: image offset and length in its shard, index label
        starts, pos, length, labels = [0], [], [], []
        for i in keep:
            where = read_shard_index(man.files[mine[i]])
            rec_labels = np.repeat([lab for lab, _ in man.shards[mine[i]]["runs"]],
                                   [c for _, c in man.shards[mine[i]]["runs"]])
            if len(where) != len(rec_labels):
                raise UserError(f"{man.files[mine[i]]}{INDEX_SUFFIX}: {len(where)} records, the manifest says "
                                f"{len(rec_labels)}; run `mbembed prepare` again")
            pos.append(where[:, 0])
            length.append(where[:, 1])
            labels.append(self.label_map[rec_labels])
            starts.append(starts[-1] + len(where))
        self.record_starts = np.asarray(starts, np.int64)
        self.record_pos = np.concatenate(pos) if pos else np.zeros(0, np.int64)
        self.record_len = np.concatenate(length) if length else np.zeros(0, np.int64)
        self.record_label = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        images = [images[i] for i in keep]
        identities = [identities[i] for i in keep]
        if uniform:  # a round must hold P*K images (not P identities)
            if not self.files or sum(images) < p * k:
                raise UserError(f"train.identities_per_batch: with data.sampling 'uniform' P x K must be at most the "
                                f"number of images in worker {worker_index}'s shards ({sum(images)}), received {p * k}")
            min_round_images, need, per_shard = max(min_round_images, p * k), p * k, images
        else:
            if not self.files or sum(identities) < p:
                raise UserError(f"train.identities_per_batch: expected at most the number of identities in "
                                f"worker {worker_index}'s shards ({sum(identities)}), received {p}")
            need, per_shard = p, identities
        mean_images = sum(images) / len(images)
        k_shards = max(1, math.ceil(min_round_images / max(mean_images, 1)))
        smallest = sorted(per_shard)
        while k_shards < len(smallest) and sum(smallest[:k_shards]) < need:
            k_shards += 1
        self.shards_per_round = min(k_shards, len(self.files))
        self.rounds_per_epoch = len(self.files) // self.shards_per_round
        self.batches_per_round = max(1, int(round(self.shards_per_round * mean_images / (p * k))))
        self.images = sum(images)


def tfrecord_pk_plans(man: Manifest, plan: RoundPlan, p: int, k: int, seed: int, start_step: int,
                      worker_index: int, uniform: bool = False) -> tf.data.Dataset:
    """Per-step plans ``(round contents, image offsets [P*K], lengths [P*K], labels [P*K],
    augmentation draws [P*K, 6], step)`` from step `start_step` on (see the module doc).

    `uniform` (``data.sampling: uniform``): P*K distinct records of the round instead, drawn
    through a stateless permutation of the round's records (`sampler.TAG_UNIFORM`), so that each
    record is used about once per round (`plan` must be built with ``uniform=True``)."""
    from mobilenet_embed.data import sampler

    files = tf.constant(plan.files)
    starts = tf.constant(plan.record_starts)
    rec_pos = tf.constant(plan.record_pos)
    rec_len = tf.constant(plan.record_len)
    rec_label = tf.constant(plan.record_label)
    n_files = len(plan.files)
    per_round, rounds, batches = plan.shards_per_round, plan.rounds_per_epoch, plan.batches_per_round
    first_round, first_batch = start_step // batches, start_step % batches

    def load_round(g):
        epoch, r = g // rounds, g % rounds
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(n_files, dtype=tf.int64), seed=sampler.fold_key(seed, sampler.TAG_ROUND, worker_index, epoch))
        chosen = perm[r * per_round:(r + 1) * per_round]
        parts = [tf.io.read_file(tf.gather(files, chosen[j])) for j in range(per_round)]
        content = parts[0] if per_round == 1 else tf.strings.join(parts)
        base = tf.cumsum(tf.cast(tf.strings.length(tf.stack(parts)), tf.int64), exclusive=True)
        ranges = tf.ragged.range(tf.gather(starts, chosen), tf.gather(starts, chosen + 1))
        records = ranges.flat_values
        pos = tf.gather(base, ranges.value_rowids()) + tf.gather(rec_pos, records)
        labels = tf.gather(rec_label, records)
        kept = tf.where(labels >= 0)[:, 0]  # records of identities in the index
        uniq, group = tf.unique(tf.gather(labels, kept), out_idx=tf.int64)
        rows = tf.gather(kept, tf.argsort(group, stable=True))  # identity-major
        counts = tf.math.bincount(tf.cast(group, tf.int32), minlength=tf.size(uniq), dtype=tf.int64)
        return g, content, tf.gather(pos, rows), tf.gather(tf.gather(rec_len, records), rows), uniq, counts, \
            tf.cumsum(counts, exclusive=True), tf.gather(labels, rows)

    def batches_of(g, content, pos, lengths, uniq, counts, offsets, row_labels):
        begin = tf.where(g == first_round, tf.constant(first_batch, tf.int64), tf.constant(0, tf.int64))

        def one(b):
            step = g * batches + b
            if uniform:
                n = tf.size(row_labels, out_type=tf.int64)  # >= P*K (RoundPlan): the slots are distinct
                slots = (b * p * k + tf.range(p * k, dtype=tf.int64)) % n
                rows = tf.random.experimental.index_shuffle(
                    slots, sampler.fold_key(seed, sampler.TAG_UNIFORM, worker_index, g), n - 1)
                key = sampler.fold_key(seed, sampler.TAG_STEP, worker_index, step)
                return (content, tf.gather(pos, rows), tf.gather(lengths, rows), tf.gather(row_labels, rows),
                        sampler.image_draws(key, p * k), step)
            ids = sampler.choose_identities(tf.size(uniq, out_type=tf.int64), p, b,
                                            lambda n: sampler.fold_key(seed, sampler.TAG_PASS, worker_index, g, n))
            key = sampler.fold_key(seed, sampler.TAG_STEP, worker_index, step)
            rows, owners = sampler.pk_plan(offsets, counts, ids, k, key)
            return (content, tf.gather(pos, rows), tf.gather(lengths, rows), tf.gather(uniq, owners),
                    sampler.image_draws(key, p * k), step)

        return tf.data.Dataset.range(begin, batches).map(one)

    rounds_ds = tf.data.Dataset.range(first_round, np.iinfo(np.int64).max).map(load_round).prefetch(1)
    return rounds_ds.flat_map(batches_of)
