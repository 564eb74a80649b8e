"""Scale benchmark: `python scripts/bench.py scale [--sizes 10k,100k,1m] [options]`.

One table for folders of 10k / 100k / 1M small JPEGs in 1k / 10k / 100k identities (made by
`scripts/make_scale_data.py` under `--root` when missing, not timed). Each stage runs as its own
process, so its wall time, CPU time (user + system: CPU/wall = cores used) and peak RSS are its
own, measured with ``os.wait4``:

- ``floor``: a bare Python loop that lists the folder (os.scandir) and reads every file's
  bytes: the least any stage that looks at every file can cost.
- ``check_cold`` / ``check_warm``: `mbembed data check` with an empty check cache, then with the
  cache it wrote; ``check_moved``: the same with the data folder moved to another parent folder
  (a job on another machine with the data mounted elsewhere): the cache must still hit.
- ``index``: the image index alone, built from the warm cache: bytes per image retained
  (tracemalloc, after the report is dropped), and P x K batches of the sampler alone (rows only,
  no decode), ms per batch.
- ``prepare``: `mbembed prepare` into 16 shards.
- ``tfrecord_check``: `mbembed data check` on those shards (trusted: manifest checksum, sizes and
  counts); ``tfrecord_check_full``: the same with ``--full`` (every record decoded).
- ``train_first_step``: seconds from starting `mbembed train` (warm cache, 32x32, alpha 0.25)
  to its first logged step; ``resume_first_step``: the same for the resumed run.
- ``export_embeddings``: `mbembed export embeddings` of the whole folder.

Images/s is images / wall seconds. Writes JSON to `--out` (default bench/scale.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from benchutil import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000}

FLOOR = r"""
import os, sys
n = b = 0
stack = [sys.argv[1]]
while stack:
    with os.scandir(stack.pop()) as it:
        for e in it:
            if e.name.startswith('.'):
                continue
            if e.is_dir():
                stack.append(e.path)
            else:
                with open(e.path, 'rb') as fh:
                    b += len(fh.read())
                n += 1
print(n, b)
"""

INDEX = r"""
import gc, json, sys, time, tracemalloc
from mobilenet_embed.config import load_config
from mobilenet_embed.data import inspect_data
cfg = load_config(None, [f"data.source=folder", f"data.path={sys.argv[1]}", f"data.check_cache={sys.argv[2]}"])
tracemalloc.start()
index, report = inspect_data(cfg.data, check=True)
del report
gc.collect()
held, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
import numpy as np
from mobilenet_embed.data.pipeline import _index_plans
p, k = cfg.train.identities_per_batch, cfg.train.images_per_identity
it = iter(_index_plans(index, (np.arange(len(index)),), p, k, 0, 0, 0, 1, 2))
next(it)
t0 = time.perf_counter()
for _ in range(50):
    next(it)
ms = (time.perf_counter() - t0) / 50 * 1000
print(json.dumps({"images": len(index), "index_bytes_per_image": held / len(index),
                  "index_peak_bytes_per_image": peak / len(index), "sampler_ms_per_batch": ms}))
"""


def _run(cmd: list[str], env: dict, first_line: str | None = None) -> dict:
    """Run `cmd`; wall/cpu seconds, peak RSS (MB), stdout, and the time to a line containing `first_line`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out, first = [], None
    for line in proc.stdout:
        out.append(line)
        if first_line and first is None and first_line in line:
            first = time.perf_counter() - t0
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{''.join(out[-20:])}")
    return {"wall_s": round(wall, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "first_s": None if first is None else round(first, 2),
            "stdout": "".join(out)}


def _mbembed(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from mobilenet_embed.cli import run; sys.argv[0] = 'mbembed'; run()", *args]


def _ensure_data(root: str, name: str, n: int) -> str:
    folder = os.path.join(root, f"s{name}")
    marker = os.path.join(folder, ".scale_data.json")
    if not os.path.exists(marker):
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_scale_data.py"), folder,
                        "--images", str(n)], check=True)
    return folder


def bench_size(name: str, n: int, root: str, env: dict, stages: set, work: str) -> dict:
    folder = _ensure_data(root, name, n)
    cache = os.path.join(work, f"cache-{name}")
    shutil.rmtree(cache, ignore_errors=True)
    data = ["--set", "data.source=folder", "--set", f"data.path={folder}", "--set", f"data.check_cache={cache}"]
    rows: dict = {}

    def stage(key: str, cmd: list[str], **kw) -> dict:
        if key in stages:
            r = _run(cmd, env, **kw)
            rows[key] = {k: v for k, v in r.items() if k != "stdout"}
            rows[key]["images_per_s"] = round(n / r["wall_s"], 1)
            print(f"  {name} {key}: {r['wall_s']:.1f} s, cpu {r['cpu_s']:.1f} s, rss {r['peak_rss_mb']:.0f} MB",
                  flush=True)
            return r
        return {}

    stage("floor", [sys.executable, "-c", FLOOR, folder])
    stage("check_cold", _mbembed("data", "check", *data))
    stage("check_warm", _mbembed("data", "check", *data))
    if "check_moved" in stages:
        moved_parent = os.path.join(work, f"moved-{name}")
        os.makedirs(moved_parent, exist_ok=True)
        moved = os.path.join(moved_parent, os.path.basename(folder))
        os.rename(folder, moved)
        try:
            r = stage("check_moved", _mbembed("data", "check", "--set", "data.source=folder", "--set",
                                              f"data.path={moved}", "--set", f"data.check_cache={cache}"))
            rows["check_moved"]["from_cache"] = f"({n:,} from the check cache)" in r["stdout"]
        finally:
            os.rename(moved, folder)
    if "index" in stages:
        r = _run([sys.executable, "-c", INDEX, folder, cache], env)
        rows["index"] = {**{k: v for k, v in r.items() if k not in ("stdout", "first_s")},
                         **json.loads(r["stdout"].strip().splitlines()[-1])}
        print(f"  {name} index: {rows['index']}", flush=True)
    prefix = os.path.join(work, f"shards-{name}", "data")
    stage("prepare", _mbembed("prepare", *data, "--data", folder, "--out", prefix, "--shards", "16", "--force",
                              "--no-progress"))
    if "prepare" in stages:
        records = ["--set", "data.source=tfrecord", "--set", f"data.path={prefix}-*.tfrecord"]
        stage("tfrecord_check", _mbembed("data", "check", *records))
        stage("tfrecord_check_full", _mbembed("data", "check", *records, "--full"))
    run_dir = os.path.join(work, f"run-{name}")
    shutil.rmtree(run_dir, ignore_errors=True)
    train = [*data, "--set", f"run_dir={run_dir}", "--set", "data.image_size=32", "--set", "model.alpha=0.25",
             "--set", "train.log_every_steps=1", "--set", "train.steps_per_epoch=2", "--set", "train.epochs=1",
             "--set", "data.val_identities=0"]
    stage("train_first_step", _mbembed("train", *train), first_line="step 1/")
    resumed = [*train[:-6], "--set", "train.steps_per_epoch=4", "--set", "train.epochs=1", "--set", "data.val_identities=0"]
    stage("resume_first_step", _mbembed("train", *resumed), first_line="step 3/")
    if "export_embeddings" in stages:
        out = os.path.join(work, f"emb-{name}")
        shutil.rmtree(out, ignore_errors=True)
        stage("export_embeddings", _mbembed("export", "embeddings", *data, "--checkpoint", run_dir, "--data", folder,
                                            "--out", out, "--no-progress"))
    return rows


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="bench.py scale", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10k,100k,1m", help="comma list of 10k, 100k, 1m")
    ap.add_argument("--root", default=os.path.join("bench", "scale_data"), help="where the scale folders live")
    ap.add_argument("--stages", default="floor,check_cold,check_warm,check_moved,index,prepare,tfrecord_check,"
                                        "tfrecord_check_full,train_first_step,resume_first_step,export_embeddings")
    ap.add_argument("--out", default=os.path.join("bench", "scale.json"))
    args = ap.parse_args(argv)
    stages = set(args.stages.split(","))
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
              "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as work:
        for name in args.sizes.split(","):
            print(f"{name}:", flush=True)
            load = os.getloadavg()[0]
            result["sizes"][name] = bench_size(name, SIZES[name], args.root, env, stages, work)
            result["sizes"][name]["load_average_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    _print_table(result)
    write_result(args.out, result)
    return result


def _print_table(result: dict) -> None:
    sizes = list(result["sizes"])
    print(f"\n{'stage':<20}" + "".join(f"{s:>28}" for s in sizes))
    stages = list(dict.fromkeys(k for s in sizes for k in result["sizes"][s] if k != "load_average_1min"))
    for st in stages:
        cells = []
        for s in sizes:
            r = result["sizes"][s].get(st)
            if not r:
                cells.append(f"{'-':>28}")
            elif st.endswith("first_step"):
                cells.append(f"{r['first_s'] or float('nan'):>9.1f} s to step, {r['peak_rss_mb']:>6.0f} MB")
            elif st == "index":
                cells.append(f"{r['index_bytes_per_image']:>7.0f} B/img {r['sampler_ms_per_batch']:>6.1f} ms/b")
            else:
                cells.append(f"{r['wall_s']:>7.1f} s {r['images_per_s']:>8.0f}/s {r['peak_rss_mb']:>5.0f}MB")
        print(f"{st:<20}" + "".join(cells))
