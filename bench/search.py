"""Search benchmark: latency of one query's exact search against the number of indexed rows.

Synthetic index of random unit vectors of the real embedding width (256, LaViLa base), stored float16 as
`recap index` writes them; hour-long videos at the official settings (900 clip rows, 20 segment rows, one
summary row: 921 rows each). Per size: `exact_scores` alone (the float32 product over every row) and the
whole `search` (the product, then videos -> segments -> clip spans). Sizes whose matrix would take more than
half the free memory are skipped. Prints figures; asserts nothing.

`--ann` (needs faiss-cpu: `pip install -e '.[bench]'`) then compares the exact product with two FAISS indexes
on clustered vectors (random unit vectors have no neighbours worth finding; real embeddings cluster), with
queries near indexed rows: HNSW (M 32) and IVF-Flat (4 sqrt(rows) lists, at most rows / 40), one thread each like the exact
product. Per size: build seconds, extra memory, per-query latency and recall@10 against the exact top 10.

    python bench/search.py [--max-rows 10000000] [--queries 7] [--ann] [--ann-max-rows 1000000]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import psutil
import pyarrow as pa
import torch

from pipeline.search import BLOCK_ROWS, SearchIndex, exact_scores, search

WIDTH = 256
PER_VIDEO = (900, 20, 1)  # clip, segment and video rows of an hour at 4-s clips and 180-s segments


def synthetic(n_rows: int, seed: int = 0) -> SearchIndex:
    rng = np.random.default_rng(seed)
    joint = np.empty((n_rows, WIDTH), np.float16)
    for i in range(0, n_rows, 1 << 18):
        block = rng.standard_normal((min(1 << 18, n_rows - i), WIDTH), dtype=np.float32)
        joint[i:i + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    level = np.concatenate([np.full(n, code, np.int8) for code, n in enumerate(PER_VIDEO)])
    start = np.concatenate([np.arange(900) * 4.0, np.arange(20) * 180.0, [0.0]])
    end = np.concatenate([start[:900] + 4, start[900:920] + 180, [3600.0]])
    per_video = sum(PER_VIDEO)
    n_videos = -(-n_rows // per_video)
    offsets = np.minimum(np.arange(n_videos + 1, dtype=np.int64) * per_video, n_rows)
    tile = lambda a: np.tile(a, n_videos)[:n_rows]  # noqa: E731
    return SearchIndex(video_ids=[f"v{i:07d}" for i in range(n_videos)], offsets=offsets,
                       video=np.repeat(np.arange(n_videos, dtype=np.int32), per_video)[:n_rows], level=tile(level),
                       start=tile(start), end=tile(end), caption=pa.repeat(pa.scalar("a caption"), n_rows),
                       joint=joint)


def median_ms(fn, queries: np.ndarray) -> float:
    fn(queries[0])  # warm-up
    times = []
    for q in queries[1:]:
        start = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def all_threads_scores(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    """`exact_scores` without pinning torch to one thread: for the threads comparison."""
    rows, q = torch.from_numpy(matrix), torch.from_numpy(query)
    out, buf = torch.empty(len(rows)), torch.empty(BLOCK_ROWS, rows.shape[1])
    for i in range(0, len(rows), BLOCK_ROWS):
        n = min(BLOCK_ROWS, len(rows) - i)
        buf[:n].copy_(rows[i:i + n])
        torch.mv(buf[:n], q, out=out[i:i + n])
    return out.numpy()


def clustered(n_rows: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows around 4,096 random centres (cosine to their centre about 0.7), and queries near random rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4096, WIDTH), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rows = np.empty((n_rows, WIDTH), np.float32)
    for i in range(0, n_rows, 1 << 18):
        n = min(1 << 18, n_rows - i)
        block = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, WIDTH), np.float32) / 16
        rows[i:i + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    queries = rows[rng.integers(0, n_rows, n_queries)] + rng.standard_normal((n_queries, WIDTH), np.float32) / 16
    return rows, queries / np.linalg.norm(queries, axis=1, keepdims=True)


def ann_comparison(sizes: list[int], n_queries: int) -> None:
    import faiss

    faiss.omp_set_num_threads(1)
    print(f"\nANN against exact, clustered rows, {n_queries} queries, top 10, one thread")
    print(f"{'rows':>12} {'method':<22} {'build':>8} {'extra memory':>13} {'per query':>10} {'recall@10':>10}")
    for n in sizes:
        rows, queries = clustered(n, n_queries)
        half = rows.astype(np.float16)
        truth = [set(np.argpartition(-exact_scores(half, q), 10)[:10].tolist()) for q in queries]
        exact = median_ms(lambda q: exact_scores(half, q), queries)
        print(f"{n:>12,} {'exact (float16 rows)':<22} {'-':>8} {'-':>13} {exact:>7.2f} ms {1.0:>10.3f}", flush=True)
        nlist = min(int(4 * np.sqrt(n)), n // 40)  # FAISS wants 39+ training points per list
        builds = {"HNSW M32 ef64": lambda: faiss.IndexHNSWFlat(WIDTH, 32, faiss.METRIC_INNER_PRODUCT),
                  f"IVF-Flat {nlist} nprobe 16": lambda: faiss.IndexIVFFlat(faiss.IndexFlatIP(WIDTH), WIDTH, nlist,
                                                                            faiss.METRIC_INNER_PRODUCT)}
        for name, make in builds.items():
            index, start = make(), time.perf_counter()
            if not index.is_trained:
                index.train(rows[np.random.default_rng(0).permutation(n)[:min(n, 64 * nlist)]])
            index.add(rows)
            build = time.perf_counter() - start
            if hasattr(index, "hnsw"):
                index.hnsw.efSearch = 64
            else:
                index.nprobe = 16
            found = [set(index.search(q[None], 10)[1][0].tolist()) for q in queries]
            recall = np.mean([len(f & t) / 10 for f, t in zip(found, truth)])
            latency = median_ms(lambda q: index.search(q[None], 10), queries)
            extra = len(faiss.serialize_index(index)) - half.nbytes
            print(f"{n:>12,} {name:<22} {build:>6.1f} s {extra / 2**20:>9.0f} MiB {latency:>7.2f} ms {recall:>10.3f}",
                  flush=True)
            del index


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-rows", type=int, default=10_000_000)
    parser.add_argument("--queries", type=int, default=7)
    parser.add_argument("--ann", action="store_true", help="also compare FAISS HNSW and IVF (needs faiss-cpu)")
    parser.add_argument("--ann-max-rows", type=int, default=1_000_000)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((args.queries + 1, WIDTH), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    print(f"torch {torch.__version__}, {psutil.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB; width {WIDTH}, float16 rows, float32 products; "
          f"median of {args.queries} queries")
    print(f"{'rows':>12} {'videos (1 h)':>13} {'matrix':>9} {'exact scores':>13} {'whole search':>13}")
    sizes = [n for n in (10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000, 10_000_000) if n <= args.max_rows]
    for n in sizes:
        if n * WIDTH * 2 > psutil.virtual_memory().available / 2:
            print(f"{n:>12,} skipped: {n * WIDTH * 2 / 2**30:.1f} GiB is over half the free memory")
            continue
        index = synthetic(n)
        exact = median_ms(lambda q: exact_scores(index.joint, q), queries)
        whole = median_ms(lambda q: search(index, q, level="clip", top=10), queries)
        print(f"{n:>12,} {len(index.video_ids):>13,} {index.joint.nbytes / 2**20:>6.0f} MiB {exact:>10.1f} ms "
              f"{whole:>10.1f} ms", flush=True)
        if n == 1_000_000:
            threads = median_ms(lambda q: all_threads_scores(index.joint, q), queries)
            print(f"{'':>12} exact scores on {torch.get_num_threads()} torch threads instead of one: {threads:.1f} ms")
        del index
    if args.ann:
        ann_comparison([n for n in (10_000, 100_000, 1_000_000, 3_000_000) if n <= args.ann_max_rows], 200)


if __name__ == "__main__":
    main()
