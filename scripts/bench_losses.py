"""Benchmark: semi-hard triplet loss, ours (O(B^2) memory) vs a tensorflow-addons-style tiled one.

`python scripts/bench.py losses [--batch-sizes 64,256,1024,1800] [--dim 128] [--repeats 5]
[--out bench/losses.json]`

For each batch size B and each implementation a fresh subprocess traces one tf.function doing
forward + backward (loss and d loss / d embeddings, L2 distance, margin 0.2, 4 images per
identity), runs it once at B to measure memory, then `--repeats` more times for the median
time. Peak memory is the growth of the process's peak RSS (ru_maxrss) over its warmed-up
baseline, unless TensorFlow reports a non-zero CPU allocator peak. The tiled formulation (as
tensorflow-addons 0.23 computes semi-hard mining) materialises B*B x B tensors; it is skipped
where its estimated need exceeds the memory available.
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
from pathlib import Path

from benchutil import write_result

REPO = Path(__file__).resolve().parents[1]
MARGIN = 0.2
IMAGES_PER_IDENTITY = 4
TILED_BYTES_PER_ELEMENT = 4 * 4  # peak ~3.5 float32 B^3 tensors measured at B=256, 512; round up


def tiled_semihard_loss(labels, embeddings, margin: float = 1.0):
    """Semi-hard triplet loss the way tensorflow-addons computes it: B*B x B tiled tensors, L2."""
    import tensorflow as tf

    from mobilenet_embed.losses import pairwise_distances

    labels = tf.reshape(labels, [-1, 1])
    pdist = pairwise_distances(embeddings, "L2")
    same = tf.equal(labels, tf.transpose(labels))
    not_same = tf.logical_not(same)
    n = tf.size(labels)
    # Row (p * B + a) holds anchor a's distances and asks: which negatives are farther than d(a, p)?
    tiled = tf.tile(pdist, [n, 1])
    farther = tf.logical_and(tf.tile(not_same, [n, 1]), tiled > tf.reshape(tf.transpose(pdist), [-1, 1]))
    farther_f = tf.cast(farther, tf.float32)
    has_farther = tf.transpose(tf.reshape(tf.reduce_sum(farther_f, 1) > 0.0, [n, n]))
    row_max = tf.reduce_max(tiled, 1, keepdims=True)
    outside = tf.reduce_min((tiled - row_max) * farther_f, 1, keepdims=True) + row_max
    outside = tf.transpose(tf.reshape(outside, [n, n]))
    not_same_f = tf.cast(not_same, tf.float32)
    row_min = tf.reduce_min(pdist, 1, keepdims=True)
    inside = tf.reduce_max((pdist - row_min) * not_same_f, 1, keepdims=True) + row_min
    negatives = tf.where(has_farther, outside, tf.tile(inside, [1, n]))
    positives = tf.cast(same, tf.float32) - tf.eye(n)
    hinge = tf.maximum((margin + pdist - negatives) * positives, 0.0)
    return tf.math.divide_no_nan(tf.reduce_sum(hinge), tf.reduce_sum(positives))


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _child(impl: str, batch: int, dim: int, repeats: int) -> dict:
    """Run in a fresh process: time and peak memory of one implementation at one batch size."""
    sys.path.insert(0, str(REPO))
    import numpy as np
    import tensorflow as tf

    from mobilenet_embed.losses import triplet_semihard_loss

    loss_fn = triplet_semihard_loss if impl == "ours" else tiled_semihard_loss

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, dim], tf.float32)])
    def step(labels, embeddings):
        with tf.GradientTape() as tape:
            tape.watch(embeddings)
            loss = loss_fn(labels, embeddings, MARGIN)
        return loss, tape.gradient(loss, embeddings)

    def batch_of(size: int):
        rng = np.random.default_rng(size)
        labels = np.repeat(np.arange(size // IMAGES_PER_IDENTITY + 1), IMAGES_PER_IDENTITY)[:size]
        emb = rng.normal(size=(size, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        return tf.constant(labels.astype(np.int32)), tf.constant(emb)

    step(*batch_of(8))  # trace once, outside the measurement
    labels, emb = batch_of(batch)
    baseline = _peak_rss_bytes()
    loss, grad = step(labels, emb)
    grad.numpy()
    rss_growth = _peak_rss_bytes() - baseline
    try:
        allocator_peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    except (ValueError, RuntimeError):
        allocator_peak = 0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, g = step(labels, emb)
        g.numpy()
        times.append(time.perf_counter() - start)
    return {
        "ms": 1000 * statistics.median(times),
        "peak_mb": (allocator_peak or rss_growth) / 2**20,
        "memory_source": "tf allocator peak" if allocator_peak else "peak RSS growth",
        "loss": float(loss),
    }


def _run_child(impl: str, batch: int, dim: int, repeats: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, str(batch), str(dim), str(repeats)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if result.returncode != 0:
        return {"error": f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="bench.py losses", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="64,256,1024,1800", help="comma-separated B values")
    parser.add_argument("--dim", type=int, default=128, help="embedding size D")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward+backward runs (median)")
    parser.add_argument("--out", default="bench/losses.json", help="JSON results file")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        impl, batch, dim, repeats = args.child
        result = _child(impl, int(batch), int(dim), int(repeats))
        print(json.dumps(result))
        return result

    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    rows = []
    header = f"{'B':>6} {'ours ms':>10} {'tiled ms':>10} {'time ratio':>11} {'ours MB':>9} {'tiled MB':>10} {'mem ratio':>10}"
    print(f"semi-hard triplet loss, forward+backward, D={args.dim}, median of {args.repeats}")
    print(header)
    for batch in batches:
        row: dict = {"batch": batch}
        ours = _run_child("ours", batch, args.dim, args.repeats)
        row["ours"] = ours
        need = batch**3 * TILED_BYTES_PER_ELEMENT
        available = _available_bytes()
        if need > 0.9 * available:
            tiled = {"skipped": f"needs ~{need / 1e9:.0f} GB, {available / 1e9:.0f} GB available"}
        else:
            tiled = _run_child("tiled", batch, args.dim, args.repeats)
        row["tiled"] = tiled
        if "ms" in ours and "ms" in tiled:
            row["time_ratio"] = ours["ms"] / tiled["ms"]
            row["memory_ratio"] = ours["peak_mb"] / tiled["peak_mb"] if tiled["peak_mb"] > 0 else None
            row["loss_abs_diff"] = abs(ours["loss"] - tiled["loss"])
        rows.append(row)
        tiled_note = f"skipped ({tiled['skipped']})" if "skipped" in tiled else tiled.get("error")
        line = (f"{batch:>6} {_fmt(ours.get('ms', ours.get('error')), '10.1f'):>10} "
                f"{_fmt(tiled.get('ms', ''), '10.1f'):>10} {_fmt(row.get('time_ratio', ''), '11.3f'):>11} "
                f"{_fmt(ours.get('peak_mb', ''), '9.1f'):>9} {_fmt(tiled.get('peak_mb', ''), '10.1f'):>10} "
                f"{_fmt(row.get('memory_ratio', ''), '10.4f'):>10}")
        print(line + (f"  tiled: {tiled_note}" if tiled_note else ""), flush=True)

    at_1024 = next((r for r in rows if r["batch"] == 1024 and "time_ratio" in r), None)
    result = {
        "benchmark": "losses",
        "what": "semi-hard triplet loss forward+backward; ours (sorted rows + searchsorted, O(B^2)) vs "
                "tensorflow-addons-style tiling (B*B x B)",
        "dim": args.dim,
        "repeats": args.repeats,
        "memory": "peak RSS growth of a fresh process over its warmed-up baseline (MB)",
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "target": "B=1024: ours <= 0.5x the time and <= 0.1x the memory of tiled",
        "target_met": None if at_1024 is None else bool(
            at_1024["time_ratio"] <= 0.5 and (at_1024["memory_ratio"] or 1.0) <= 0.1),
    }
    print(f"target at B=1024 ({result['target']}): "
          f"{'not measured' if result['target_met'] is None else 'met' if result['target_met'] else 'NOT met'}")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
