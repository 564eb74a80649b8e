"""Input-pipeline benchmark: `python scripts/bench.py data [--data DIR] [options]`.

Side by side in one run (four pipelines), in images per second (P x K batches, the config's defaults 16 x 4):

- ``bare``: `tf.io.read_file` + `tf.io.decode_jpeg` + `tf.image.resize` of the same JPEG files,
  ``map(num_parallel_calls=AUTOTUNE)``, batch, prefetch: the decode ceiling.
- ``pipeline``: `pk_batches` on the folder (P x K sampling, augmentation on: random crop, flip,
  brightness, contrast; crop fraction and size as given).
- ``jitter``: ``pipeline`` with crop jitter (`data.augment_max_crop`, `data.augment_shift`:
  `--jitter-max-crop`, `--jitter-shift`, the LFW recipes' 1.2 and 0.1): larger crops to decode.
- ``tfrecord``: `pk_batches` on TFRecord shards of the same folder (written by
  `prepare_tfrecords` into a temporary folder first, not timed).

Each measurement builds a fresh iterator, skips `--warmup` batches, then times `--batches`
batches; the three are measured in turn, `--repeats` times, so background load hits all three
alike. Reported: the median and the best run of each (ratios
of medians and of bests) and the process CPU time per image (median), which shared machines
disturb least. The index check is done (and cached) before timing. Writes JSON to `--out`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

from benchutil import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench.py data", description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "lfw", "images_deepfunneled"),
                    help="identity folder of JPEGs (default: ../shared/data/lfw/images_deepfunneled)")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--crop-fraction", type=float, default=0.6)
    ap.add_argument("--identities-per-batch", type=int, default=16)
    ap.add_argument("--images-per-identity", type=int, default=4)
    ap.add_argument("--jitter-max-crop", type=float, default=1.2, help="the jitter case's data.augment_max_crop")
    ap.add_argument("--jitter-shift", type=float, default=0.1, help="the jitter case's data.augment_shift")
    ap.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    ap.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shards", type=int, default=8, help="TFRecord shards to write")
    ap.add_argument("--check-cache", default="~/.cache/mbembed", help="data.check_cache ('null': none)")
    ap.add_argument("--out", default=os.path.join("bench", "data.json"))
    return ap


def _rate(make, batches: int, warmup: int, batch_size: int) -> tuple[float, float]:
    """(images per second, process CPU microseconds per image) over `batches` batches."""
    it = iter(make())
    for _ in range(warmup):
        next(it)
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    del it
    return batches * batch_size / seconds, cpu / (batches * batch_size) * 1e6


def main(argv: list[str]) -> dict:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, ROOT)
    import numpy as np
    import tensorflow as tf

    from mobilenet_embed.config import load_config
    from mobilenet_embed.data import build_index, pk_batches, prepare_tfrecords

    data = os.path.abspath(args.data)
    cache = "null" if args.check_cache in ("null", "none", "") else args.check_cache
    sets = ["data.source=folder", f"data.path={data}", f"data.image_size={args.image_size}",
            f"data.crop_fraction={args.crop_fraction}", "data.augment=true", f"data.check_cache={cache}",
            f"train.identities_per_batch={args.identities_per_batch}",
            f"train.images_per_identity={args.images_per_identity}"]
    cfg = load_config(None, sets)
    pk = args.identities_per_batch * args.images_per_identity
    t0 = time.perf_counter()
    index, report = build_index(cfg.data)
    check_seconds = time.perf_counter() - t0
    print("\n".join(report.summary_lines(max_bad=5)))
    jpegs = [p for p in index.paths if p.lower().endswith((".jpg", ".jpeg"))]
    order = np.random.default_rng(0).permutation(len(jpegs))
    jpegs = [jpegs[i] for i in order]
    size = args.image_size

    def bare():
        def load(path):
            image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
            return tf.image.resize(image, [size, size])

        ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat()
        return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(pk).prefetch(tf.data.AUTOTUNE)

    tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
    prefix = os.path.join(tmp.name, "shards")
    t0 = time.perf_counter()
    prepared = prepare_tfrecords(cfg.data, data, prefix, args.shards, seed=cfg.seed, progress=False,
                                 log=lambda line: None)
    prepare_seconds = time.perf_counter() - t0
    rec_cfg = load_config(None, sets + ["data.source=tfrecord", f"data.path={prefix}-*.tfrecord"])
    rec_index, _ = build_index(rec_cfg.data)

    jitter_cfg = load_config(None, sets + [f"data.augment_max_crop={args.jitter_max_crop}",
                                           f"data.augment_shift={args.jitter_shift}"])
    variants = {
        "bare": bare,
        "pipeline": lambda: pk_batches(cfg, index),
        "jitter": lambda: pk_batches(jitter_cfg, index),
        "tfrecord": lambda: pk_batches(rec_cfg, rec_index),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, make in variants.items():
            rate, us = _rate(make, args.batches, args.warmup, pk)
            rates[name].append(rate)
            cpu[name].append(us)
    tmp.cleanup()
    median = {name: statistics.median(v) for name, v in rates.items()}
    best = {name: max(v) for name, v in rates.items()}
    cpu_median = {name: statistics.median(v) for name, v in cpu.items()}
    rows = [
        ("bare read + decode_jpeg + resize (AUTOTUNE)", "bare"),
        ("pk_batches, folder, augmentation on", "pipeline"),
        (f"the same with crop jitter (max crop {args.jitter_max_crop:g}, shift {args.jitter_shift:g})", "jitter"),
        ("pk_batches, TFRecord shards, augmentation on", "tfrecord"),
    ]
    result = {
        "data": data, "images": len(index), "identities": index.num_identities, "jpegs_for_bare": len(jpegs),
        "image_size": size, "crop_fraction": args.crop_fraction, "batch": f"{args.identities_per_batch}x"
        f"{args.images_per_identity}", "batches": args.batches, "warmup": args.warmup, "repeats": args.repeats,
        "images_per_second": rates, "median_images_per_second": median, "best_images_per_second": best,
        "cpu_us_per_image": cpu, "median_cpu_us_per_image": cpu_median,
        "ratio_pipeline_to_bare": median["pipeline"] / median["bare"],
        "ratio_tfrecord_to_bare": median["tfrecord"] / median["bare"],
        "ratio_jitter_to_pipeline": median["jitter"] / median["pipeline"],
        "ratio_jitter_to_pipeline_best": best["jitter"] / best["pipeline"],
        "jitter": {"max_crop": args.jitter_max_crop, "shift": args.jitter_shift},
        "ratio_pipeline_to_bare_best": best["pipeline"] / best["bare"],
        "ratio_tfrecord_to_bare_best": best["tfrecord"] / best["bare"],
        "check_seconds": check_seconds, "prepare_seconds": prepare_seconds, "shards": args.shards,
        "tfrecord_mb": prepared["bytes"] / 1e6,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "tensorflow": tf.__version__,
                    "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
    }
    print(f"\n{len(index):,} images of {index.num_identities:,} identities in {data}; {size}x{size}, crop "
          f"{args.crop_fraction:g}, batches of {pk} ({args.identities_per_batch}x{args.images_per_identity}); "
          f"median of {args.repeats} x {args.batches} batches; {os.cpu_count()} CPUs")
    print("| pipeline | images/s (median) | vs bare | images/s (best) | vs bare | CPU us/image | all runs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for label, name in rows:
        runs = ", ".join(f"{r:,.0f}" for r in rates[name])
        print(f"| {label} | {median[name]:,.0f} | {median[name] / median['bare']:.2f}x | {best[name]:,.0f} | "
              f"{best[name] / best['bare']:.2f}x | {cpu_median[name]:.0f} | {runs} |")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
