"""Scale data for benchmarks: `python scripts/make_scale_data.py OUT --images N [options]`.

Writes N small but real JPEG files (default 32x32, every file distinct) into identity folders
``OUT/id_NNNNNN/NNNN.jpg`` with a long-tailed count of images per identity, as web crawls have
(counts drawn from a Zipf-like law, at least `--min-per-identity` each, and the identity count
chosen so the mean is N / identities). Files are made by a process pool, one chunk of identities
per task, so all cores are used; the same (N, identities, seed) always gives the same bytes.
`--tfrecord PREFIX` also writes the TFRecord shards of the folder with `mbembed prepare`'s code.
Prints one line: files, identities, bytes, seconds, files/s.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np


def identity_counts(images: int, identities: int, min_per_identity: int, seed: int,
                    exponent: float = 1.1) -> np.ndarray:
    """Images per identity (int64 ``[identities]``), summing to `images`, long-tailed.

    Weights ``1 / rank ** exponent`` over a seeded permutation of ranks, scaled so the sum above
    the floor of `min_per_identity` each is the remainder; rounding leftovers go to the largest.
    """
    if images < identities * min_per_identity:
        raise ValueError(f"--images {images} < identities {identities} x --min-per-identity {min_per_identity}")
    rng = np.random.default_rng([seed, 15])
    weights = 1.0 / np.arange(1, identities + 1, dtype=np.float64) ** exponent
    weights = weights[rng.permutation(identities)]
    extra = images - identities * min_per_identity
    counts = np.floor(weights / weights.sum() * extra).astype(np.int64) + min_per_identity
    counts[np.argmax(counts)] += images - counts.sum()
    return counts


def render(identity: int, image: int, size: int, seed: int) -> np.ndarray:
    """A distinct ``[size, size, 3]`` uint8 image: an identity-coloured gradient with seeded blobs."""
    rng = np.random.default_rng([seed, identity, image])
    base = np.random.default_rng([seed, identity]).uniform(40, 215, 3)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = base[None, None, :] + 30 * (x[..., None] - 0.5) + 20 * (y[..., None] - 0.5)
    for cy, cx, r, v in rng.uniform([0, 0, 0.08, -90], [1, 1, 0.3, 90], (3, 4)):
        img += v * (((x - cx) ** 2 + (y - cy) ** 2) < r * r)[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_chunk(args) -> int:
    """Write the images of identities [start, stop); returns bytes written."""
    from PIL import Image

    out, counts, start, size, seed, quality = args
    total = 0
    for identity in range(start, start + len(counts)):
        folder = os.path.join(out, f"id_{identity:06d}")
        os.makedirs(folder, exist_ok=True)
        for image in range(int(counts[identity - start])):
            buf = io.BytesIO()
            Image.fromarray(render(identity, image, size, seed)).save(buf, "JPEG", quality=quality)
            data = buf.getvalue()
            with open(os.path.join(folder, f"{image:04d}.jpg"), "wb") as fh:
                fh.write(data)
            total += len(data)
    return total


def make_folder(out: str, images: int, identities: int, size: int = 32, seed: int = 0,
                min_per_identity: int = 2, workers: int | None = None, quality: int = 90) -> dict:
    """Write the folder (see the module doc); returns a summary dict."""
    counts = identity_counts(images, identities, min_per_identity, seed)
    workers = workers or os.cpu_count() or 1
    step = max(1, identities // (workers * 16))
    tasks = [(out, counts[s:s + step], s, size, seed, quality) for s in range(0, identities, step)]
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        written = sum(pool.map(_write_chunk, tasks))
    seconds = time.perf_counter() - t0
    summary = {"out": out, "images": int(counts.sum()), "identities": identities, "size": size, "seed": seed,
               "max_per_identity": int(counts.max()), "median_per_identity": float(np.median(counts)),
               "bytes": int(written), "seconds": round(seconds, 2), "workers": workers}
    with open(os.path.join(out, ".scale_data.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    return summary


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="make_scale_data.py", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder to create (identity sub-folders inside)")
    ap.add_argument("--images", type=int, required=True, help="number of image files (e.g. 10000, 100000, 1000000)")
    ap.add_argument("--identities", type=int, default=None, help="identity folders (default: images / 10)")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--min-per-identity", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    ap.add_argument("--tfrecord", default=None, help="also write TFRecord shards with this prefix (mbembed prepare)")
    ap.add_argument("--shards", type=int, default=16)
    args = ap.parse_args(argv)
    identities = args.identities or max(1, args.images // 10)
    try:
        summary = make_folder(args.out, args.images, identities, args.size, args.seed, args.min_per_identity,
                              args.workers)
    except ValueError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    rate = summary["images"] / max(summary["seconds"], 1e-9)
    print(f"wrote {summary['images']:,} files in {identities:,} identities ({summary['bytes'] / 1e6:.1f} MB) "
          f"to {args.out} in {summary['seconds']:.1f} s ({rate:,.0f} files/s, {summary['workers']} workers)")
    if args.tfrecord:
        from mobilenet_embed.config import Config
        from mobilenet_embed.data import prepare_tfrecords

        cfg = Config().data
        result = prepare_tfrecords(cfg, args.out, args.tfrecord, args.shards, force=True, progress=False)
        print(f"wrote {args.shards} TFRecord shards to {args.tfrecord}: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
