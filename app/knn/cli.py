"""`python -m app.knn_graph`: build the KNN graph of a run's checkpoint, measure its recall and
write it to `RUN_DIR/knn/graph-step-NNNNNNNN.h5` (docs/design.md "Contracts: Entry points").

Under mpirun with any number of ranks: rank 0 picks the checkpoint, every rank reads its own
class range of the classifier rows from it, and the ranks build the graph together. Exit code 2
on bad input, with one `error:` line on stderr.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app import checkpoint
from app.knn.graph_file import write_graph
from app.knn.random_graph import random_graph
from app.knn.recall import recall_at_k
from app.knn.rows import clamp_k
from app.knn.search import AUTO_REFINE, FLAT_MAX_CLASSES, INDEXES, LocalGraph, build_graph
from app.runlog import init_logging
from mpi import collectives
from mpi.agree import SetupError, agree, decide_on_root, exit_on_setup_error
from mpi.partition import class_range
from mpi.world import init_world


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m app.knn_graph",
        description="Build the KNN graph of the classes from the newest complete checkpoint of a "
                    "run (under mpirun, any number of ranks), measure its recall and write it "
                    "to RUN_DIR/knn/graph-step-NNNNNNNN.h5. Exit code 2 on bad input.")
    p.add_argument("--run", required=True, help="run directory (out_dir of app.train)")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the newest complete one "
                                        "under RUN_DIR/checkpoints)")
    p.add_argument("--k", type=int, required=True, help="neighbours per class, itself included")
    p.add_argument("--index", choices=INDEXES, default="auto",
                   help="faiss index (default: %(default)s: flat up to "
                        f"{FLAT_MAX_CLASSES} classes, else IVF + refinement)")
    p.add_argument("--nprobe", type=int, default=16, help="IVF lists probed (default: 16)")
    p.add_argument("--refine", type=int, default=None,
                   help=f"refinement passes (default: {AUTO_REFINE} for auto above the flat "
                        f"limit, else 0)")
    p.add_argument("--random", action="store_true",
                   help="write a random graph (class itself + K-1 random classes) instead")
    p.add_argument("--samples", type=int, default=1000,
                   help="classes sampled to measure recall (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling (default: 0)")
    p.add_argument("--out", help="output file (default: RUN_DIR/knn/graph-step-NNNNNNNN.h5)")
    return p.parse_args(argv)


@dataclass
class _Job:
    """What this rank builds: its rows [start, stop) of the checkpoint's classifier (None for a
    random graph) and where the graph goes."""

    num_classes: int
    step: int
    start: int
    stop: int
    rows_cD: np.ndarray | None
    out: Path


def main(argv=None) -> int:
    args = parse_args(argv)
    world = init_world(use_horovod=False)
    init_logging(world)
    try:
        job = _prepare(world, args)
    except SetupError as exc:
        return exit_on_setup_error(world, exc)
    k = clamp_k(args.k, job.num_classes, world.is_root)
    graph, recall = _build(world, args, job, k)
    write_graph(world, job.out, graph, job.num_classes, k, job.step, recall)
    seconds = max(collectives.allgather_object(world, graph.seconds))
    if world.is_root:
        print(f"knn graph: {job.num_classes} classes, K={k}, index {graph.detail}, built in "
              f"{seconds:.1f}s on {world.size} ranks, recall@{min(10, k)} {recall:.3f} "
              f"-> {job.out}", flush=True)
    return 0


def _prepare(world, args) -> _Job:
    """Collective: rank 0 checks the arguments and picks the checkpoint (ranks may see a
    checkpoint being written differently); every rank then reads its own rows of it. Any
    failure is the same SetupError on every rank, before the first collective of the build."""
    run_dir = Path(args.run)

    def choose() -> Path:
        if args.k < 1 or args.samples < 1 or args.nprobe < 1:
            raise ValueError(f"--k, --samples and --nprobe must be >= 1, got {args.k}, "
                             f"{args.samples}, {args.nprobe}")
        return checkpoint.find_checkpoint(run_dir, args.checkpoint)

    directory = decide_on_root(world, choose)
    return agree(world, lambda: _read_job(world, args, run_dir, directory))


def _read_job(world, args, run_dir: Path, directory: Path) -> _Job:
    """This rank's part of the checkpoint (not collective; ValueError naming the file)."""
    manifest = checkpoint.read_manifest(directory)
    num_classes, step = int(manifest["num_classes"]), int(manifest["step"])
    start, stop = class_range(num_classes, world.rank, world.size)
    rows_cD = None if args.random else \
        checkpoint.read_rows(directory, manifest, start, stop)["weight"]
    out = Path(args.out) if args.out else run_dir / "knn" / f"graph-step-{step:08d}.h5"
    return _Job(num_classes, step, start, stop, rows_cD, out)


def _build(world, args, job: _Job, k: int) -> tuple[LocalGraph, float]:
    """Collective (unless random): this rank's rows of the graph and its recall."""
    if job.rows_cD is None:
        return random_graph(job.start, job.stop, job.num_classes, k, args.seed), float("nan")
    graph = build_graph(world, job.rows_cD, job.start, job.num_classes, k, args.index,
                        args.nprobe, args.seed, refine=args.refine)
    recall = recall_at_k(world, job.rows_cD, job.start, job.num_classes, graph, args.samples,
                         args.seed)
    return graph, recall
