"""The train step: one optimizer step on a global batch under any `tf.distribute` strategy.

`TrainStep` differentiates the embedding model's variables and, with a margin head
(`mobilenet_embed.heads`), the head's class centres in one tape, sums the gradients across
replicas, clips them by their global norm and applies them (see `mobilenet_embed.train` for
the gradient scaling across replicas).
"""

from __future__ import annotations

from typing import Callable, Optional


class TrainStep:
    """One optimizer step on a global batch, under any strategy (see the module docstring).

    `loss_fn(labels, embeddings) -> scalar` is the unscaled mean over the batch it is given.
    With a margin `head` (`mobilenet_embed.heads`) the loss is ``head(labels, embeddings)`` plus
    ``triplet_weight * loss_fn(...)`` when that weight is > 0; the head's centres are
    differentiated and updated with the model's variables, and with several replicas the batch
    is always all-gathered (each replica computes the logits of its shard of the classes).
    Calling returns a dict of scalars averaged over replicas: ``loss``, ``grad_norm`` (before
    clipping), with a head and a triplet term the two unweighted terms ``head_loss`` and
    ``triplet_loss`` (``loss = head_weight * head_loss + triplet_weight * triplet_loss``;
    ``head_weight``, logged too, is 1 unless `head_fade` = (start, end) steps fades it, see
    `mobilenet_embed.heads.head_fade_weight`), during a head's margin warm-up the step's
    ``margin`` (`mobilenet_embed.heads.warmed_margin`) and, when `with_stats`,
    the mining statistics of `mobilenet_embed.losses.mining_stats`.
    """

    def __init__(self, strategy, model, optimizer, loss_fn: Callable, *, margin: float, distance: str,
                 cross_replica_mining: bool = False, clip_norm: Optional[float] = None,
                 jit_compile: bool = False, local_replicas: int = 1, step_variable=None, head=None,
                 triplet_weight: float = 0.0, head_fade: Optional[tuple] = None):
        import tensorflow as tf

        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.margin = float(margin)
        self.distance = distance
        self.cross_replica_mining = bool(cross_replica_mining)
        self.clip_norm = clip_norm
        self.local_replicas = int(local_replicas)
        self.step_variable = step_variable
        self.head = head
        self.triplet_weight = float(triplet_weight)
        if head_fade is not None and (head is None or step_variable is None or not triplet_weight):
            raise ValueError("head_fade needs a head, a triplet term and the step variable (it reads the step)")
        self.head_fade = head_fade
        self.loss_scaled = hasattr(optimizer, "scale_loss") and hasattr(optimizer, "inner_optimizer")
        self._replica_fns = {
            stats: (tf.function(self._make_replica_fn(stats), jit_compile=True) if jit_compile
                    else self._make_replica_fn(stats))
            for stats in (False, True)
        }
        self._steps = {stats: tf.function(self._make_step(stats)) for stats in (False, True)}

    def _make_replica_fn(self, with_stats: bool):
        import tensorflow as tf

        from mobilenet_embed.distribute import gather_replicas
        from mobilenet_embed.losses import mining_stats

        def replica_fn(images, labels):
            ctx = tf.distribute.get_replica_context()
            replicas = ctx.num_replicas_in_sync
            variables = list(self.model.trainable_variables)
            if self.head is not None:
                variables += list(self.head.trainable_variables)
            with tf.GradientTape() as tape:
                embeddings = tf.cast(self.model(images, training=True), tf.float32)
                if (self.cross_replica_mining or self.head is not None) and replicas > 1:
                    embeddings = gather_replicas(ctx, embeddings)
                    labels = gather_replicas(ctx, labels)
                terms = {}
                if self.head is None:
                    loss = tf.cast(self.loss_fn(labels, embeddings), tf.float32)
                else:
                    loss = self.head(labels, embeddings)
                    if self.triplet_weight > 0:
                        triplet = tf.cast(self.loss_fn(labels, embeddings), tf.float32)
                        terms = {"head_loss": loss, "triplet_loss": triplet}
                        if self.head_fade is not None:
                            from mobilenet_embed.heads import head_fade_weight

                            terms["head_weight"] = head_fade_weight(self.step_variable.read_value(), *self.head_fade)
                            loss = terms["head_weight"] * loss
                        loss = loss + self.triplet_weight * terms["triplet_loss"]
                    if self.head.margin_warmup_steps:
                        terms["margin"] = tf.cast(self.head.margin(), tf.float32)
                objective = loss / float(replicas)
                if self.model.losses:
                    objective += tf.add_n([tf.cast(x, tf.float32) for x in self.model.losses]) / float(replicas)
                if self.loss_scaled:
                    objective = self.optimizer.scale_loss(objective)
            grads = tape.gradient(objective, variables)
            grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
            grads, grad_norm = self._sum_across_replicas(ctx, grads)
            scale = tf.cast(self.optimizer.dynamic_scale, tf.float32) if self.loss_scaled else 1.0
            if self.clip_norm:
                grads, _ = tf.clip_by_global_norm(grads, self.clip_norm * scale, use_norm=grad_norm)
            self.optimizer.apply(grads, variables)
            if replicas > 1:
                self._average_moving_statistics(ctx)
            out = {"loss": loss, "grad_norm": grad_norm / scale, **terms}
            if with_stats:
                out.update(mining_stats(labels, embeddings, self.margin, self.distance))
            return out

        return replica_fn

    def _sum_across_replicas(self, ctx, grads: list) -> tuple:
        """(gradients summed over replicas, their global norm). A sharded head's gradient (the
        last one) is the whole gradient of this replica's centres already and stays local; its
        squared norm is summed across replicas instead, and a non-finite value on any replica
        makes every replica's head gradient non-finite (so a loss-scale optimizer skips the step
        on all of them alike)."""
        import tensorflow as tf

        replicas = ctx.num_replicas_in_sync
        if replicas == 1:
            return grads, tf.linalg.global_norm(grads)
        if self.head is None or not getattr(self.head, "sharded", False):
            grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            return grads, tf.linalg.global_norm(grads)
        shared = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads[:-1])
        head_sq = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(tf.square(grads[-1])))
        head_grad = grads[-1] + 0.0 * head_sq  # NaN / inf everywhere when on any replica
        norm = tf.sqrt(tf.square(tf.linalg.global_norm(shared)) + head_sq)
        return list(shared) + [head_grad], norm

    def _average_moving_statistics(self, ctx) -> None:
        """Average the float non-trainable variables (batch-norm moving mean and variance) over
        replicas after each step. Keras 3 creates them with aggregation "none", so every replica
        would otherwise keep the averages of its own slices and the copies (and the workers) drift
        apart; this is what Keras 2's "mean" aggregation did."""
        import tensorflow as tf

        stats = [v for v in self.model.non_trainable_variables if v.dtype in ("float16", "bfloat16", "float32",
                                                                               "float64")]
        if not stats:
            return
        means = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in stats])
        for var, mean in zip(stats, means):
            var.assign(mean)

    def _make_step(self, with_stats: bool):
        import tensorflow as tf

        from mobilenet_embed.distribute import replica_slices

        replica_fn = self._replica_fns[with_stats]

        def step(images, labels):
            per_replica = replica_slices(self.strategy, images, labels, self.local_replicas)
            out = self.strategy.run(replica_fn, args=per_replica)
            out = {k: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in out.items()}
            if self.step_variable is not None:
                self.step_variable.assign_add(1)
            return out

        return step

    def __call__(self, images, labels, with_stats: bool = True) -> dict:
        return self._steps[bool(with_stats)](images, labels)

