"""Gallery search cost as the gallery grows: NumPy / TensorFlow exact vs faiss flat vs faiss approximate.

    python scripts/bench.py search [--sizes 10000,100000,1000000] [--queries 100] [--k 10]

Galleries of N random unit vectors (128-d, seeded), queries drawn the same way; every backend of
`mobilenet_embed.search` answers the same queries, side by side in one run. Per backend and N:
build seconds, queries/s (best of --repeats passes over the queries, one batched call each),
memory (resident-set growth while building, and the backend's own estimate), recall@1 and
recall@k against the NumPy exact result, and whether the rows are identical to it.
Random vectors have no cluster structure: the worst case for IVF (real face embeddings cluster
by identity). HNSW is built only up to --hnsw-max vectors (its build dominates on 2 cores).
"""

from __future__ import annotations

import argparse
import gc
import os
import time

from benchutil import write_result


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="bench.py search", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="numpy,tensorflow,faiss-flat,faiss-ivf,faiss-hnsw")
    parser.add_argument("--nprobe-divisors", default="16,4", help="IVF: nprobe = nlist / d for each d")
    parser.add_argument("--hnsw-max", type=int, default=100000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/search.json")
    args = parser.parse_args(argv)

    import numpy as np

    from mobilenet_embed.search import make_backend, recall_at_k

    def unit(n: int, seed: int) -> np.ndarray:
        x = np.random.default_rng(seed).standard_normal((n, args.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    sizes = [int(s) for s in args.sizes.split(",")]
    names = args.backends.split(",")
    if "tensorflow" in names:
        import tensorflow  # noqa: F401  (its import is not part of any build time)
    queries = unit(args.queries, args.seed + 1)
    rows_out = []
    print(f"search benchmark: {args.dim}-d unit vectors, {args.queries} queries, top-{args.k}, "
          f"{os.cpu_count()} CPUs")
    header = (f"{'N':>9} {'backend':<22} {'build s':>8} {'queries/s':>10} {'ms/query':>9} {'RSS MB':>8} "
              f"{'est MB':>8} {'recall@1':>9} {f'recall@{args.k}':>10} {'identical':>9}")
    print(header)
    for n in sizes:
        gallery = unit(n, args.seed)
        truth = None
        for name in names:
            if name == "faiss-hnsw" and n > args.hnsw_max:
                continue
            variants = [{}]
            if name == "faiss-ivf":
                nlist = max(1, round(np.sqrt(n)))
                variants = [{"nlist": nlist, "nprobe": max(1, nlist // int(d))}
                            for d in args.nprobe_divisors.split(",")]
            backend = None
            for options in variants:
                gc.collect()
                before = rss_bytes()
                start = time.perf_counter()
                if backend is None or name != "faiss-ivf":
                    backend = make_backend(name, gallery, **options)
                    build = time.perf_counter() - start
                    grown = rss_bytes() - before
                else:  # same IVF index, another nprobe: no rebuild
                    backend.index.nprobe = backend.nprobe = options["nprobe"]
                backend.search(queries[:2], args.k)  # warm-up
                best = float("inf")
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    dist, rows = backend.search(queries, args.k)
                    best = min(best, time.perf_counter() - t0)
                if name == "numpy":
                    truth = rows
                label = name + (f" nlist {options['nlist']} nprobe {options['nprobe']}" if options else "")
                row = {"n": n, "backend": name, "options": options, "exact": backend.exact,
                       "build_seconds": build, "queries_per_second": args.queries / best,
                       "ms_per_query": 1000 * best / args.queries, "rss_growth_mb": grown / 2**20,
                       "estimated_mb": (backend.nbytes or gallery.nbytes) / 2**20,
                       "recall_at_1": recall_at_k(rows, truth, 1), f"recall_at_{args.k}": recall_at_k(rows, truth, args.k),
                       "identical_to_numpy": bool(np.array_equal(rows, truth))}
                rows_out.append(row)
                print(f"{n:>9,} {label:<22} {build:>8.2f} {row['queries_per_second']:>10.1f} "
                      f"{row['ms_per_query']:>9.3f} {row['rss_growth_mb']:>8.1f} {row['estimated_mb']:>8.1f} "
                      f"{row['recall_at_1']:>9.3f} {row[f'recall_at_{args.k}']:>10.3f} "
                      f"{'yes' if row['identical_to_numpy'] else 'no':>9}")
            del backend
        del gallery
    result = {"dim": args.dim, "queries": args.queries, "k": args.k, "repeats": args.repeats,
              "cpu_count": os.cpu_count(), "rows": rows_out}
    write_result(args.out, result)
    return result
