"""Export benchmark: single-image latency and size of the Keras model, SavedModel and TFLite files.

    python scripts/bench.py export [--image-size 160] [--alpha 1.0] [--runs 50] [--out bench/export.json]

One run builds a MobileNet embedding model (random weights, He-initialised so activations keep
their scale; latency does not depend on the weights), writes it as .keras, SavedModel
(`export_saved_model`) and TFLite float32 / float16 / int8 (`export_tflite`, int8 calibrated on
`--calibration` random images), then measures each at batch 1, side by side:

* TFLite: `ai_edge_litert` Interpreter with `num_threads` 1 and 2 (XNNPACK), in this process;
* Keras (`model(x, training=False)` in a `tf.function`) and SavedModel (its
  `embed_preprocessed` signature): in a fresh process per thread count, with
  ``tf.config.threading`` intra-op threads = N and inter-op threads = 1 set before TensorFlow
  starts (TensorFlow cannot change them afterwards).

Latency is the median of `--runs` timed calls after `--warmup` untimed ones (through the
`mobilenet_embed.embedders` classes, so it includes the NumPy conversion a caller pays).
Ratios: latency to the Keras model's at the same thread count; size to the Keras model's
float32 weights (the .keras file) and to the float32 TFLite file. The issue's target:
int8 latency <= 0.15x Keras, int8 size <= 0.3x float32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchutil import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

THREADS = (1, 2)


def he_initialise(model, seed: int = 0) -> None:
    """Re-draw every conv/dense kernel from N(0, 2 / fan_in) (depthwise: fan_in = kernel area),
    so that a random model's activations neither vanish nor explode (Keras' default glorot
    init of depthwise kernels shrinks them ~C-fold per block)."""
    from keras import layers

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.DepthwiseConv2D):
            kernel = layer.kernel
            fan_in = int(np.prod(kernel.shape[:2]))
        elif isinstance(layer, (layers.Conv2D, layers.Dense)):
            kernel = layer.kernel
            fan_in = int(np.prod(kernel.shape[:-1]))
        else:
            continue
        kernel.assign(rng.normal(0.0, np.sqrt(2.0 / fan_in), kernel.shape).astype(np.float32))


def _worker(args) -> None:
    """Measure one TF model (keras or saved_model) at a fixed thread count; print JSON."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from mobilenet_embed.embedders import load_embedder
    from mobilenet_embed.export_report import measure_latency

    embedder = load_embedder(args.worker)
    image = np.random.default_rng(1).uniform(-1, 1, (1, embedder.image_size, embedder.image_size, 3))
    image = image.astype(np.float32)
    ms = measure_latency(lambda: embedder.embed(image), args.runs, args.warmup)
    print(json.dumps({"latency_ms": ms}))


def _tf_latency(path: str, threads: int, runs: int, warmup: int) -> float:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--threads", str(threads),
           "--runs", str(runs), "--warmup", str(warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"latency worker failed for {path}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["latency_ms"]


def _table(rows: list[dict]) -> str:
    head = ["format", "size MB", "size / keras", "size / f32", "1 thr ms", "2 thr ms",
            "1 thr / keras", "2 thr / keras", "cos mean"]
    lines = []
    for r in rows:
        lines.append([r["format"], f"{r['size_bytes'] / 1e6:.2f}", f"{r['size_vs_keras']:.3f}",
                      f"{r['size_vs_float32']:.3f}",
                      *[f"{r['latency_ms'][str(t)]:.2f}" for t in THREADS],
                      *[f"{r['latency_vs_keras'][str(t)]:.3f}" for t in THREADS],
                      "-" if r.get("cosine_mean") is None else f"{r['cosine_mean']:.5f}"])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench.py export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument("--runs", type=int, default=50, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--calibration", type=int, default=100, help="int8 calibration images")
    parser.add_argument("--formats", default="keras,saved_model,tflite_float32,tflite_float16,tflite_int8")
    parser.add_argument("--out", default="bench/export.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.worker:
        _worker(args)
        return {}

    from mobilenet_embed.embedders import KerasEmbedder, TFLiteEmbedder
    from mobilenet_embed.export_formats import FILENAMES, TFLITE_KINDS, export_saved_model, export_tflite
    from mobilenet_embed.export_report import cosine_similarities, measure_latency
    from mobilenet_embed.model import build_embedding_model

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    size = args.image_size
    rng = np.random.default_rng(0)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="mbembed-bench-export-") as tmp:
        model = build_embedding_model(image_size=size, alpha=args.alpha, embedding_size=args.embedding_size)
        he_initialise(model)
        keras_path = os.path.join(tmp, "model.keras")
        model.save(keras_path)
        saved = export_saved_model(model, os.path.join(tmp, FILENAMES["saved_model"]), size, 1.0)
        calibration = rng.uniform(-1, 1, (args.calibration, size, size, 3)).astype(np.float32)
        parity = rng.uniform(-1, 1, (16, size, size, 3)).astype(np.float32)
        reference = KerasEmbedder(model).embed(parity)
        paths = {"keras": keras_path, "saved_model": saved}
        for fmt in formats:
            if fmt in TFLITE_KINDS:
                print(f"converting {fmt} ...", file=sys.stderr, flush=True)
                paths[fmt] = export_tflite(saved, os.path.join(tmp, FILENAMES[fmt]), TFLITE_KINDS[fmt],
                                           calibration if fmt == "tflite_int8" else None)
        image = parity[:1]
        rows = []
        for fmt in formats:
            path = paths[fmt]
            if fmt == "keras":
                nbytes = os.path.getsize(path)
            elif fmt == "saved_model":
                nbytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
            else:
                nbytes = os.path.getsize(path)
            row = {"format": fmt, "size_bytes": nbytes, "latency_ms": {}}
            for threads in THREADS:
                print(f"timing {fmt}, {threads} thread(s) ...", file=sys.stderr, flush=True)
                if fmt in ("keras", "saved_model"):
                    row["latency_ms"][str(threads)] = _tf_latency(path, threads, args.runs, args.warmup)
                else:
                    embedder = TFLiteEmbedder(path, num_threads=threads)
                    row["latency_ms"][str(threads)] = measure_latency(lambda: embedder.embed(image),
                                                                      args.runs, args.warmup)
            if fmt in TFLITE_KINDS:
                cos = cosine_similarities(reference, TFLiteEmbedder(path).embed(parity))
                row["cosine_mean"], row["cosine_min"] = float(cos.mean()), float(cos.min())
            rows.append(row)
    by = {r["format"]: r for r in rows}
    keras_row = by.get("keras")
    f32 = by.get("tflite_float32")
    for r in rows:
        r["size_vs_keras"] = r["size_bytes"] / keras_row["size_bytes"] if keras_row else float("nan")
        r["size_vs_float32"] = r["size_bytes"] / f32["size_bytes"] if f32 else float("nan")
        r["latency_vs_keras"] = {t: (r["latency_ms"][t] / keras_row["latency_ms"][t] if keras_row
                                     else float("nan")) for t in r["latency_ms"]}
    import keras
    import tensorflow as tf

    result = {
        "benchmark": "export",
        "command": "python scripts/bench.py export " + " ".join(argv or []),
        "image_size": size, "alpha": args.alpha, "embedding_size": args.embedding_size,
        "runs": args.runs, "warmup": args.warmup, "calibration_images": args.calibration,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    if "tflite_int8" in by and keras_row:
        int8 = by["tflite_int8"]
        result["targets"] = {
            "int8_latency_vs_keras<=0.15": {t: int8["latency_vs_keras"][t] <= 0.15 for t in int8["latency_vs_keras"]},
            "int8_size_vs_float32<=0.3": bool(f32 and int8["size_vs_float32"] <= 0.3),
        }
    table = _table(rows)
    result["table"] = table
    print(f"export benchmark: {size}x{size}, alpha {args.alpha:g}, batch 1, median of {args.runs} runs "
          f"({os.cpu_count()} CPUs)")
    print(table)
    if "targets" in result:
        print("targets:", json.dumps(result["targets"]))
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
