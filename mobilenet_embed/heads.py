"""Margin-softmax heads: softmax, CosFace, ArcFace and sub-centre ArcFace over class centres.

A head holds the class-centre matrix ``W [identities * k, D]`` (float32 always, k sub-centres per
identity, identity-major) and turns (labels, embeddings) into the margin-softmax cross-entropy:

    cos_j   = <e / |e|, w_j / |w_j|>               (max over the k sub-centres of identity j)
    logit_j = s * cos_j                              j != y
    logit_y = s * target(cos_y)                      the true class, with the head's margin
    loss    = mean over the batch of  logsumexp_j(logit_j) - logit_y

with ``target`` one of the pure functions below (`softmax_target`, `cosface_target`,
`arcface_target`), as in insightface's CombinedMarginLoss (arcface_torch).

Sharding (Partial FC, An et al. 2021). `margin_softmax_loss` works on one replica's slice of the
classes: it takes the *global* batch of embeddings (all-gathered, see
`mobilenet_embed.distribute.gather_replicas`), the local centres and their first class number.
The row maximum and the sum of exponentials are reduced across replicas (an all-reduce of
``[B]`` vectors), the true-class logit is summed from the one replica that holds it, so that every
replica gets the same global loss ``L``; minimising ``L / R`` per replica (the train step's
scaling) makes the gradient of each replica's centres exactly ``dL/dW_local`` and the summed
gradient of the model exactly the one-device one (tested on two logical CPU devices to 1e-5).
Storage: under `tf.distribute.MirroredStrategy` with R > 1 replicas each replica's copy of ``W``
holds only its ``ceil(C / R)`` classes' rows (`mobilenet_embed.distribute.row_shards`), and so do
the optimizer's slots of it (`MarginHead.track_optimizer_slots`); their gradients stay local.
Checkpoints hold the whole matrix either way (`mobilenet_embed.distribute.checkpoint_row_shards`).
Elsewhere (one device, `MultiWorkerMirroredStrategy`) ``W`` is one (mirrored) variable and each
replica slices its classes out of it.
``sample_rate < 1`` keeps, per replica and step, the centres of the batch's identities plus a
random (stateless, seeded by step and replica) subset of the others: ``max(ceil(rate * C_local),
min(B, C_local))`` centres, so every positive is always kept.

Precision: embeddings of any float dtype are cast to float32; cosines, logits and loss are
float32 under mixed precision.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import keras
import tensorflow as tf

from mobilenet_embed.config import LOSS_REGISTRY, MARGIN_HEADS
from mobilenet_embed.errors import UserError

TAG_SAMPLE = 0x5A4C  # stateless seed tag of the Partial FC negative sampling


# --------------------------------------------------------------------------- pure margin functions

def softmax_target(cos: tf.Tensor) -> tf.Tensor:
    """Normalised softmax (NormFace): the true class's cosine unchanged."""
    return cos


def cosface_target(cos: tf.Tensor, margin: float) -> tf.Tensor:
    """CosFace / AM-softmax: ``cos(theta) - m``."""
    return cos - margin


def arcface_target(cos: tf.Tensor, margin, easy_margin: bool = False) -> tf.Tensor:
    """ArcFace: ``cos(theta + m)``, with insightface's handling where ``theta + m`` leaves [0, pi].

    ``cos(theta + m)`` is not monotonic in theta beyond ``pi - m``: there (``cos <= cos(pi - m)``)
    the default uses ``cos - m sin(m)`` (CombinedMarginLoss' ``target - sinmm``), a linear
    continuation; with `easy_margin` the margin is applied only where ``cos > 0`` and the plain
    cosine is kept elsewhere. ``sin(theta)`` is ``sqrt(max(1 - cos^2, 1e-12))``: finite gradient
    at ``cos = +-1``. `margin` is a number or a float32 scalar tensor (`warmed_margin`).
    """
    trig = math if isinstance(margin, (int, float)) else tf.math
    sin = tf.sqrt(tf.maximum(1.0 - tf.square(cos), 1e-12))
    with_margin = cos * trig.cos(margin) - sin * trig.sin(margin)
    if easy_margin:
        return tf.where(cos > 0.0, with_margin, cos)
    return tf.where(cos > trig.cos(math.pi - margin), with_margin, cos - trig.sin(math.pi - margin) * margin)


def warmed_margin(step: tf.Tensor, margin: float, warmup_steps: int) -> tf.Tensor:
    """The margin at 0-based `step` under ``loss.margin_warmup_epochs`` (in steps): ``m * step /
    warmup_steps`` up to `warmup_steps`, ``m`` from then on, so training starts as a plain
    normalised softmax and the margin grows as the centres form (float32 scalar)."""
    progress = tf.cast(step, tf.float32) / float(max(warmup_steps, 1))
    return float(margin) * tf.minimum(progress, 1.0)


def subcenter_max(cos: tf.Tensor, subcenters: int) -> tf.Tensor:
    """``[B, C * k]`` cosines to identity-major sub-centres -> ``[B, C]``, the max over each identity's k."""
    if subcenters == 1:
        return cos
    return tf.reduce_max(tf.reshape(cos, [tf.shape(cos)[0], -1, subcenters]), axis=2)


# --------------------------------------------------------------------------- the sharded loss

def sample_classes(local_labels: tf.Tensor, is_local: tf.Tensor, num_local, num_sample, key: tf.Tensor) -> tf.Tensor:
    """Sorted local class numbers ``[num_sample]``: every class in ``local_labels[is_local]`` plus
    random others (Partial FC: positives scored 2, others uniform in [0, 1), top ``num_sample``).
    Static shapes throughout (no boolean masks), so it compiles under XLA."""
    score = tf.random.stateless_uniform(tf.reshape(tf.cast(num_local, tf.int32), [1]), seed=key,
                                        alg="philox")  # the same draws on every device and under XLA
    safe = tf.where(is_local, local_labels, tf.zeros_like(local_labels))
    score = tf.tensor_scatter_nd_max(score, safe[:, None], tf.where(is_local, 2.0, 0.0))
    return tf.sort(tf.math.top_k(score, k=num_sample, sorted=False).indices)


def _cross_replica(ctx, op: str, x: tf.Tensor) -> tf.Tensor:
    """Sum (op "sum") or max (op "max") of `x` over the replicas of `ctx` (identity without)."""
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x
    if op == "sum":
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, x)
    from mobilenet_embed.distribute import gather_replicas  # ReduceOp has no MAX: gather, then max

    return tf.reduce_max(gather_replicas(ctx, x[None]), axis=0)


def margin_softmax_loss(labels: tf.Tensor, embeddings: tf.Tensor, centres: tf.Tensor,
                        target: Callable[[tf.Tensor], tf.Tensor], scale: float, *, subcenters: int = 1,
                        class_offset=0, ctx: Optional[tf.distribute.ReplicaContext] = None,
                        sample_rate: float = 1.0, sample_key: Optional[tf.Tensor] = None) -> tf.Tensor:
    """Mean margin-softmax cross-entropy of the batch, float32 scalar (module docstring).

    `labels` ``[B]`` global class numbers, `embeddings` ``[B, D]`` (the global batch when
    sharded), `centres` ``[C_local * subcenters, D]`` the rows of classes ``class_offset ..
    class_offset + C_local - 1``. With `ctx` (a replica context with R > 1) the normaliser and
    the true-class logits are reduced across replicas; every replica returns the same value.
    ``sample_rate < 1`` needs `sample_key` (a stateless ``[2]`` seed, different per replica).
    """
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
    e = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=1)
    w = tf.cast(centres, tf.float32)
    num_local = tf.shape(w, out_type=tf.int64)[0] // subcenters
    if w.shape[0] is not None:
        num_local = w.shape[0] // subcenters  # static when known: XLA needs a constant top_k size
    local = labels - tf.cast(class_offset, tf.int64)
    is_local = tf.logical_and(local >= 0, local < num_local)
    if sample_rate < 1.0:
        batch = labels.shape[0] if labels.shape[0] is not None else tf.shape(labels, out_type=tf.int64)[0]
        if isinstance(num_local, int) and isinstance(batch, int):
            num_sample = min(max(math.ceil(sample_rate * num_local), min(batch, num_local)), num_local)
        else:
            wanted = tf.cast(tf.math.ceil(sample_rate * tf.cast(num_local, tf.float32)), tf.int64)
            num_sample = tf.cast(tf.minimum(tf.maximum(wanted, tf.minimum(tf.cast(batch, tf.int64), num_local)),
                                            num_local), tf.int32)
        kept = tf.cast(sample_classes(local, is_local, num_local, num_sample, sample_key), tf.int64)
        rows = tf.reshape(kept[:, None] * subcenters + tf.range(subcenters, dtype=tf.int64)[None, :], [-1])
        w = tf.gather(w, rows)
        # position of each local class among the kept ones (every positive is kept)
        where_kept = tf.tensor_scatter_nd_update(tf.zeros(tf.reshape(num_local, [1]), tf.int64), kept[:, None],
                                                 tf.range(tf.shape(kept, out_type=tf.int64)[0]))
        local = tf.gather(where_kept, tf.where(is_local, local, tf.zeros_like(local)))
    w = tf.math.l2_normalize(w, axis=1)
    cos = subcenter_max(tf.matmul(e, w, transpose_b=True), subcenters)  # [B, C_local]
    safe = tf.where(is_local, local, tf.zeros_like(local))
    cos_y = tf.gather(cos, safe, batch_dims=1)
    # the true class's cosine replaced by its margin version (rows without a local class: unchanged)
    batch_rows = tf.range(tf.shape(labels, out_type=tf.int64)[0])
    logits = scale * tf.tensor_scatter_nd_update(cos, tf.stack([batch_rows, safe], axis=1),
                                                 tf.where(is_local, target(cos_y), cos_y))
    top = _cross_replica(ctx, "max", tf.stop_gradient(tf.reduce_max(logits, axis=1)))
    sum_exp = _cross_replica(ctx, "sum", tf.reduce_sum(tf.exp(logits - top[:, None]), axis=1))
    logit_y = _cross_replica(ctx, "sum", tf.where(is_local, tf.gather(logits, safe, batch_dims=1), 0.0))
    return tf.reduce_mean(tf.math.log(sum_exp) + top - logit_y)


def head_fade_weight(step: tf.Tensor, start: int, end: int) -> tf.Tensor:
    """Weight of the head term at 0-based `step` under ``loss.head_fade_epochs`` (in steps): 1
    before `start`, falling linearly to 0 at `end`, 0 from then on (`start == end`: a switch).
    The head then hands the training over to its triplet term: the head learns fast early, the
    triplet term keeps improving where the head only memorises few-image identities."""
    step = tf.cast(step, tf.float32)
    if end <= start:
        return tf.where(step < float(start), 1.0, 0.0)
    return tf.clip_by_value((float(end) - step) / float(end - start), 0.0, 1.0)


def shard_bounds(num_classes: int, num_shards: int, shard) -> tuple:
    """(first class, class count) of `shard` when `num_classes` are cut into `num_shards` slices of
    ``ceil(C / R)`` (the last one shorter); `shard` may be a tensor."""
    per = -(-num_classes // num_shards)
    start = tf.minimum(tf.cast(shard, tf.int64) * per, num_classes)
    return start, tf.minimum(tf.cast(per, tf.int64), num_classes - start)


# --------------------------------------------------------------------------- heads


class MarginHead(tf.Module):
    """Class centres ``W`` (a float32 `keras.Variable`, ``[identities * k, D]``) and their loss.

    Create it under the training strategy's scope (the centres are a distributed variable; under
    MirroredStrategy each replica stores only its shard: `sharded`), differentiate
    ``trainable_variables`` with the model's, call `track_optimizer_slots` after building the
    optimizer, and put the head in the `tf.train.Checkpoint` beside them; it is never part of the
    embedding model (so neither of ``model.keras`` nor of any export). `loss` in a replica context
    with R > 1 computes the logits of this replica's ``1/R`` of the classes only, on the
    all-gathered batch. `set_centres` / `full_centres` take and give the whole matrix.
    """

    name_: str = ""

    def __init__(self, num_classes: int, embedding_size: int, options, *, sample_rate: float = 1.0,
                 seed: int = 0, step: Optional[tf.Variable] = None, margin_warmup_steps: int = 0):
        super().__init__(name=f"{self.name_}_head")
        if num_classes < 2:
            raise UserError(f"{self.name_}: a margin head needs at least 2 identities, received {num_classes}")
        self.num_classes = int(num_classes)
        self.embedding_size = int(embedding_size)
        self.options = options
        self.subcenters = int(getattr(options, "subcenters", 1))
        self.scale = float(options.scale)
        self.sample_rate = float(sample_rate)
        self.seed = int(seed)
        self.step = step
        if margin_warmup_steps and (step is None or not hasattr(options, "margin")):
            raise ValueError(f"{self.name_}: a margin warm-up needs a head with a margin and the step variable")
        self.margin_warmup_steps = int(margin_warmup_steps)
        from mobilenet_embed import distribute

        init = keras.initializers.RandomNormal(stddev=0.01, seed=seed)
        rows = self.num_classes * self.subcenters
        self.num_shards = distribute.row_shards(tf.distribute.get_strategy())
        if self.num_shards == 1:
            self.centres = keras.Variable(init, shape=(rows, self.embedding_size), dtype="float32", trainable=True,
                                          name="class_centres")
            return
        # each replica's copy holds its own ceil(C / R) classes' rows (the last one zero-padded)
        per = -(-self.num_classes // self.num_shards) * self.subcenters
        self.centres = keras.Variable("zeros", shape=(per, self.embedding_size), dtype="float32", trainable=True,
                                      name="class_centres")
        with tf.device("/cpu:0"):
            self.set_centres(init(shape=(rows, self.embedding_size), dtype="float32"))
        distribute.checkpoint_row_shards(self.centres, rows)

    @property
    def trainable_variables(self):
        return (self.centres,)

    @property
    def sharded(self) -> bool:
        """Whether each replica stores only its shard of the centres (its gradient is then not all-reduced)."""
        return self.num_shards > 1

    def set_centres(self, full) -> None:
        """Assign the whole ``[identities * k, D]`` matrix (each replica takes its rows when sharded)."""
        from mobilenet_embed import distribute

        if self.sharded:
            distribute.assign_row_shards(self.centres, full)
        else:
            self.centres.assign(full)

    def full_centres(self) -> tf.Tensor:
        """The whole ``[identities * k, D]`` matrix (gathered from the replicas when sharded)."""
        from mobilenet_embed import distribute

        if self.sharded:
            return distribute.gather_row_shards(self.centres, self.num_classes * self.subcenters)
        return tf.convert_to_tensor(self.centres.value)

    def track_optimizer_slots(self, optimizer) -> None:
        """Checkpoint the optimizer's per-centre slots (moments...) whole as well, when sharded:
        call after ``optimizer.build``. Slots are the optimizer variables named after the centres."""
        from mobilenet_embed import distribute

        if not self.sharded:
            return
        prefix = self.centres.path.replace("/", "_") + "_"
        for var in optimizer.variables:
            if var.path.split("/")[-1].startswith(prefix) and tuple(var.shape) == tuple(self.centres.shape):
                distribute.checkpoint_row_shards(var, self.num_classes * self.subcenters)

    def target(self, cos: tf.Tensor) -> tf.Tensor:  # pragma: no cover - each head defines it
        raise NotImplementedError

    def margin(self):
        """The margin of this step: ``options.margin``, or during a warm-up `warmed_margin`."""
        if not self.margin_warmup_steps:
            return self.options.margin
        return warmed_margin(self.step.read_value(), self.options.margin, self.margin_warmup_steps)

    def loss(self, labels: tf.Tensor, embeddings: tf.Tensor) -> tf.Tensor:
        """The float32 loss of (global) labels and embeddings; sharded across replicas when there are several."""
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync if ctx is not None else 1
        if self.sharded and replicas != self.num_shards:
            raise ValueError(f"{self.name}: the centres are sharded over {self.num_shards} replicas; call the head "
                             "inside strategy.run (each replica scores its shard), or full_centres() for all of them")
        w = self.centres.value if hasattr(self.centres, "value") else self.centres
        replica = ctx.replica_id_in_sync_group if replicas > 1 else 0
        start, count = shard_bounds(self.num_classes, replicas, replica)
        if self.sharded:
            if self.num_classes % replicas:  # the last shards' zero padding
                w = w[:count * self.subcenters]
        elif replicas > 1:
            w = w[start * self.subcenters:(start + count) * self.subcenters]
        key = None
        if self.sample_rate < 1.0:
            step = self.step.read_value() if self.step is not None else tf.constant(0, tf.int64)
            from mobilenet_embed.data.sampler import fold_key

            key = fold_key(self.seed, TAG_SAMPLE, step, replica)
        return margin_softmax_loss(labels, embeddings, w, self.target, self.scale, subcenters=self.subcenters,
                                   class_offset=start, ctx=ctx if replicas > 1 else None,
                                   sample_rate=self.sample_rate, sample_key=key)

    __call__ = loss


class SoftmaxHead(MarginHead):
    """Normalised softmax (no margin): ``s cos(theta)`` for every class."""

    name_ = "softmax"

    def target(self, cos):
        return softmax_target(cos)


class CosFaceHead(MarginHead):
    """CosFace: ``s (cos(theta_y) - m)`` for the true class."""

    name_ = "cosface"

    def target(self, cos):
        return cosface_target(cos, self.margin())


class ArcFaceHead(MarginHead):
    """ArcFace: ``s cos(theta_y + m)`` for the true class (`arcface_target`)."""

    name_ = "arcface"

    def target(self, cos):
        return arcface_target(cos, self.margin(), self.options.easy_margin)


class SubcenterArcFaceHead(ArcFaceHead):
    """Sub-centre ArcFace (Deng et al. 2020): k centres per identity, the closest one counts."""

    name_ = "subcenter_arcface"


def head_class(name: str) -> type[MarginHead]:
    """The head class registered for `loss.name` (`mobilenet_embed.config.LOSS_REGISTRY`)."""
    if name not in MARGIN_HEADS:
        raise UserError(f"loss.name: expected one of {', '.join(MARGIN_HEADS)}, received {name!r}")
    module, attr = LOSS_REGISTRY[name].implementation.split(":")
    import importlib

    return getattr(importlib.import_module(module), attr)


def head_from_config(loss_cfg, num_classes: int, embedding_size: int, seed: int = 0,
                     step: Optional[tf.Variable] = None, steps_per_epoch: int = 0) -> MarginHead:
    """The margin head of the config's `loss` section (call under the strategy's scope);
    `steps_per_epoch` turns ``loss.margin_warmup_epochs`` into steps (it needs `step`)."""
    cls = head_class(loss_cfg.name)
    warmup = int(round(loss_cfg.margin_warmup_epochs * steps_per_epoch))
    if loss_cfg.margin_warmup_epochs and warmup < 1:
        raise UserError(f"loss.margin_warmup_epochs: {loss_cfg.margin_warmup_epochs:g} epochs of "
                        f"{steps_per_epoch} steps is less than one step")
    return cls(num_classes, embedding_size, getattr(loss_cfg, loss_cfg.name), sample_rate=loss_cfg.sample_rate,
               seed=seed, step=step, margin_warmup_steps=warmup)
