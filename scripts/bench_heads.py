"""Margin-head benchmark: `python scripts/bench.py heads [options]`.

Two tables, each measured side by side in one run:

1. **Train step per head**: mbembed's train step (`mobilenet_embed.train.TrainStep`: model
   forward and backward, the loss, Adam on the model and the class centres) on one in-memory
   batch at the LFW recipe's size (alpha 0.5, 96x96, P x K = 32 x 4, 1,499 identities, D 128),
   for the semi-hard triplet loss and every margin head, interleaved ``--repeats`` times; the
   ratio of each head's median to the triplet step's (target <= 1.1).
2. **The head alone at scale**: forward + backward of `mobilenet_embed.heads.margin_softmax_loss`
   (ArcFace, gradients of the embeddings and of the centres, no optimizer) for a batch of
   ``--batch`` embeddings of ``--dim`` against 10k, 100k and 1M identities: on one device; sharded
   over two logical CPU devices (each holds half of the centres, the batch all-gathered, the
   normaliser all-reduced); and with ``sample_rate 0.1`` on one device. Each case runs in its own
   process (logical devices are fixed at start-up, and the process's peak resident memory is the
   case's); reported: median ms and peak RSS in MB, beside the size of W alone.

Writes JSON to ``--out`` (default bench/heads.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from benchutil import machine_info, write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = ("softmax", "cosface", "arcface", "subcenter_arcface")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench.py heads", description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--P", type=int, default=32)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--identities", type=int, default=1499, help="class centres of the train-step table")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scales", default="10000,100000,1000000", help="identity counts of the second table")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5, help="timed forward+backward calls per case")
    ap.add_argument("--skip-steps", action="store_true", help="only the second table")
    ap.add_argument("--skip-scales", action="store_true", help="only the first table")
    ap.add_argument("--steps-from", metavar="JSON", help="with --skip-steps: keep the first table of this earlier result")
    ap.add_argument("--case", nargs=2, metavar=("IDENTITIES", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join("bench", "heads.json"))
    return ap


# --------------------------------------------------------------------------- table 1


def measure_steps(args) -> dict:
    """Median ms per train step of the triplet loss and every head, interleaved."""
    import keras
    import tensorflow as tf

    from mobilenet_embed.config import load_config
    from mobilenet_embed.heads import head_from_config
    from mobilenet_embed.losses import triplet_loss_from_config
    from mobilenet_embed.model import build_model_from_config
    from mobilenet_embed.optim import build_optimizer
    from mobilenet_embed.train import TrainStep

    batch = args.P * args.K
    rng = tf.random.Generator.from_seed(0)
    images = rng.uniform([batch, args.image_size, args.image_size, 3], -1.0, 1.0)
    labels = tf.repeat(tf.range(args.P, dtype=tf.int32) * 7 % args.identities, args.K)
    steps = {}
    for name in ("triplet_semihard",) + HEADS:
        cfg = load_config(None, [f"model.alpha={args.alpha}", "model.embedding_size=128", f"loss.name={name}"])
        keras.utils.set_random_seed(0)
        model = build_model_from_config(cfg.model, args.image_size)
        opt = build_optimizer(cfg.train, model)
        head = None
        if name != "triplet_semihard":
            head = head_from_config(cfg.loss, args.identities, 128)
        opt.build(list(model.trainable_variables) + (list(head.trainable_variables) if head else []))
        steps[name] = TrainStep(tf.distribute.get_strategy(), model, opt, triplet_loss_from_config(
            cfg.loss, "triplet_semihard").call, margin=0.2, distance="squared-L2", head=head)
        for _ in range(args.warmup):
            float(steps[name](images, labels, with_stats=False)["loss"])
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                float(step(images, labels, with_stats=False)["loss"])
            times[name].append(1000 * (time.perf_counter() - t0) / args.steps)
    out = {name: {"ms": t, "median": statistics.median(t)} for name, t in times.items()}
    base = out["triplet_semihard"]["median"]
    for name in out:
        out[name]["vs_triplet"] = out[name]["median"] / base
    return out


# --------------------------------------------------------------------------- table 2


def _peak_rss_mb() -> float:
    """This process's resident-memory high-water mark (VmHWM: reset at exec, unlike ru_maxrss,
    which a child started by a large parent inherits)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(identities: int, mode: str, args) -> dict:
    """One forward+backward case in this process (called through ``--case``)."""
    import tensorflow as tf

    if mode == "sharded2":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from mobilenet_embed.distribute import gather_replicas
    from mobilenet_embed.heads import arcface_target, margin_softmax_loss

    def target(c):
        return arcface_target(c, 0.5)

    b, d = args.batch, args.dim
    base_rss = _peak_rss_mb()
    labels = tf.random.stateless_uniform([b], [1, 2], 0, identities, dtype=tf.int64)
    emb = tf.random.stateless_normal([b, d], [3, 4])
    if mode == "sharded2":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"],
                                                  cross_device_ops=tf.distribute.ReductionToOneDevice())
        half = identities // 2

        def shard(ctx):
            r = ctx.replica_id_in_sync_group
            return (emb[r * (b // 2):(r + 1) * (b // 2)], labels[r * (b // 2):(r + 1) * (b // 2)],
                    tf.random.stateless_normal([half, d], [5, r]) * 0.01, tf.constant(r * half, tf.int64))

        parts = strategy.experimental_distribute_values_from_function(shard)

        def replica(e, y, w, start):
            ctx = tf.distribute.get_replica_context()
            with tf.GradientTape() as tape:
                tape.watch([e, w])
                loss = margin_softmax_loss(gather_replicas(ctx, y), gather_replicas(ctx, e), w, target, 64.0,
                                           class_offset=start, ctx=ctx) / 2.0
            ge, gw = tape.gradient(loss, [e, w])
            return loss, tf.reduce_sum(ge), tf.reduce_sum(gw)

        @tf.function
        def call():
            return strategy.run(replica, args=parts)
    else:
        w = tf.random.stateless_normal([identities, d], [5, 0]) * 0.01
        rate = 0.1 if mode == "sample0.1" else 1.0

        @tf.function
        def call():
            with tf.GradientTape() as tape:
                tape.watch([emb, w])
                loss = margin_softmax_loss(labels, emb, w, target, 64.0, sample_rate=rate,
                                           sample_key=tf.constant([7, 8], tf.int64))
            ge, gw = tape.gradient(loss, [emb, w])
            return loss, tf.reduce_sum(ge), tf.reduce_sum(tf.convert_to_tensor(gw))

    for _ in range(2):  # trace and warm up
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, call())
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        out = call()
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)
        times.append(1000 * (time.perf_counter() - t0))
    peak = _peak_rss_mb()
    return {"identities": identities, "mode": mode, "ms": times, "median_ms": statistics.median(times),
            "peak_rss_mb": peak, "start_rss_mb": base_rss, "w_mb": identities * d * 4 / 2 ** 20}


def measure_scales(args) -> list:
    rows = []
    for identities in [int(x) for x in args.scales.split(",")]:
        for mode in ("one", "sharded2", "sample0.1"):
            cmd = [sys.executable, os.path.abspath(__file__), "--case", str(identities), mode,
                   "--batch", str(args.batch), "--dim", str(args.dim), "--reps", str(args.reps)]
            env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                       TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
            if proc.returncode != 0:
                raise SystemExit(f"case {identities} {mode} failed:\n{proc.stderr[-2000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  {identities:>9,d} {mode:>10s}: {r['median_ms']:9.1f} ms  peak RSS {r['peak_rss_mb']:8.0f} MB "
                  f"(+{r['peak_rss_mb'] - r['start_rss_mb']:.0f} over start-up; W {r['w_mb']:.0f} MB)",
                  flush=True)
    return rows


def main(argv: list[str]) -> dict:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.case:
        print(json.dumps(run_case(int(args.case[0]), args.case[1], args)))
        return {}
    result = {
        "benchmark": "heads",
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("case", "out")},
    }
    if args.skip_steps and args.steps_from:
        with open(args.steps_from, encoding="utf-8") as fh:
            result["steps"] = json.load(fh)["steps"]
    if not args.skip_steps:
        print(f"train step, {args.image_size}x{args.image_size}, alpha {args.alpha:g}, P x K = {args.P} x {args.K}, "
              f"{args.identities} identities, median of {args.repeats} x {args.steps} steps")
        result["steps"] = measure_steps(args)
        for name, r in result["steps"].items():
            print(f"  {name:18s} {r['median']:8.1f} ms/step  {r['vs_triplet']:5.2f}x triplet")
    if not args.skip_scales:
        print(f"head forward+backward (ArcFace, batch {args.batch}, D {args.dim}), median of {args.reps}")
        result["scales"] = measure_scales(args)
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main(sys.argv[1:])
