"""`mbembed align` rate against a bare loop of the detector's own call, side by side.

    python scripts/bench.py align [--data ../shared/data/lfw/images_deepfunneled] [--images 200]

- bare: ``mtcnn.MTCNN().detect_faces(x)`` on one image at a time, the call a user of the
  package writes, with x the file path (it reads and decodes the file itself) and, stricter,
  with x the image already decoded in memory (decoding not timed); detection only, nothing
  aligned or written.
- align: `mobilenet_embed.align.align_folder` (what `mbembed align` runs) on the same images
  into an empty folder: decode check, batched detection, face choice, similarity warp, JPEG
  write, journal and report. Target: align >= 1.0x bare images/s (both bare loops).
The time to align all of LFW (13,233 images) is extrapolated from the align rate. Also
reported: the side of the source image an ``arcface`` crop covers (median over the images),
which sets `--no-face center`'s default fraction.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from benchutil import image_files, write_result

LFW_IMAGES = 13233


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="bench.py align", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/lfw/images_deepfunneled")
    parser.add_argument("--images", type=int, default=200, help="images taken (sorted by path) from --data")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=1, help="timed passes of each, alternating (best kept)")
    parser.add_argument("--out", default="bench/align.json")
    args = parser.parse_args(argv)

    import numpy as np
    from mtcnn import MTCNN

    from mobilenet_embed.align import alignment, folder
    from mobilenet_embed.align.detector import make_detector
    from mobilenet_embed.align.similarity import estimate_similarity
    from mobilenet_embed.align.templates import template_points

    paths = image_files(args.data, args.images)
    work = tempfile.mkdtemp(prefix="bench_align_")
    raw = os.path.join(work, "raw")
    for p in paths:  # the same images as an identity folder (symbolic links)
        ident = os.path.join(raw, os.path.basename(os.path.dirname(p)))
        os.makedirs(ident, exist_ok=True)
        os.symlink(os.path.abspath(p), os.path.join(ident, os.path.basename(p)))

    bare_detector = MTCNN()
    ours = make_detector("mtcnn")
    bare_detector.detect_faces(paths[0])  # first calls build the networks: not timed
    ours.detect([alignment.decode_file(paths[0])])
    spec = alignment.AlignSpec(size=args.size, no_face="center")
    fractions: list[float] = []

    keys = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

    def crop_fraction(face: dict) -> float:
        pts = np.array([face["keypoints"][k] for k in keys], float)
        scale = np.linalg.norm(estimate_similarity(pts, template_points("arcface", 112))[:, 0])
        return 112.0 / scale / 250.0

    def bare(inputs: list) -> float:
        start = time.perf_counter()
        found = [bare_detector.detect_faces(x) for x in inputs]
        rate = len(inputs) / (time.perf_counter() - start)
        if not fractions:
            fractions.extend(crop_fraction(f[0]) for f in found if f)
        return rate

    def ours_run() -> tuple[float, dict]:
        out = os.path.join(work, "aligned")
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        report = folder.align_folder(raw, out, spec, ours, batch_size=args.batch_size, check_cache=None,
                                     progress=False, log=lambda *_: None)
        return len(paths) / (time.perf_counter() - start), report

    decoded = [alignment.decode_file(p) for p in paths]
    bare_rates, bare_array_rates, align_rates, report = [], [], [], {}
    for _ in range(args.repeats):
        bare_rates.append(bare(paths))
        bare_array_rates.append(bare(decoded))
        rate, report = ours_run()
        align_rates.append(rate)
    shutil.rmtree(work, ignore_errors=True)
    b, ba, a = max(bare_rates), max(bare_array_rates), max(align_rates)
    result = {
        "images": len(paths), "data": args.data, "batch_size": args.batch_size, "size": args.size,
        "bare_files_img_s": round(b, 2), "bare_arrays_img_s": round(ba, 2), "align_img_s": round(a, 2),
        "ratio_vs_bare_files": round(a / b, 3), "ratio_vs_bare_arrays": round(a / ba, 3),
        "bare_files_runs": [round(x, 2) for x in bare_rates],
        "bare_arrays_runs": [round(x, 2) for x in bare_array_rates],
        "align_runs": [round(x, 2) for x in align_rates],
        "lfw_minutes_extrapolated": round(LFW_IMAGES / a / 60.0, 1),
        "aligned": report["aligned"], "no_face": report["no_face"], "several_faces": report["several_faces"],
        "arcface_crop_side_fraction_median": round(statistics.median(fractions), 3) if fractions else None,
        "load_average": os.getloadavg()[0],
    }
    print(f"{len(paths)} LFW images, {args.size}x{args.size} arcface crops, batches of {args.batch_size}")
    print(f"{'':36}{'img/s':>8}{'vs files':>10}{'vs arrays':>11}")
    print(f"{'bare detect_faces(path)':36}{b:8.1f}{1.0:9.2f}x{b / ba:10.2f}x")
    print(f"{'bare detect_faces(decoded array)':36}{ba:8.1f}{ba / b:9.2f}x{1.0:10.2f}x")
    print(f"{'mbembed align (decode to write)':36}{a:8.1f}{a / b:9.2f}x{a / ba:10.2f}x")
    print(f"all of LFW ({LFW_IMAGES:,} images): about {result['lfw_minutes_extrapolated']} min at this rate")
    print(f"aligned {report['aligned']}, no face {report['no_face']}, several faces {report['several_faces']}; "
          f"an arcface crop covers {result['arcface_crop_side_fraction_median']} of the 250-pixel side (median)")
    write_result(args.out, result)
    return result
