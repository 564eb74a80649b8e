"""Triplet losses with online (in-batch) mining, equal to tensorflow-addons 0.23.

Functions take ``(labels, embeddings)`` and return a float32 scalar:

- `triplet_semihard_loss` (FaceNet, Schroff et al. 2015): for each anchor-positive pair the
  negative is the closest one *farther* than the positive; where none is farther, the anchor's
  farthest negative (0 when the batch holds no negative for that anchor). The hinge
  ``max(d(a,p) - d(a,n) + margin, 0)`` is summed over all anchor-positive pairs (a != p) and
  divided by their number, zero-loss pairs included. No anchor-positive pair -> 0.0
  (tensorflow-addons returns NaN there).
- `triplet_hard_loss` (batch-hard, Hermans et al. 2017): per anchor, hardest positive minus
  hardest negative, hinged with the margin (or softplus when ``soft``), averaged over *all*
  anchors. An anchor without positive has hardest positive 0; one without negative has hardest
  negative equal to its hardest positive (so it contributes ``margin``, or ``log 2`` when soft).
- `triplet_batch_all_loss` (Hermans et al. 2017): mean of the hinge over the valid triplets
  whose hinge is > 0; 0.0 when there are none.

Memory is O(B^2) for every loss: one B x B distance matrix, each anchor's negative distances
sorted once, and ``tf.searchsorted`` per anchor-positive pair finds the semi-hard negative, the
number of violating negatives, and (with a prefix sum) their summed hinge. tensorflow-addons tiles
the distance matrix to B*B x B (cubic); see ``scripts/bench_losses.py``.

Precision: float16 / bfloat16 embeddings are cast to float32 first; the result is float32.

Replicas: each function returns the mean over the batch it is given, unscaled. Under
``tf.distribute`` each replica therefore gets the mean over its *local* batch, mined within that
local batch only. In a custom loop, divide the per-replica value by
``strategy.num_replicas_in_sync`` before taking gradients: the all-reduce sums gradients, so the
update is then the average of the per-replica means (this equals the global-batch mean only
when every replica's denominator -- anchor-positive pairs, anchors or active triplets -- is the
same). To mine across the global batch instead, all-gather labels and embeddings and compute the
loss on the gathered batch (what training's ``cross_replica_mining`` does). The Keras classes do
the division themselves: called in a replica context with N > 1 replicas they return value / N,
as Keras' built-in losses do, so ``model.fit`` under ``MirroredStrategy`` is correctly scaled.
"""

from __future__ import annotations

from typing import Callable, Union

import keras
import tensorflow as tf

from mobilenet_embed.config import LOSS_DISTANCES
from mobilenet_embed.errors import UserError

DistanceMetric = Union[str, Callable[[tf.Tensor], tf.Tensor]]

DISTANCE_METRICS = LOSS_DISTANCES


# --------------------------------------------------------------------------- distances

def pairwise_distances(embeddings: tf.Tensor, distance_metric: DistanceMetric = "L2") -> tf.Tensor:
    """Pairwise distance matrix [B, B] in float32.

    "L2": Euclidean; "squared-L2": its square; "angular": 1 - cosine similarity of the
    L2-normalised rows; a callable gets the float32 embeddings and returns the matrix itself.
    Built-in metrics go through the Gram matrix (||a||^2 - 2ab + ||b||^2, clamped at 0, O(B^2)),
    have an exact-zero diagonal, and take the square root only where the squared distance is
    > 0, so gradients stay finite for duplicate embeddings.
    """
    x = tf.cast(embeddings, tf.float32)
    if callable(distance_metric):
        return tf.cast(distance_metric(x), tf.float32)
    if distance_metric not in DISTANCE_METRICS:
        raise ValueError(f"distance_metric: expected one of {list(DISTANCE_METRICS)} or a callable, "
                         f"received {distance_metric!r}")
    n = tf.shape(x)[0]
    diagonal = tf.cast(tf.eye(n), tf.bool)
    if distance_metric == "angular":
        unit = tf.math.l2_normalize(x, axis=1)
        d = tf.maximum(1.0 - tf.matmul(unit, unit, transpose_b=True), 0.0)
        return tf.where(diagonal, tf.zeros_like(d), d)
    sq_norm = tf.reduce_sum(tf.square(x), axis=1)
    sq = sq_norm[:, None] - 2.0 * tf.matmul(x, x, transpose_b=True) + sq_norm[None, :]
    sq = tf.where(diagonal, tf.zeros_like(sq), tf.maximum(sq, 0.0))
    if distance_metric == "squared-L2":
        return sq
    positive = sq > 0.0
    # sqrt'(0) is infinite: feed a safe value where the distance is 0 and mask it out again.
    return tf.where(positive, tf.sqrt(tf.where(positive, sq, tf.ones_like(sq))), tf.zeros_like(sq))


# --------------------------------------------------------------------------- shared pieces

class _Batch:
    """Distances, masks and per-anchor sorted negatives of one batch (all O(B^2))."""

    def __init__(self, labels: tf.Tensor, embeddings: tf.Tensor, distance_metric: DistanceMetric):
        labels = tf.reshape(tf.convert_to_tensor(labels), [-1])
        embeddings = tf.convert_to_tensor(embeddings)
        self.embeddings = tf.cast(embeddings, tf.float32)
        self.dist = pairwise_distances(self.embeddings, distance_metric)
        n = tf.shape(labels)[0]
        same = tf.equal(labels[:, None], labels[None, :])
        self.pos = tf.logical_and(same, tf.logical_not(tf.cast(tf.eye(n), tf.bool)))  # a != p
        self.neg = tf.logical_not(same)
        self.n_neg = tf.reduce_sum(tf.cast(self.neg, tf.int32), axis=1)  # [B] negatives per anchor
        self.size = n

    def sorted_negatives(self) -> tuple[tf.Tensor, tf.Tensor]:
        """Per anchor, its negatives' column order by ascending distance and the sorted keys.

        Non-negatives sort last as +inf; keys carry no gradient (distances are re-gathered from
        `dist` with the returned order where a gradient is needed).
        """
        keys = tf.where(self.neg, self.dist, tf.fill(tf.shape(self.dist), float("inf")))
        keys = tf.stop_gradient(keys)
        order = tf.argsort(keys, axis=1, stable=True)
        return order, tf.gather(keys, order, batch_dims=1)

    def count_violating(self, margin: float) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """For each (a, p): how many negatives have d(a,n) < d(a,p) + margin, and their hinge sum.

        Returns (count [B,B] int32, hinge_sum [B,B] float32, threshold [B,B]); meaningful where
        `pos`. The hinge sum is count * (d(a,p) + margin) - (sum of the `count` nearest negative
        distances), via a prefix sum over the sorted row: O(B^2) memory, differentiable.
        """
        order, keys = self.sorted_negatives()
        threshold = self.dist + margin
        count = tf.searchsorted(keys, tf.stop_gradient(threshold), side="left")
        sorted_dist = tf.gather(self.dist, order, batch_dims=1)  # differentiable copy of keys
        rank = tf.range(self.size)[None, :]
        sorted_dist = tf.where(rank < self.n_neg[:, None], sorted_dist, tf.zeros_like(sorted_dist))
        prefix = tf.concat([tf.zeros_like(sorted_dist[:, :1]), tf.cumsum(sorted_dist, axis=1)], axis=1)
        nearest_sum = tf.gather(prefix, count, batch_dims=1)
        hinge_sum = tf.cast(count, tf.float32) * threshold - nearest_sum
        return count, hinge_sum, threshold


def _masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Mean of `values` where `mask`; 0.0 (not NaN) when the mask is empty."""
    total = tf.reduce_sum(tf.where(mask, values, tf.zeros_like(values)))
    return tf.math.divide_no_nan(total, tf.reduce_sum(tf.cast(mask, tf.float32)))


# --------------------------------------------------------------------------- losses

def triplet_semihard_loss(labels: tf.Tensor, embeddings: tf.Tensor, margin: float = 1.0,
                          distance_metric: DistanceMetric = "L2") -> tf.Tensor:
    """Semi-hard triplet loss (tensorflow-addons semantics), float32 scalar.

    Reduction: sum over anchor-positive pairs (a != p, zero-loss pairs included) of
    max(d(a,p) - d(a,n*) + margin, 0), divided by the number of such pairs; 0.0 when the batch
    has none. n* = nearest negative with d(a,n) > d(a,p), else the farthest negative (else 0).
    O(B^2) memory: each anchor's negatives are sorted once and n* found with searchsorted.
    Not scaled across replicas (see the module docstring).
    """
    batch = _Batch(labels, embeddings, distance_metric)
    order, keys = batch.sorted_negatives()
    n_neg = batch.n_neg[:, None]
    # Row a, column p: how many of a's negatives have d(a,n) <= d(a,p); that index is n*.
    farther = tf.searchsorted(keys, tf.stop_gradient(batch.dist), side="right")
    pick = tf.where(farther < n_neg, farther, n_neg - 1)
    pick = tf.maximum(pick, 0)
    negative = tf.gather(batch.dist, tf.gather(order, pick, batch_dims=1), batch_dims=1)
    negative = tf.where(n_neg > 0, negative, tf.zeros_like(negative))
    hinge = tf.nn.relu(batch.dist - negative + margin)
    return _masked_mean(hinge, batch.pos)


def triplet_hard_loss(labels: tf.Tensor, embeddings: tf.Tensor, margin: float = 1.0, soft: bool = False,
                      distance_metric: DistanceMetric = "L2") -> tf.Tensor:
    """Batch-hard triplet loss (tensorflow-addons semantics), float32 scalar.

    Per anchor: hardest positive (largest d(a,p), 0 if none) minus hardest negative (smallest
    d(a,n); equal to the hardest positive if none), then max(x + margin, 0), or softplus(x) when
    `soft` (margin unused). Reduction: mean over all B anchors, those without positive included;
    0.0 for an empty batch. Not scaled across replicas (see the module docstring).
    """
    batch = _Batch(labels, embeddings, distance_metric)
    d = batch.dist
    has_pos = tf.reduce_any(batch.pos, axis=1)
    has_neg = batch.n_neg > 0
    hardest_pos = tf.reduce_max(tf.where(batch.pos, d, tf.fill(tf.shape(d), float("-inf"))), axis=1)
    hardest_pos = tf.where(has_pos, hardest_pos, tf.zeros_like(hardest_pos))
    hardest_neg = tf.reduce_min(tf.where(batch.neg, d, tf.fill(tf.shape(d), float("inf"))), axis=1)
    hardest_neg = tf.where(has_neg, hardest_neg, hardest_pos)
    gap = hardest_pos - hardest_neg
    per_anchor = tf.math.softplus(gap) if soft else tf.nn.relu(gap + margin)
    return tf.math.divide_no_nan(tf.reduce_sum(per_anchor), tf.cast(batch.size, tf.float32))


def triplet_batch_all_loss(labels: tf.Tensor, embeddings: tf.Tensor, margin: float = 1.0,
                           distance_metric: DistanceMetric = "L2") -> tf.Tensor:
    """Batch-all triplet loss (Hermans et al. 2017), float32 scalar.

    Reduction: mean of max(d(a,p) - d(a,n) + margin, 0) over the valid triplets (same label
    a != p, different label n) whose hinge is > 0; 0.0 when there are none. Although it
    averages over O(B^3) triplets it runs in O(B^2) memory: per (a, p) the count and hinge sum
    of the violating negatives come from the sorted negative row and a prefix sum.
    Not scaled across replicas (see the module docstring).
    """
    batch = _Batch(labels, embeddings, distance_metric)
    count, hinge_sum, _ = batch.count_violating(margin)
    total = tf.reduce_sum(tf.where(batch.pos, hinge_sum, tf.zeros_like(hinge_sum)))
    active = tf.reduce_sum(tf.where(batch.pos, tf.cast(count, tf.float32), tf.zeros_like(hinge_sum)))
    return tf.math.divide_no_nan(total, active)


def mining_stats(labels: tf.Tensor, embeddings: tf.Tensor, margin: float = 1.0,
                 distance_metric: DistanceMetric = "L2") -> dict[str, tf.Tensor]:
    """Batch statistics for the training log, float32 scalars, no gradient; O(B^2) memory.

    - ``active_fraction``: fraction of the valid triplets (a, p, n) with a positive hinge
      d(a,p) - d(a,n) + margin > 0 (0 when there are none). Near 1 with tiny distances and the
      loss stuck at the margin means the embedding collapsed.
    - ``mean_pos_dist``: mean d(a,p) over anchor-positive pairs (a != p), 0 when none.
    - ``mean_neg_dist``: mean d(a,n) over anchor-negative pairs, 0 when none.
    - ``embedding_spread``: mean over embedding dimensions of the batch standard deviation;
      drops towards 0 when all embeddings collapse to one point.
    """
    batch = _Batch(labels, tf.stop_gradient(tf.convert_to_tensor(embeddings)), distance_metric)
    count, _, _ = batch.count_violating(margin)
    n_neg = tf.cast(tf.broadcast_to(batch.n_neg[:, None], tf.shape(count)), tf.float32)
    zeros = tf.zeros_like(n_neg)
    active = tf.reduce_sum(tf.where(batch.pos, tf.cast(count, tf.float32), zeros))
    valid = tf.reduce_sum(tf.where(batch.pos, n_neg, zeros))
    spread = tf.reduce_mean(tf.math.reduce_std(batch.embeddings, axis=0))
    return {
        "active_fraction": tf.math.divide_no_nan(active, valid),
        "mean_pos_dist": _masked_mean(batch.dist, batch.pos),
        "mean_neg_dist": _masked_mean(batch.dist, batch.neg),
        "embedding_spread": tf.where(batch.size > 0, spread, 0.0),
    }


# --------------------------------------------------------------------------- Keras classes

class _TripletLoss(keras.losses.Loss):
    """Keras wrapper: ``y_true`` = labels [B] or [B, 1], ``y_pred`` = embeddings [B, D].

    The functions already reduce to a scalar, so `__call__` returns it as is (no Keras
    reduction; ``sample_weight`` is not supported), only divided by the number of replicas when
    called in a replica context of a distribution strategy, as Keras' own losses are.
    """

    def __init__(self, margin: float = 1.0, distance_metric: DistanceMetric = "L2", name: str | None = None,
                 **kwargs):
        super().__init__(name=name if name is not None else self.default_name, **kwargs)
        self.margin = float(margin)
        if isinstance(distance_metric, dict):
            distance_metric = keras.saving.deserialize_keras_object(distance_metric)
        self.distance_metric = distance_metric

    loss_fn = None  # the loss function of (labels, embeddings, margin, distance_metric)
    default_name = None

    def call(self, y_true, y_pred):
        return self.loss_fn(y_true, y_pred, self.margin, self.distance_metric)

    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(f"{type(self).__name__} reduces over the batch itself: sample_weight is not supported")
        with tf.name_scope(self.name):
            value = self.call(y_true, y_pred)
            context = tf.distribute.get_replica_context()
            replicas = context.num_replicas_in_sync if context is not None else 1
            if replicas > 1:
                value = value / float(replicas)
            return value

    def get_config(self) -> dict:
        config = super().get_config()
        metric = self.distance_metric
        if callable(metric):
            metric = keras.saving.serialize_keras_object(metric)
        config.update(margin=self.margin, distance_metric=metric)
        return config


@keras.saving.register_keras_serializable(package="mbembed")
class TripletSemiHardLoss(_TripletLoss):
    """Keras `Loss` for `triplet_semihard_loss`."""

    loss_fn = staticmethod(triplet_semihard_loss)
    default_name = "triplet_semihard_loss"


@keras.saving.register_keras_serializable(package="mbembed")
class TripletHardLoss(_TripletLoss):
    """Keras `Loss` for `triplet_hard_loss`."""

    def __init__(self, margin: float = 1.0, soft: bool = False, distance_metric: DistanceMetric = "L2",
                 name: str = "triplet_hard_loss", **kwargs):
        super().__init__(margin=margin, distance_metric=distance_metric, name=name, **kwargs)
        self.soft = bool(soft)

    def call(self, y_true, y_pred):
        return triplet_hard_loss(y_true, y_pred, self.margin, self.soft, self.distance_metric)

    def get_config(self) -> dict:
        return {**super().get_config(), "soft": self.soft}


@keras.saving.register_keras_serializable(package="mbembed")
class TripletBatchAllLoss(_TripletLoss):
    """Keras `Loss` for `triplet_batch_all_loss`."""

    loss_fn = staticmethod(triplet_batch_all_loss)
    default_name = "triplet_batch_all_loss"


# --------------------------------------------------------------------------- config

LOSSES: dict[str, type[_TripletLoss]] = {
    "triplet_semihard": TripletSemiHardLoss,
    "triplet_hard": TripletHardLoss,
    "triplet_batch_all": TripletBatchAllLoss,
}
"""Config ``loss.name`` -> Keras loss class (each one's ``call`` is the function of that name)."""


def loss_from_config(name: str, margin: float, distance: str, soft: bool = False) -> _TripletLoss:
    """The loss selected by the config's ``loss`` section, as a Keras `Loss` instance.

    The instance is a callable ``(labels, embeddings) -> float32 scalar`` usable in a custom
    loop or in ``model.compile(loss=...)``. Raises `UserError` naming the offending key.
    """
    if name not in LOSSES:
        raise UserError(f"loss.name: expected one of {sorted(LOSSES)}, received {name!r}")
    if distance not in DISTANCE_METRICS:
        raise UserError(f"loss.distance: expected one of {list(DISTANCE_METRICS)}, received {distance!r}")
    if not margin >= 0.0:
        raise UserError(f"loss.margin: expected a number >= 0, received {margin!r}")
    if name == "triplet_hard":
        return TripletHardLoss(margin=margin, soft=soft, distance_metric=distance)
    if soft:
        raise UserError(f"loss.soft: only applies to loss.name 'triplet_hard', received loss.name {name!r}")
    return LOSSES[name](margin=margin, distance_metric=distance)


def triplet_loss_from_config(loss_cfg, name: str | None = None) -> _TripletLoss:
    """The triplet loss `name` (default ``loss_cfg.name``) with its options ``loss_cfg.<name>``."""
    name = name or loss_cfg.name
    if name not in LOSSES:
        raise UserError(f"loss.name: expected one of {sorted(LOSSES)}, received {name!r}")
    options = getattr(loss_cfg, name)
    return loss_from_config(name, options.margin, options.distance, getattr(options, "soft", False))
