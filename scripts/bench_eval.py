"""Evaluation embedding rate against the model's bare batched inference rate, side by side.

    python scripts/bench.py eval [--data ../shared/data/lfw/images_deepfunneled] [--images 4096]

- bare: the Keras model (a `tf.function`, inference mode) on preprocessed batches already in
  memory: the ceiling for any input pipeline.
- eval: `verification.embed_paths`, the path of `mbembed eval` and of validation during training:
  read, decode, crop, resize and embed each distinct image once, pipelined with tf.data.
Target: eval >= 0.9x bare. The model is randomly initialised (speed does not depend on weights).
"""

from __future__ import annotations

import argparse
import os
import time

from benchutil import image_files, write_result


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="bench.py eval", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/lfw/images_deepfunneled")
    parser.add_argument("--images", type=int, default=4096,
                        help="distinct images to embed (LFW eval embeds 7,701; fewer lets start-up costs dominate)")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--crop-fraction", type=float, default=0.6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes of each (best kept)")
    parser.add_argument("--out", default="bench/eval.json")
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    from mobilenet_embed.config import load_config
    from mobilenet_embed.data import check_files
    from mobilenet_embed.verification import embed_paths
    from mobilenet_embed.model import build_embedding_model

    paths = image_files(args.data, args.images)
    cfg = load_config(None, ["data.source=folder", f"data.path={args.data}", f"data.image_size={args.image_size}",
                             f"data.crop_fraction={args.crop_fraction}"])
    check_files(paths, cfg.data.check_cache)  # fill the decode-check cache first: not part of what is timed
    model = build_embedding_model(args.image_size, alpha=args.alpha)
    infer = tf.function(lambda x: model(x, training=False))
    batch = tf.random.uniform((args.batch_size, args.image_size, args.image_size, 3), -1, 1)
    infer(batch)
    n_batches = -(-len(paths) // args.batch_size)

    def bare() -> float:
        start = time.perf_counter()
        for _ in range(n_batches):
            infer(batch).numpy()
        return n_batches * args.batch_size / (time.perf_counter() - start)

    def ours() -> float:
        start = time.perf_counter()
        out = embed_paths(model, cfg.data, paths, batch_size=args.batch_size)
        assert out.shape == (len(paths), 128) and np.isfinite(out).all()
        return len(paths) / (time.perf_counter() - start)

    ours()  # warm-up: traces the dataset functions
    rows = {"bare_inference": [], "eval_pipeline": []}
    for _ in range(args.repeats):  # interleaved, so that load on the shared machine hits both
        rows["bare_inference"].append(bare())
        rows["eval_pipeline"].append(ours())
    best = {k: max(v) for k, v in rows.items()}
    ratio = best["eval_pipeline"] / best["bare_inference"]
    result = {"images": len(paths), "image_size": args.image_size, "alpha": args.alpha,
              "batch_size": args.batch_size, "images_per_second": best, "all_runs": rows,
              "ratio": ratio, "target": 0.9, "met": ratio >= 0.9, "cpu_count": os.cpu_count()}
    print(f"eval embedding rate, {len(paths)} LFW images, {args.image_size}x{args.image_size}, alpha {args.alpha:g}, "
          f"batch {args.batch_size}, {os.cpu_count()} CPUs")
    print(f"{'path':<16}{'img/s':>10}{'ratio':>8}")
    print(f"{'bare inference':<16}{best['bare_inference']:>10.1f}{1.0:>8.2f}")
    print(f"{'mbembed eval':<16}{best['eval_pipeline']:>10.1f}{ratio:>8.2f}")
    print(f"target eval >= 0.9x bare: {'met' if ratio >= 0.9 else 'NOT met'}")
    write_result(args.out, result)
    return result
