"""P x K sampling in pure TensorFlow, stateless: a batch is a function of (seed, worker, step).

Identities are drawn in *passes*: a pass is a seeded permutation of the usable identities, cut
into consecutive groups of P; step n uses group ``n mod (I // P)`` of pass ``n // (I // P)``, so
the P identities of a batch are distinct and every identity appears once per pass (the
``I mod P`` left over at the end of a pass differ from pass to pass). With several workers the
pass is shared and cut into groups of ``P * num_workers``: worker w takes the w-th P of each
group, so at one step the workers hold disjoint identities.

The permutation is never materialised: the P positions of a step are mapped through
`tf.random.experimental.index_shuffle`, a stateless bijection of ``[0, I)`` keyed by the pass,
so a step costs O(P), not O(I) (a full shuffle of 100k identities cost 8 ms per step).

Within an identity with c images, K distinct images are drawn uniformly when c >= K; when
c < K all c images are used, in random order, and the remaining K - c slots are drawn from
them with replacement.

Uniform sampling (`uniform_rows`, ``data.sampling: uniform``): the same passes, over images
instead of identities: a pass is a seeded permutation of all usable images cut into batches of
P*K (shared between workers as above), so every image is seen once per pass.

Keys: every random draw is ``stateless_*`` with a seed folded from (cfg.seed, a tag, ...),
see `fold_key`, so batch n is the same whether a stream started at 0 or at ``start_step = n``.
"""

from __future__ import annotations

import tensorflow as tf

TAG_PASS = 0x7A55
TAG_STEP = 0x57E9
TAG_ROUND = 0x20DD
TAG_UNIFORM = 0x0F1A


def fold_key(seed: int, tag: int, *parts) -> tf.Tensor:
    """A ``[2]`` int64 stateless seed from (seed, tag) folded with each of `parts` in turn."""
    key = tf.constant([int(seed), int(tag)], tf.int64)
    for part in parts:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(part, tf.int64))
    return key


def choose_identities(num_identities: tf.Tensor, p: int, step: tf.Tensor, pass_key, group: int = 1,
                      member: int = 0) -> tf.Tensor:
    """Positions (int64 ``[p]``, distinct) of the identities of `step` (see the module doc).

    `pass_key(pass_number)` gives the permutation seed of a pass; requires
    ``num_identities >= p * group``.
    """
    num_identities = tf.cast(num_identities, tf.int64)
    step = tf.cast(step, tf.int64)
    per_pass = tf.maximum(num_identities // (p * group), 1)
    pass_no = step // per_pass
    slot = step % per_pass
    start = (slot * group + member) * p
    return tf.random.experimental.index_shuffle(start + tf.range(p, dtype=tf.int64), pass_key(pass_no),
                                                num_identities - 1)


def uniform_rows(num_images: int, batch: int, step: tf.Tensor, seed: int, worker_index: int = 0,
                 num_workers: int = 1) -> tf.Tensor:
    """Positions (int64 ``[batch]``, distinct) of the images of `step` under uniform sampling:
    `choose_identities`' passes over images (module doc); requires ``num_images >= batch * num_workers``."""
    return choose_identities(num_images, batch, step,
                             lambda n: fold_key(seed, TAG_UNIFORM, num_workers, n),
                             group=num_workers, member=worker_index)


def choose_images(counts: tf.Tensor, k: int, key: tf.Tensor) -> tf.Tensor:
    """Positions (int64 ``[P, k]``) of k images inside each identity of image count `counts`.

    The first min(c, k) slots of an identity are a uniform random sample without replacement,
    drawn slot by slot (slot j: a uniform rank among the c - j images not yet taken, mapped past
    the taken ones): O(P k^2) small vector ops, whatever c (a dense ``[P, largest count]``
    draw cost 4.9 ms per batch at 100k images whose largest identity holds 17,600); the
    remaining k - c slots are drawn with replacement."""
    counts = tf.cast(counts, tf.int64)
    key_a = tf.random.experimental.stateless_fold_in(key, 1)
    key_b = tf.random.experimental.stateless_fold_in(key, 2)
    p = tf.shape(counts)[0]
    u = tf.random.stateless_uniform(tf.stack([p, k]), seed=key_a, dtype=tf.float64)
    taken: list = []
    for j in range(k):
        left = tf.maximum(counts - j, 1)
        x = tf.minimum(tf.cast(tf.floor(u[:, j] * tf.cast(left, tf.float64)), tf.int64), left - 1)
        if taken:
            ordered = tf.sort(tf.stack(taken, axis=1), axis=1)
            for t in range(j):  # ascending: each taken position at or below x pushes x one further
                x = x + tf.cast(ordered[:, t] <= x, tf.int64)
        taken.append(x)
    top = tf.stack(taken, axis=1)
    u2 = tf.random.stateless_uniform(tf.stack([p, k]), seed=key_b)
    extra = tf.minimum(tf.cast(tf.floor(u2 * tf.cast(counts[:, None], tf.float32)), tf.int64),
                       counts[:, None] - 1)
    slots = tf.range(k, dtype=tf.int64)
    return tf.where(slots[None, :] < counts[:, None], top, extra)


def pk_plan(offsets: tf.Tensor, counts: tf.Tensor, identity_positions: tf.Tensor, k: int, key: tf.Tensor):
    """Image rows (int64 ``[P*k]``, identity-major) of the chosen identities, and the identity
    position of each row."""
    sel_counts = tf.gather(counts, identity_positions)
    sel_offsets = tf.gather(offsets, identity_positions)
    positions = choose_images(sel_counts, k, key)
    rows = tf.reshape(sel_offsets[:, None] + positions, [-1])
    owners = tf.reshape(tf.repeat(identity_positions[:, None], k, axis=1), [-1])
    return rows, owners


def image_draws(key: tf.Tensor, n: int) -> tf.Tensor:
    """``[n, 6]`` uniform augmentation draws, one row per image of a batch (one op per step)."""
    from mobilenet_embed.data.preprocess import N_DRAWS

    return tf.random.stateless_uniform([n, N_DRAWS], seed=tf.random.experimental.stateless_fold_in(key, 3))
