"""`python -m app.export --run RUN [--step N] --out MODEL_DIR`: a self-contained model directory
from a run's checkpoint (layout: app/inference/model_dir.py) for `python -m app.predict`.

One process. The backbone weights (plain tensors), its config and input preprocessing, the
classifier rows (HDF5, one file per --rows-per-file classes), classes.tsv and a faiss IVF index
whose recall against exact search, measured on features of the run's val split, is written into
the manifest. Written as MODEL_DIR.tmp and renamed when complete; an existing MODEL_DIR is
refused (exit 2), as is a missing or damaged checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app.export", description=(
        "Export a run's checkpoint as a model directory for python -m app.predict. Exit codes: "
        "0 done, 2 bad run, checkpoint, dataset or output (one error line naming the file)."))
    p.add_argument("--run", required=True, help="run directory (config.yaml, checkpoints/)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest complete one)")
    p.add_argument("--out", required=True, type=Path, help="model directory to create (must "
                                                            "not exist)")
    p.add_argument("--data", help="the run's dataset directory, if it moved since training "
                                  "(default: data.path of the run's config.yaml)")
    p.add_argument("--index", default="ivf", choices=["ivf", "ivf-fp16", "ivf-pq4", "hnsw", "none"],
                   help="search index: ivf (float32 rows), ivf-fp16 (half the memory), ivf-pq4 "
                        "(4-bit codes scanned, the best candidates re-scored on float16 rows: "
                        "the fastest at 10^6+ classes), hnsw "
                        "(a graph: better recall per query, slow to build) or none (exact "
                        "search only) (default: ivf)")
    p.add_argument("--nlist", type=int, default=0,
                   help="IVF lists per row file (default 0: about 4 sqrt(rows))")
    p.add_argument("--nprobe", type=int, default=0, help=(
        "IVF lists scanned per query, or HNSW efSearch (default 0: the smallest of 1, 2, 4, "
        "... (HNSW: 16, 32, ...) whose recall@1 on the val features reaches --target-recall)"))
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="recall@1 against exact search that --nprobe 0 aims at (default: 0.95)")
    p.add_argument("--recall-queries", type=int, default=2000,
                   help="val features the recall is measured on (default: 2000)")
    p.add_argument("--rows-per-file", type=int, default=1 << 22,
                   help="classes per row file and index file (default: 4194304)")
    p.add_argument("--seed", type=int, default=0, help="seed of k-means and the query sample")
    args = p.parse_args(argv)
    for name in ("nlist", "nprobe"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0")
    if args.rows_per_file < 1 or args.recall_queries < 1:
        p.error("--rows-per-file and --recall-queries must be >= 1")
    if not 0.0 < args.target_recall <= 1.0:
        p.error("--target-recall must be in (0, 1]")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from app.inference import export  # noqa: PLC0415 - after parsing: --help stays fast
    from app.runlog import init_logging  # noqa: PLC0415
    from mpi.world import fake_world  # noqa: PLC0415

    log = init_logging(fake_world())
    options = export.IndexOptions(args.index, args.nlist, args.nprobe, args.target_recall,
                                  args.seed)
    try:
        source = export.load_source(Path(args.run), args.step, args.data)
        manifest = export.export_model(source, args.out, args.rows_per_file, options,
                                       args.recall_queries, log)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    index = manifest["index"]
    detail = "no index (exact search only)" if index is None else (
        f"{index['kind']} {'efSearch' if index['kind'] == 'hnsw' else 'nprobe'}="
        f"{index['nprobe']}, recall@1 {index['recall']['at_1']:.4f} "
        f"recall@5 {index['recall']['at_5']:.4f} against exact on "
        f"{index['recall']['queries']} val features")
    log.info("exported step %d of %s to %s: %d classes, %s", manifest["source"]["step"],
             args.run, args.out, manifest["num_classes"], detail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
