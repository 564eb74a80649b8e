"""tf.distribute for training: choosing the strategy, who is chief, and handing replicas their slice.

One custom training loop serves every strategy (Keras 3 `fit` fails under
`MultiWorkerMirroredStrategy` on TF 2.21: `ValueError` on a `PerReplica`): a `tf.function` step calls
`strategy.run`; each replica gets a contiguous slice of the global P x K batch holding whole
identities (P divisible by the number of replicas).

Input: every worker builds its own P x K pipeline for the identities of its replicas (sampler
seeds differ per worker, see `mobilenet_embed.data.pk_batches`), so no `tf.data` auto-sharding is
applied to the batches; a worker then splits its batch into its local replicas' slices with
`replica_slices`.

`train.strategy`:

- ``auto``: ``mirrored`` when more than one GPU is visible, else ``default``.
- ``default``: the default (one-device) strategy.
- ``mirrored``: `tf.distribute.MirroredStrategy` over all visible GPUs (over all logical CPU
  devices when there is no GPU, which is how tests run two replicas on a CPU).
- ``multi_worker``: `tf.distribute.MultiWorkerMirroredStrategy` from the standard ``TF_CONFIG``
  environment variable (the cluster and this process's task); must be created before TensorFlow
  runs anything else, which `mbembed train` does.

N GPUs on one machine: ``mbembed train --config F --set train.strategy=mirrored`` (``auto`` picks
it when more than one GPU is visible). ``train.identities_per_batch`` (P) is the global number of
identities and must be a multiple of the number of GPUs; each GPU gets P / N whole identities.

N machines: run the same command on every machine, each with its own ``TF_CONFIG``, e.g. on the
first of two::

    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                "task": {"type": "worker", "index": 0}}' \
        mbembed train --config F --set train.strategy=multi_worker --run-dir /shared/runs/x

and ``"index": 1`` on the second. Worker 0 (or a ``chief`` task) is the chief: it alone writes the
run directory (checkpoints, logs, model.keras), which must be on a filesystem every worker can read
(to resume). Each worker reads its own P / num_workers identities per step (distinct identity
groups and sampler seeds per worker; TFRecord shards split between workers by the data pipeline).

``train.cross_replica_mining``: off, each replica mines triplets within its own P / N identities
and the loss is the mean of the replicas' losses; on, embeddings and labels are gathered so that
every anchor mines over the global batch, exactly as one big device would (same loss and
gradients to 1e-5). It costs one all-reduce of the [B, D] embeddings and the labels plus mining
over the global batch on every replica (measured +9% step time on two logical CPU devices,
``scripts/bench.py distribute``). ``train.sync_batch_norm`` additionally computes batch-norm
statistics over the global batch (one all-reduce per batch-norm layer); with both on a step
equals the one-device step. Moving averages are kept equal across replicas either way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import tensorflow as tf

from mobilenet_embed.errors import UserError


@dataclass(frozen=True)
class WorkerInfo:
    """Where this process stands in the cluster (one worker, index 0, chief, outside a cluster)."""

    index: int  # 0 .. num_workers - 1, the chief first
    num_workers: int
    is_chief: bool
    local_replicas: int
    num_replicas: int  # in sync, all workers together


def _tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG", "")
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise UserError(f"TF_CONFIG: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"TF_CONFIG: expected a JSON object with 'cluster' and 'task', received {raw!r}")
    return data


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The `tf.distribute.Strategy` for `train.strategy` (see the module docstring)."""
    if name == "auto":
        # physical devices: listing them does not start the runtime (collectives need that later)
        name = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        if len(devices) > 1 and not gpus:
            # No NCCL between CPU devices: reduce through one device.
            return tf.distribute.MirroredStrategy(
                devices=devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        config = _tf_config()
        cluster, task = config.get("cluster"), config.get("task")
        if not cluster or not task:
            raise UserError("train.strategy: 'multi_worker' needs the TF_CONFIG environment variable "
                            "with 'cluster' and 'task', e.g. TF_CONFIG='{\"cluster\": {\"worker\": "
                            "[\"host1:12345\", \"host2:12345\"]}, \"task\": {\"type\": \"worker\", "
                            "\"index\": 0}}'")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise UserError(f"train.strategy: expected one of auto, default, mirrored, multi_worker, received {name!r}")


def worker_info(strategy: tf.distribute.Strategy) -> WorkerInfo:
    """This process's worker index, the worker count and whether it is the chief."""
    num_replicas = int(strategy.num_replicas_in_sync)
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return WorkerInfo(0, 1, True, num_replicas, num_replicas)
    spec = resolver.cluster_spec().as_dict()
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    n_chief = len(spec.get("chief", []))
    n_workers = n_chief + len(spec.get("worker", []))
    if task_type == "chief":
        index = 0
    elif task_type == "worker":
        index = n_chief + task_id
    else:
        raise UserError(f"TF_CONFIG: task type {task_type!r} cannot train (expected chief or worker)")
    is_chief = index == 0
    local = num_replicas // max(n_workers, 1)
    return WorkerInfo(index, max(n_workers, 1), is_chief, local, num_replicas)


def check_batch_split(identities_per_batch: int, images_per_identity: int, num_replicas: int) -> int:
    """Identities per replica; a clear error when P does not split into whole identities."""
    if identities_per_batch % num_replicas:
        raise UserError(
            f"train.identities_per_batch: expected a multiple of the {num_replicas} replicas (each "
            f"replica mines within whole identities), received {identities_per_batch}")
    return identities_per_batch // num_replicas


def replica_slices(strategy: tf.distribute.Strategy, images: tf.Tensor, labels: tf.Tensor,
                   local_replicas: int):
    """Split this worker's batch into contiguous per-replica slices, as distributed values.

    The batch is identity-major (K images of one identity, then the next), so with P' identities
    per replica each slice holds whole identities. Works eagerly and inside `tf.function`.
    """
    if local_replicas == 1:
        def one(ctx):
            return images, labels
        return strategy.experimental_distribute_values_from_function(one)
    per_replica = tf.shape(labels)[0] // local_replicas

    def value_fn(ctx: tf.distribute.experimental.ValueContext):
        local = ctx.replica_id_in_sync_group % local_replicas
        start = local * per_replica
        return images[start:start + per_replica], labels[start:start + per_replica]

    return strategy.experimental_distribute_values_from_function(value_fn)


def gather_replicas(ctx: tf.distribute.ReplicaContext, x: tf.Tensor) -> tf.Tensor:
    """Concatenate every replica's `x` along axis 0 (replica order), differentiably.

    Each replica pads its slice with zeros to the global batch at its own offset, and the padded
    tensors are summed across replicas. (`ReplicaContext.all_gather` does the same job but fails
    inside a `tf.function` under MultiWorkerMirroredStrategy on TF 2.21: "destinations can not be
    empty".) The gradient of the all-reduce sums the upstream gradients of every replica, and the
    local slice of it flows back: with every replica computing the same loss L / R on the gathered
    batch, the summed parameter gradient is exactly dL/dtheta. All slices must have the same size.
    """
    replicas = ctx.num_replicas_in_sync
    if replicas == 1:
        return x
    index = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    n = tf.shape(x)[0]
    paddings = tf.concat([tf.stack([[index * n, (replicas - 1 - index) * n]]),
                          tf.zeros([tf.rank(x) - 1, 2], tf.int32)], axis=0)
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.pad(x, paddings))


def same_on_all_workers(strategy: tf.distribute.Strategy, value: int, what: str) -> None:
    """Raise when `value` (e.g. the resumed step) differs between workers."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    v = tf.constant([float(value)])

    def fn():
        every = tf.distribute.get_replica_context().all_gather(v, axis=0)  # one value per replica
        return tf.reduce_min(every), tf.reduce_max(every)

    low, high = strategy.run(tf.function(fn))
    low = float(strategy.experimental_local_results(low)[0])
    high = float(strategy.experimental_local_results(high)[0])
    if low != high:
        raise UserError(f"workers disagree on {what} ({low:g} vs {high:g}): is the run directory on a "
                        "filesystem that every worker sees?")


# --------------------------------------------------------------------------- row-sharded variables


def row_shards(strategy: tf.distribute.Strategy) -> int:
    """How many replicas can each hold their own rows of a variable (`shard_rows_variable`): the
    replica count under `tf.distribute.MirroredStrategy` (one process, its devices), else 1 (one
    device; `MultiWorkerMirroredStrategy`, whose chief alone could not write every worker's rows)."""
    if isinstance(strategy, tf.distribute.MirroredStrategy) and strategy.num_replicas_in_sync > 1:
        return int(strategy.num_replicas_in_sync)
    return 1


def _components(variable) -> tuple:
    """The per-replica tf.Variables of a (Keras-wrapped) mirrored variable, in replica order."""
    inner = getattr(variable, "value", variable)
    return tuple(inner.values)


def shard_rows(full: tf.Tensor, per: int, num_shards: int) -> list:
    """`full` ``[N, ...]`` cut into `num_shards` pieces of `per` rows (zero rows pad the last ones)."""
    full = tf.convert_to_tensor(full)
    pad = per * num_shards - int(full.shape[0])
    if pad:
        full = tf.concat([full, tf.zeros([pad, *full.shape[1:]], full.dtype)], axis=0)
    return [full[i * per:(i + 1) * per] for i in range(num_shards)]


def assign_row_shards(variable, full: tf.Tensor) -> None:
    """Put rows ``r * per .. (r + 1) * per - 1`` of `full` on replica r's copy of `variable`
    (``per`` the variable's row count)."""
    parts = _components(variable)
    for component, rows in zip(parts, shard_rows(full, int(parts[0].shape[0]), len(parts))):
        with tf.device(component.device):
            component.assign(tf.cast(rows, component.dtype))


def gather_row_shards(variable, rows: int) -> tf.Tensor:
    """The first `rows` rows of the replicas' copies of `variable` stacked in replica order (on the CPU)."""
    with tf.device("/cpu:0"):
        return tf.concat([tf.identity(c.read_value()) for c in _components(variable)], axis=0)[:rows]


def checkpoint_row_shards(variable, rows: int) -> None:
    """Make a checkpoint of the Keras `variable` hold its replicas' rows as one ``[rows, ...]``
    tensor (as a one-device variable is saved; a `MirroredVariable` would save replica 0's copy
    alone) and a restore cut it into the replicas' rows again. The checkpoint is thus the same for
    any replica count."""

    def serialize():
        return {"VARIABLE_VALUE": gather_row_shards(variable, rows)}

    def restore(restored: dict):
        assign_row_shards(variable, restored["VARIABLE_VALUE"])

    variable._serialize_to_tensors = serialize  # the instance's, seen first by tf.train.Checkpoint
    variable._restore_from_tensors = restore
