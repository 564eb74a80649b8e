"""Cross-replica mining cost: `python scripts/bench.py distribute [options]`.

Train-step time of the embedding model under `MirroredStrategy` on two logical CPU devices, with
``train.cross_replica_mining`` off (each replica mines within its half of the batch) and on
(embeddings and labels gathered, every replica mines over the whole global batch), next to one
device on the same global batch. Optionally with ``train.sync_batch_norm`` too.

The steps run on one P x K batch of the real pipeline held in memory, so that the input pipeline
does not blur the difference. The measurement runs in a child process (logical devices must be
configured before TensorFlow starts). The variants are measured in turn, ``--repeats`` times;
median and best are reported. Note: two logical devices on one CPU share its cores, so the
absolute step times say nothing about a two-GPU speed-up; the difference between "off" and "on"
is the cost of the gather and of mining over 2x the batch. Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from benchutil import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench.py distribute", description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=0.25)
    ap.add_argument("--P", type=int, default=16, help="identities per global batch")
    ap.add_argument("--K", type=int, default=4, help="images per identity")
    ap.add_argument("--loss", default="triplet_semihard")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sync-bn", action="store_true", help="also measure cross-replica mining + sync batch norm")
    ap.add_argument("--out", default=os.path.join("bench", "distribute.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return ap


def _child(args) -> dict:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    from mobilenet_embed.config import load_config
    from mobilenet_embed.data import pk_batches
    from mobilenet_embed.distribute import make_strategy
    from mobilenet_embed.losses import triplet_loss_from_config
    from mobilenet_embed.model import build_model_from_config
    from mobilenet_embed.optim import build_optimizer
    from mobilenet_embed.train import TrainStep

    cfg = load_config(None, ["data.source=synthetic", f"data.image_size={args.image_size}", "data.val_identities=0",
                             f"model.alpha={args.alpha}", f"train.identities_per_batch={args.P}",
                             f"train.images_per_identity={args.K}", f"loss.name={args.loss}"])
    images, labels = next(iter(pk_batches(cfg, num_replicas=2)))
    mirrored = make_strategy("mirrored")
    one = tf.distribute.get_strategy()
    variants = {"one_device": (one, False, False), "mirrored_mining_off": (mirrored, False, False),
                "mirrored_mining_on": (mirrored, True, False)}
    if args.sync_bn:
        variants["mirrored_mining_on_sync_bn"] = (mirrored, True, True)

    def make(strategy, cross, sync):
        with strategy.scope():
            model = build_model_from_config(cfg.model, args.image_size)
            for layer in model.layers:
                if sync and isinstance(layer, keras.layers.BatchNormalization):
                    layer.synchronized = True
            opt = build_optimizer(cfg.train, model)
            opt.build(model.trainable_variables)
        loss = triplet_loss_from_config(cfg.loss).call
        step = TrainStep(strategy, model, opt, loss, margin=getattr(cfg.loss, cfg.loss.name).margin,
                         distance=getattr(cfg.loss, cfg.loss.name).distance,
                         cross_replica_mining=cross, local_replicas=strategy.num_replicas_in_sync)
        for _ in range(args.warmup):
            float(step(images, labels, with_stats=False)["loss"])
        return step

    steps = {name: make(*spec) for name, spec in variants.items()}
    times: dict[str, list] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                float(step(images, labels, with_stats=False)["loss"])
            times[name].append((time.perf_counter() - t0) / args.steps * 1000)
    return {"times_ms": times, "replicas": mirrored.num_replicas_in_sync,
            "tensorflow": tf.__version__, "keras": keras.__version__}


def main(argv: list[str]) -> dict:
    args = _parser().parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return {}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"), CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--child"], capture_output=True,
                          text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"benchmark child failed (exit code {proc.returncode})")
    child = json.loads(lines[-1][len("RESULT "):])
    times = child["times_ms"]
    result = {
        "benchmark": "distribute",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "tensorflow": child["tensorflow"], "keras": child["keras"], "devices": "2 logical CPU devices",
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "settings": {"image_size": args.image_size, "alpha": args.alpha, "P": args.P, "K": args.K,
                     "loss": args.loss, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats},
        "step_ms": {name: {"runs": v, "median": statistics.median(v), "best": min(v)} for name, v in times.items()},
    }
    off = result["step_ms"]["mirrored_mining_off"]["median"]
    on = result["step_ms"]["mirrored_mining_on"]["median"]
    result["cross_replica_mining_overhead"] = on / off - 1.0
    print(f"train step, {args.image_size}x{args.image_size}, alpha {args.alpha:g}, global P x K = {args.P} x {args.K}, "
          f"{args.loss}, 2 logical CPU devices ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}), "
          f"{args.steps} steps x {args.repeats} repeats")
    print(f"{'':40s} {'ms/step median':>14s} {'best':>8s}")
    labels = {"one_device": "one device (global batch)", "mirrored_mining_off": "2 replicas, mining per replica",
              "mirrored_mining_on": "2 replicas, cross-replica mining",
              "mirrored_mining_on_sync_bn": "2 replicas, cross-replica mining + sync BN"}
    for name, r in result["step_ms"].items():
        print(f"{labels[name]:40s} {r['median']:14.1f} {r['best']:8.1f}")
    print(f"cross-replica mining costs {100 * result['cross_replica_mining_overhead']:+.1f}% step time "
          "(median, on vs off)")
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main(sys.argv[1:])
