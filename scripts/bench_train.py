"""Training-step benchmark: `python scripts/bench.py train [options]`.

Side by side in one run, in training images per second, the same model and batch size:

- ``keras_fit``: a bare ``model.fit`` of the embedding model on one in-memory batch repeated
  (``Dataset.from_tensors(...).repeat()``), with a trivial loss (mean squared embedding), Adam,
  ``jit_compile`` as given (default off: what ``"auto"`` picks on CPU). The ceiling: no input
  pipeline, no mining.
- ``mbembed_train``: the whole ``mbembed train`` loop (`mobilenet_embed.train.train`): the P x K
  pipeline (synthetic images rendered and augmented on the fly), the semi-hard triplet loss with
  its mining, Adam and the schedule, mining statistics every ``--warmup`` steps, checkpoints off
  the clock. Its rate is read from the run's metrics.jsonl windows (the first window, which holds
  tracing and warm-up, dropped).
- two rows that split ``mbembed_train`` up: its train step on one P x K batch held in memory (loop,
  loss, mining and optimizer without the input pipeline), and the P x K pipeline alone (with its
  process CPU time per image). Without an accelerator the pipeline and the model share the CPU
  cores, so the full loop costs roughly the sum of the two.

Both skip ``--warmup`` steps, then time ``--steps`` steps, alternating ``--repeats`` times so that
background load hits both alike. Reported: median and best of each and the ratio of medians
(target >= 0.9). Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

from benchutil import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench.py train", description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=0.25)
    ap.add_argument("--P", type=int, default=16, help="identities per batch")
    ap.add_argument("--K", type=int, default=4, help="images per identity")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (also the logging interval)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--jit-compile", action="store_true", help="XLA for both (default: off, as on CPU)")
    ap.add_argument("--data", default=None, metavar="DIR",
                    help="train on this identity folder (e.g. LFW) instead of synthetic images")
    ap.add_argument("--crop-fraction", type=float, default=1.0, help="with --data: central crop kept")
    ap.add_argument("--out", default=os.path.join("bench", "train.json"))
    return ap


def _config(args, run_dir: str):
    from mobilenet_embed.config import load_config

    steps = args.warmup + args.steps
    source = (["data.source=folder", f"data.path={args.data}", f"data.crop_fraction={args.crop_fraction}"]
              if args.data else ["data.source=synthetic"])
    return load_config(None, source + [
        f"data.image_size={args.image_size}", "data.val_identities=0",
        f"model.alpha={args.alpha}", f"train.identities_per_batch={args.P}", f"train.images_per_identity={args.K}",
        "train.epochs=1", f"train.steps_per_epoch={steps}", f"train.log_every_steps={args.warmup}",
        f"train.checkpoint_every_steps={steps}", f"train.jit_compile={str(args.jit_compile).lower()}",
        "train.strategy=default", f"run_dir={run_dir}",
    ])


def measure_train(args) -> float:
    """Images per second of `train` over the timed steps (harmonic mean of the logged windows)."""
    from mobilenet_embed.train import train

    run_dir = tempfile.mkdtemp(prefix="bench-train-")
    try:
        train(_config(args, run_dir), run_dir=run_dir, fresh=True, force=True, stream=io.StringIO())
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
            rates = [r["images_per_second"] for r in map(json.loads, fh)
                     if r.get("kind") == "train" and "images_per_second" in r]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    rates = rates[1:]  # the first window holds tracing and the pipeline's warm-up
    return len(rates) / sum(1.0 / r for r in rates)


def measure_fit(args, model_cfg) -> float:
    """Images per second of a bare `model.fit` on one in-memory batch repeated."""
    import keras
    import tensorflow as tf

    from mobilenet_embed.model import build_model_from_config

    batch = args.P * args.K
    model = build_model_from_config(model_cfg, args.image_size)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=lambda y, e: tf.reduce_mean(tf.square(e)),
                  jit_compile=args.jit_compile)
    x = tf.random.uniform([batch, args.image_size, args.image_size, 3], -1.0, 1.0)
    y = tf.zeros([batch, model.output_shape[-1]])
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_end(self, step, logs=None):
            times.append(time.perf_counter())

    model.fit(data, epochs=1, steps_per_epoch=args.warmup + args.steps, verbose=0, callbacks=[Timer()])
    timed = times[args.warmup - 1:]
    return (len(timed) - 1) * batch / (timed[-1] - timed[0])


def measure_step_in_memory(args, cfg) -> float:
    """Images per second of mbembed's train step (triplet loss, mining, Adam) on one P x K batch of
    the real pipeline held in memory: the loop without the input pipeline's CPU time."""
    import tensorflow as tf

    from mobilenet_embed.data import pk_batches
    from mobilenet_embed.losses import triplet_loss_from_config
    from mobilenet_embed.model import build_model_from_config
    from mobilenet_embed.optim import build_optimizer
    from mobilenet_embed.train import TrainStep

    images, labels = next(iter(pk_batches(cfg)))
    model = build_model_from_config(cfg.model, args.image_size)
    opt = build_optimizer(cfg.train, model)
    opt.build(model.trainable_variables)
    step = TrainStep(tf.distribute.get_strategy(), model, opt,
                     triplet_loss_from_config(cfg.loss).call,
                     margin=getattr(cfg.loss, cfg.loss.name).margin,
                     distance=getattr(cfg.loss, cfg.loss.name).distance, jit_compile=args.jit_compile)
    for i in range(args.warmup):
        float(step(images, labels, with_stats=i == 0)["loss"])
    float(step(images, labels, with_stats=True)["loss"])
    t0 = time.perf_counter()
    for i in range(1, args.steps + 1):
        float(step(images, labels, with_stats=i % args.warmup == 0)["loss"])
    return args.steps * args.P * args.K / (time.perf_counter() - t0)


def measure_pipeline(args, cfg) -> tuple[float, float]:
    """(images per second, process CPU microseconds per image) of `pk_batches` alone."""
    from mobilenet_embed.data import pk_batches

    it = iter(pk_batches(cfg))
    for _ in range(args.warmup):
        next(it)
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(args.steps):
        next(it)
    n = args.steps * args.P * args.K
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1e6


def main(argv: list[str]) -> dict:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.warmup < 2 or args.steps < 2 * args.warmup or args.steps % args.warmup:
        raise SystemExit("--steps must be a multiple of --warmup (>= 2) and at least twice it")
    import keras
    import tensorflow as tf

    cfg = _config(args, tempfile.gettempdir())
    fit, ours, step, pipe, pipe_cpu = [], [], [], [], []
    for _ in range(args.repeats):
        fit.append(measure_fit(args, cfg.model))
        ours.append(measure_train(args))
        step.append(measure_step_in_memory(args, cfg))
        rate, cpu = measure_pipeline(args, cfg)
        pipe.append(rate)
        pipe_cpu.append(cpu)
    result = {
        "benchmark": "train",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "tensorflow": tf.__version__, "keras": keras.__version__,
                    "gpus": len(tf.config.list_physical_devices("GPU")),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "settings": {"image_size": args.image_size, "alpha": args.alpha, "P": args.P, "K": args.K,
                     "batch": args.P * args.K, "steps": args.steps, "warmup": args.warmup,
                     "repeats": args.repeats, "jit_compile": args.jit_compile},
        "keras_fit": {"images_per_second": fit, "median": statistics.median(fit), "best": max(fit)},
        "mbembed_train": {"images_per_second": ours, "median": statistics.median(ours), "best": max(ours)},
        "mbembed_step_in_memory": {"images_per_second": step, "median": statistics.median(step), "best": max(step)},
        "pipeline_alone": {"images_per_second": pipe, "median": statistics.median(pipe), "best": max(pipe),
                           "cpu_us_per_image": statistics.median(pipe_cpu)},
    }
    result["ratio_median"] = result["mbembed_train"]["median"] / result["keras_fit"]["median"]
    result["ratio_best"] = result["mbembed_train"]["best"] / result["keras_fit"]["best"]
    batch = args.P * args.K
    print(f"training throughput, {args.image_size}x{args.image_size}, alpha {args.alpha:g}, P x K = "
          f"{args.P} x {args.K} ({batch} images/step), {args.steps} timed steps, {args.repeats} repeats, "
          f"jit_compile={args.jit_compile}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"{'':34s} {'img/s median':>12s} {'img/s best':>11s} {'ms/step':>8s}")
    for key, label in (("keras_fit", "bare Keras fit (trivial loss)"), ("mbembed_train", "mbembed train (full loop)"),
                       ("mbembed_step_in_memory", "  its step, batch in memory"),
                       ("pipeline_alone", "  its P x K pipeline alone")):
        r = result[key]
        print(f"{label:34s} {r['median']:12.1f} {r['best']:11.1f} {1000 * batch / r['median']:8.1f}")
    print(f"{'ratio mbembed / fit':34s} {result['ratio_median']:11.2f}x {result['ratio_best']:10.2f}x   (target >= 0.9)")
    step_ratio = result["mbembed_step_in_memory"]["median"] / result["keras_fit"]["median"]
    result["ratio_step_in_memory_median"] = step_ratio
    print(f"{'ratio step in memory / fit':34s} {step_ratio:11.2f}x")
    print(f"pipeline CPU time: {result['pipeline_alone']['cpu_us_per_image']:.0f} us/image, spent on the same "
          f"{os.cpu_count()} cores as the model when there is no accelerator")
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main(sys.argv[1:])
