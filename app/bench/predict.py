"""`python -m app.bench predict`: queries per second and recall of index search against exact
search over 10^5, 10^6 and 10^7 classes (D = 128, one process), with the memory of each index;
JSON and PNG to docs/results/.

The rows imitate a trained classifier of confusable products (as `app.bench graph`): classes
in families of --family whose rows are a random family centre plus --spread * N(0, I/D),
normalised. They are generated at run time in chunks of CHUNK_ROWS, twice (a first pass draws
the k-means sample and the query classes, a second adds each chunk to the indexes and scores
the queries exactly against it), so 10^7 x 128 float32 rows (5.1 GB) are never held at once.
A query is a random class's row plus --query-noise * N(0, I/D), normalised (about cosine 0.8 to
its row at the default): a feature of that class as a trained backbone would produce it.

Measured, product code only: exact search is `ExactSearcher` (every row, chunked matmul; its
time summed over the chunks, the queries in one batch), index search `IndexSearcher` over an
index from `app.inference.index` (`ivf`: float32 rows, `ivf-fp16`: float16 rows, `ivf-pq4`:
4-bit fast-scan codes re-scored on float16 rows, at each --nprobe; `hnsw`: a graph over float32 rows, at each --ef-search, up to --max-hnsw-classes:
its build is slow). recall@1 / recall@5 against exact as in app/inference/index.py;
`top1_accuracy` is the share of queries whose top-1 is the query's own class (exact and
index), and `accuracy_ratio` index / exact. `speedup` is the ratio of wall-clock queries/s,
`speedup_cpu` that of queries per CPU-second of this process: on a shared host the second does
not depend on the share of the cores other jobs took while exact or index search was timed. Memory: the index's lists (codes and ids) and
centroids, or HNSW's rows and links.

Legend: c = rows of a chunk, D = embedding dim, q = queries.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from app.bench.results import RESULTS, bench_command, host_load, write_result
from app.inference import index as ivf
from app.inference.search import ExactSearcher, IndexSearcher, merge_topk

CHUNK_ROWS = 1 << 20
TARGETS = {1_000_000: 20.0, 10_000_000: 100.0}  # classes -> speed-up over exact
TARGET_RECALL = 0.95


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app.bench predict",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, nargs="+",
                   default=[100_000, 1_000_000, 10_000_000])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--family", type=int, default=16)
    p.add_argument("--spread", type=float, default=0.75)
    p.add_argument("--query-noise", type=float, default=0.75)
    p.add_argument("--kinds", nargs="+", default=["ivf", "ivf-fp16", "ivf-pq4", "hnsw"],
                   choices=ivf.INDEX_KINDS)
    p.add_argument("--max-hnsw-classes", type=int, default=100_000,
                   help="hnsw only up to this many classes: build time (default: 100k)")
    p.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128],
                   help="efSearch values of hnsw (default: 16 32 64 128)")
    p.add_argument("--max-flat-classes", type=int, default=100_000,
                   help="ivf (float32) only up to this many classes: ivf-fp16 has its recall "
                        "at half the memory and add time (default: 100k)")
    p.add_argument("--max-fp16-classes", type=int, default=10_000_000,
                   help="ivf-fp16 only up to this many classes: its add time (default: 10M)")
    p.add_argument("--nlist", type=int, nargs="*", default=[],
                   help="lists per class count, in --classes order (default: 4 sqrt(C), at "
                        "most 4096)")
    p.add_argument("--max-nlist", type=int, default=4096)
    p.add_argument("--pq4-nlist", type=int, nargs="*", default=[],
                   help="lists of ivf-pq4 per class count, in --classes order (default: as "
                        "the other kinds; above 8192 its coarse quantizer is an HNSW graph)")
    p.add_argument("--train-per-list", type=int, default=32)
    p.add_argument("--nprobes", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="predict_search")
    p.add_argument("--results", type=Path, default=RESULTS)
    return p.parse_args(argv)


class ClusteredRows:
    """Rows [lo, hi) of the synthetic classifier, generated chunk by chunk (the same rows for
    the same seed whatever is asked in which order)."""

    def __init__(self, num_classes: int, dim: int, family: int, spread: float, seed: int):
        rng = np.random.default_rng([seed, 1])
        self.family_of = (rng.permutation(num_classes) // family).astype(np.int32)
        num_families = math.ceil(num_classes / family)
        centres = np.random.default_rng([seed, 2]).standard_normal((num_families, dim),
                                                                   dtype=np.float32)
        self.centres_fD = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        self.num_classes, self.dim, self.spread, self.seed = num_classes, dim, spread, seed

    def chunk(self, index: int) -> tuple[int, np.ndarray]:
        lo = index * CHUNK_ROWS
        hi = min(lo + CHUNK_ROWS, self.num_classes)
        rng = np.random.default_rng([self.seed, 3, index])
        rows_cD = self.centres_fD[self.family_of[lo:hi]]
        rows_cD += (self.spread / math.sqrt(self.dim)) * rng.standard_normal(
            (hi - lo, self.dim), dtype=np.float32)
        rows_cD /= np.linalg.norm(rows_cD, axis=1, keepdims=True)
        return lo, rows_cD

    def num_chunks(self) -> int:
        return math.ceil(self.num_classes / CHUNK_ROWS)


def first_pass(rows: ClusteredRows, sample: np.ndarray, query_ids: np.ndarray):
    """(k-means sample rows, query class rows), one chunk in memory at a time."""
    sample_sD = np.empty((len(sample), rows.dim), np.float32)
    query_qD = np.empty((len(query_ids), rows.dim), np.float32)
    for i in range(rows.num_chunks()):
        lo, rows_cD = rows.chunk(i)
        hi = lo + len(rows_cD)
        take = (sample >= lo) & (sample < hi)
        sample_sD[take] = rows_cD[sample[take] - lo]
        take = (query_ids >= lo) & (query_ids < hi)
        query_qD[take] = rows_cD[query_ids[take] - lo]
    return sample_sD, query_qD


def second_pass(rows: ClusteredRows, indexes: dict, queries_qD: torch.Tensor) -> dict:
    """Adds every chunk to the indexes and scores the queries exactly against it."""
    vals, ids, exact_s, add_s = None, None, 0.0, {kind: 0.0 for kind in indexes}
    exact_cpu_s = 0.0
    for i in range(rows.num_chunks()):
        lo, rows_cD = rows.chunk(i)
        for kind, index in indexes.items():
            start = time.perf_counter()
            index.add(rows_cD)
            add_s[kind] += time.perf_counter() - start
        searcher = ExactSearcher(torch.from_numpy(rows_cD), lo, "cosine")
        start, cpu = time.perf_counter(), time.process_time()
        v, j = searcher.search(queries_qD, 5)
        vals, ids = (v, j) if vals is None else merge_topk(vals, ids, v, j, 5)
        exact_s += time.perf_counter() - start
        exact_cpu_s += time.process_time() - cpu
        del searcher, rows_cD
    return {"ids": ids, "seconds": exact_s, "cpu_seconds": exact_cpu_s, "add_s": add_s}


def make_queries(query_qD: np.ndarray, noise: float, seed: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, 4])
    q = query_qD + (noise / math.sqrt(query_qD.shape[1])) * rng.standard_normal(
        query_qD.shape, dtype=np.float32)
    return torch.from_numpy(q / np.linalg.norm(q, axis=1, keepdims=True))


def measure_class_count(args, num_classes: int, nlist: int, pq4_nlist: int) -> dict:
    """Every index kind and nprobe at one class count."""
    lists = {kind: pq4_nlist if kind == "ivf-pq4" else nlist for kind in args.kinds}
    rng = np.random.default_rng([args.seed, 5])
    query_ids = rng.choice(num_classes, args.queries, replace=False)
    rows = ClusteredRows(num_classes, args.dim, args.family, args.spread, args.seed)
    sample = ivf.training_sample(num_classes, max(lists.values()), args.seed,
                                 args.train_per_list)
    start = time.perf_counter()
    sample_sD, query_qD = first_pass(rows, sample, query_ids)
    print(f"C={num_classes}: first pass {time.perf_counter() - start:.1f} s", flush=True)
    queries_qD = make_queries(query_qD, args.query_noise, args.seed)
    limit = {"ivf": args.max_flat_classes, "hnsw": args.max_hnsw_classes,
             "ivf-fp16": args.max_fp16_classes}
    kinds = [k for k in args.kinds if num_classes <= limit.get(k, num_classes)]
    indexes, train_s = {}, {}
    for kind in kinds:
        start = time.perf_counter()
        indexes[kind] = ivf.new_index(kind, args.dim, lists[kind])
        if kind != "hnsw":
            ivf.train_index(indexes[kind], sample_sD, args.seed, args.train_per_list)
        train_s[kind] = time.perf_counter() - start
    del sample_sD
    start = time.perf_counter()
    exact = second_pass(rows, indexes, queries_qD)
    print(f"C={num_classes}: trained {train_s}, second pass {time.perf_counter() - start:.1f} s "
          f"(adds {exact['add_s']}, exact {exact['seconds']:.1f} s)", flush=True)
    exact_ids = exact["ids"]
    exact_qps = args.queries / exact["seconds"]
    exact_qps_cpu = args.queries / exact["cpu_seconds"]
    exact_acc = float((exact_ids[:, 0].numpy() == query_ids).mean())
    settings = []
    for kind, index in indexes.items():
        for nprobe in args.ef_search if kind == "hnsw" else args.nprobes:
            settings.append(_search_setting(kind, index, nprobe, queries_qD, exact_ids,
                                            query_ids, (exact_qps, exact_qps_cpu), exact_acc,
                                            lists[kind]))
            settings[-1].update(train_s=train_s[kind], add_s=exact["add_s"][kind])
            last = settings[-1]
            print(f"C={num_classes} {kind} width={nprobe}: {last['qps']:.0f} q/s "
                  f"({last['speedup']:.1f}x, CPU time {last['speedup_cpu']:.1f}x) "
                  f"recall@1 {last['recall_at_1']:.3f}", flush=True)
        del index
    indexes.clear()
    return {"num_classes": num_classes, "nlist": nlist, "pq4_nlist": pq4_nlist,
            "exact_qps": exact_qps, "exact_qps_per_cpu_s": exact_qps_cpu,
            "exact_top1_accuracy": exact_acc, "exact_bytes": num_classes * args.dim * 4,
            "settings": settings, "target": _target(num_classes, settings)}


def _search_setting(kind, index, nprobe, queries_qD, exact_ids, query_ids, exact_qps,
                    exact_acc, nlist) -> dict:
    """One nprobe of one index: the queries in one batch, best of 3 timings."""
    searcher = IndexSearcher([(index, 0)], "cosine", nprobe)
    times, cpu_times = [], []
    for _ in range(3):
        start, cpu = time.perf_counter(), time.process_time()
        _, found = searcher.search(queries_qD, 5)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    qps = len(query_ids) / min(times)
    qps_cpu = len(query_ids) / min(cpu_times)
    measured = ivf.recall(exact_ids, found)
    acc = float((found[:, 0].numpy() == query_ids).mean())
    hnsw = kind == "hnsw"
    return {"kind": kind, "nlist": 0 if hnsw else nlist, "nprobe": None if hnsw else
            min(nprobe, nlist), "ef_search": nprobe if hnsw else None, "qps": qps,
            "speedup": qps / exact_qps[0], "qps_per_cpu_s": qps_cpu,
            "speedup_cpu": qps_cpu / exact_qps[1], "recall_at_1": measured["at_1"],
            "recall_at_5": measured["at_5"], "top1_accuracy": acc,
            "accuracy_ratio": acc / exact_acc if exact_acc else None,
            "index_bytes": ivf.index_bytes(index)}


def _target(num_classes: int, settings: list[dict]) -> dict | None:
    """The fastest setting with recall@1 >= TARGET_RECALL, judged against the speed-up target
    of this class count (None where the issue sets none)."""
    if num_classes not in TARGETS:
        return None
    good = [s for s in settings if s["recall_at_1"] >= TARGET_RECALL]
    best = max(good, key=lambda s: s["speedup"], default=None)
    return {"speedup_target": TARGETS[num_classes], "recall_target": TARGET_RECALL,
            "best": best, "met": bool(best and best["speedup"] >= TARGETS[num_classes]),
            "met_in_cpu_time": any(s["speedup_cpu"] >= TARGETS[num_classes] for s in good)}


def plot(plt, result: dict):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for entry in result["class_counts"]:
        for kind in sorted({s["kind"] for s in entry["settings"]}):
            pts = [s for s in entry["settings"] if s["kind"] == kind]
            ax.plot([s["speedup"] for s in pts], [s["recall_at_1"] for s in pts], marker="o",
                    label=f"C={entry['num_classes']:.0e} {kind}")
    ax.axhline(TARGET_RECALL, color="grey", linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("queries/s, x exact search")
    ax.set_ylabel("recall@1 against exact")
    ax.set_title("index search (IVF nprobe, HNSW efSearch varied), D=128, one process")
    ax.legend(fontsize=7)
    return fig


def main(argv) -> int:
    """Measures each class count in turn; the result files are rewritten after each, so a run
    stopped during a large class count keeps the smaller ones."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    entries = []
    for i, num_classes in enumerate(args.classes):
        nlist = args.nlist[i] if i < len(args.nlist) else \
            min(args.max_nlist, ivf.default_nlist(num_classes))
        start = time.perf_counter()
        pq4_nlist = args.pq4_nlist[i] if i < len(args.pq4_nlist) else nlist
        entries.append(measure_class_count(args, num_classes, nlist, pq4_nlist))
        entries[-1]["wall_s"] = time.perf_counter() - start
        result = {"dim": args.dim, "queries": args.queries, "family": args.family,
                  "spread": args.spread, "query_noise": args.query_noise,
                  "threads": torch.get_num_threads(), **host_load(),
                  "class_counts": entries, "complete": i + 1 == len(args.classes)}
        write_result(args.results, args.name, bench_command(["predict", *argv]), result, plot)
    return 0
