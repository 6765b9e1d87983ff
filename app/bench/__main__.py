"""`python -m app.bench SUBCOMMAND`: benchmarks whose results go to docs/results/ as JSON (with
the exact command that produced them) and a PNG.

  step      samples/s, step time against the backbone alone, and peak memory per rank of the
            softmax modes at several class counts (each class count one mpirun job; the modes
            and the backbone alone are timed in the same processes, median of --repeats)
  accuracy  top-1 over all classes of full / sampled / knn (several K and random negatives) on
            the structured synthetic data at equal steps (each configuration one training run)
  graph     KNN graph build time and recall@K (app/bench/graph.py)
  continual convergence on a grown catalogue: steps to a target top-1 from scratch, from an
            earlier run (random or centre rows, adaptive schedule, LARS at a larger batch)
            (app/bench/continual.py)
  refresh   step time (mean, median, p99) with a sync against a background KNN graph refresh
            (app/bench/refresh.py)
  knn       the KNN softmax benchmark: runs the parts above with the settings the KNN softmax
            is judged by (--parts; none = only the summary), then checks its targets against
            their newest results and writes knn_targets.json / .png
  comm      bytes per step by kind, step time and top-1 with dense and sparse backbone
            gradients at 2 and 4 ranks, and an alpha-beta projection of the step time to
            8..256 ranks (app/bench/comm.py)
  predict   queries/s and recall@1/@5 of index search (faiss IVF, HNSW) against exact search
            over 10^5..10^7 classes, one process, with each index's memory
            (app/bench/predict.py)
  gpu       one process on one GPU: samples/s of full and knn at 10^6..10^8 classes, peak
            memory against rows + optimizer state + graph, the most classes that fit, an
            exact graph build's time; needs only torch, numpy and h5py (app/bench/gpu.py)

Benchmarks measure speed; tests check behaviour. Run them on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.bench import knn
from app.bench.results import RESULTS


def _results_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=RESULTS,
                   help="folder of the result files (default: docs/results)")


def _step_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    s.add_argument("--modes", nargs="+", default=["full", "sampled", "knn"])
    s.add_argument("--max-dense", type=int, default=1_000_000,
                   help="skip full/sampled above this many classes (memory, time)")
    s.add_argument("--np", type=int, default=2)
    s.add_argument("--batch", type=int, default=256)
    s.add_argument("--dim", type=int, default=128)
    s.add_argument("--k", type=int, default=64)
    s.add_argument("--random-negatives", type=int, default=64)
    s.add_argument("--sample-rate", type=float, default=0.1)
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--name", default="step_throughput")
    _results_argument(s)


def _accuracy_arguments(a: argparse.ArgumentParser) -> None:
    a.add_argument("--classes", type=int, default=100_000)
    a.add_argument("--per-class", type=int, default=10)
    a.add_argument("--data", default="data/bench-100k")
    a.add_argument("--runs", default="runs/bench-accuracy")
    a.add_argument("--config", default="configs/demo.yaml")
    a.add_argument("--steps", type=int, default=1000)
    a.add_argument("--eval-samples", type=int, default=20000)
    a.add_argument("--np", type=int, default=2)
    a.add_argument("--configs", nargs="+", default=[
        "softmax.mode=full", "softmax.mode=sampled,softmax.sample_rate=0.0026",
        "softmax.mode=knn,softmax.k=64,softmax.random_negatives=64"])
    a.add_argument("--name", default="accuracy_100k")
    _results_argument(a)


def _refresh_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("--classes", type=int, default=100_000)
    r.add_argument("--per-class", type=int, default=2)
    r.add_argument("--data", default="data/bench-refresh-100k")
    r.add_argument("--runs", default="runs/bench-refresh")
    r.add_argument("--config", default="configs/demo.yaml")
    r.add_argument("--np", type=int, default=2)
    r.add_argument("--steps", type=int, default=160)
    r.add_argument("--batch", type=int, default=128)
    r.add_argument("--k", type=int, default=64)
    r.add_argument("--index", default="auto")
    r.add_argument("--refresh-every", type=int, default=50)
    r.add_argument("--lag", type=int, default=50, help="knn.refresh_lag of the background run")
    r.add_argument("--name", default="knn_refresh_100k")
    _results_argument(r)


def _knn_arguments(k: argparse.ArgumentParser) -> None:
    k.add_argument("--parts", nargs="*", default=list(knn.KNN_PARTS), choices=list(knn.KNN_PARTS),
                   help="parts to run before the summary (default: all; none: only the "
                        "summary of the newest results)")
    k.add_argument("--np", type=int, default=2, help="ranks of the graph part (default: 2)")
    _results_argument(k)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    _step_arguments(sub.add_parser("step", help="step throughput of the softmax modes"))
    _accuracy_arguments(sub.add_parser("accuracy",
                                       help="top-1 of the softmax modes at equal steps"))
    g = sub.add_parser("graph", help="KNN graph build time and recall (app/bench/graph.py)")
    g.add_argument("rest", nargs=argparse.REMAINDER)
    c = sub.add_parser("continual", help="continuous convergence on a grown catalogue "
                                         "(app/bench/continual.py)")
    from app.bench import continual  # noqa: PLC0415 - imports nothing heavy

    continual.arguments(c)
    _results_argument(c)
    pr = sub.add_parser("predict", help="index against exact search for app.predict "
                                        "(app/bench/predict.py)")
    pr.add_argument("rest", nargs=argparse.REMAINDER)
    gp = sub.add_parser("gpu", help="one-GPU capacity and throughput, one process "
                                    "(app/bench/gpu.py)")
    gp.add_argument("rest", nargs=argparse.REMAINDER)
    _knn_arguments(sub.add_parser("knn", help="the KNN softmax benchmark: accuracy, step and "
                                              "graph parts, then its targets (knn_targets.json "
                                              "/ .png)"))
    _refresh_arguments(sub.add_parser("refresh", help="step time with a sync against a "
                                                      "background KNN graph refresh"))
    from app.bench import comm  # noqa: PLC0415 - imports nothing heavy

    cm = sub.add_parser("comm", help="bytes by kind, dense against sparse gradients, and a "
                                     "projection to 8..256 ranks (app/bench/comm.py)")
    comm.arguments(cm)
    _results_argument(cm)
    return p


def main(argv=None) -> int:
    """Runs one benchmark; `argv` without the program name (default: sys.argv[1:]). Each
    benchmark module is imported only when it runs (step and graph import the product code)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["graph"]:
        # argparse cannot hand options after a subcommand on as a remainder: pass them directly.
        from app.bench import graph  # noqa: PLC0415

        return graph.main(argv[1:])
    if argv[:1] == ["gpu"]:
        from app.bench import gpu  # noqa: PLC0415

        return gpu.main(argv[1:])
    if argv[:1] == ["predict"]:
        from app.bench import predict  # noqa: PLC0415

        return predict.main(argv[1:])
    args = parser().parse_args(argv)
    args.argv = argv
    if args.what == "knn":
        return knn.run(args, run_part=main)
    if args.what == "continual":
        from app.bench import continual  # noqa: PLC0415

        return continual.run(args)
    if args.what == "step":
        from app.bench import step  # noqa: PLC0415

        return step.run(args)
    if args.what == "comm":
        from app.bench import comm  # noqa: PLC0415

        return comm.run(args)
    if args.what == "refresh":
        from app.bench import refresh  # noqa: PLC0415

        return refresh.run(args)
    from app.bench import accuracy  # noqa: PLC0415 - the one left: graph was handed on above

    return accuracy.run(args)


if __name__ == "__main__":
    sys.exit(main())
