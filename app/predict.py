"""`python -m app.predict --model MODEL_DIR --input PATH --top-k K --out FILE`: the K most likely
classes (key, id, score) of every input, from a model directory written by `python -m
app.export`.

Input: a folder of images, a .csv/.tsv manifest of image paths, a dataset directory (our HDF5
format; --split) or a .npy/.h5 file of inputs (app/inference/inputs.py). Output: JSON lines or
TSV, one line per input and rank (app/inference/output.py). `--search exact` scores every class
(the reference); `--search index` scans the IVF lists of the exported index (its recall against
exact is in the model's manifest). One process, or under mpirun/srun: the classes are split
over the ranks by class range (exact) or by index file (index), the inputs by batch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app.predict", description=__doc__.split(
        "\n\n")[0] + " Exit codes: 0 done (unreadable images skipped and reported), 2 bad "
        "model directory, input or output (one error line naming the file).")
    p.add_argument("--model", required=True, type=Path, help="model directory (app.export)")
    p.add_argument("--input", required=True, type=Path,
                   help="image folder, .csv/.tsv manifest, dataset directory or .npy/.h5 file")
    p.add_argument("--out", required=True, type=Path, help="predictions file to write")
    p.add_argument("--top-k", type=int, default=5, help="classes per input (default: 5)")
    p.add_argument("--search", choices=["exact", "index"], default="index",
                   help="index (default; the exported IVF index) or exact (every class)")
    p.add_argument("--nprobe", type=int, default=0,
                   help="IVF lists scanned per query, or HNSW efSearch (default 0: the "
                        "manifest's)")
    p.add_argument("--format", choices=["jsonl", "tsv"],
                   help="output format (default: tsv for a .tsv --out, else JSON lines)")
    p.add_argument("--split", default="val", choices=["train", "val"],
                   help="split of a dataset directory --input (default: val)")
    p.add_argument("--batch-size", type=int, default=256, help="inputs per rank and batch")
    p.add_argument("--verify", action="store_true",
                   help="check the sha256 of every model file, the large ones too")
    args = p.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1 or args.nprobe < 0:
        p.error("--top-k and --batch-size must be >= 1, --nprobe >= 0")
    return args


def _setup(world, args):
    """(model, inputs, writer): rank 0 checks the model directory, every rank loads its part;
    any failure is one SetupError on every rank."""
    from app.inference import inputs, model_dir, output  # noqa: PLC0415
    from app.inference.predictor import load_model  # noqa: PLC0415
    from mpi.agree import agree, decide_on_root  # noqa: PLC0415

    def check():
        manifest = model_dir.read_manifest(args.model)
        model_dir.check_files(args.model, manifest, args.verify)
        if args.out.resolve() == args.input.resolve():
            raise ValueError(f"{args.out}: is the --input; pass another --out")
        return manifest

    manifest = decide_on_root(world, check)
    model = agree(world, lambda: load_model(world, args.model, manifest, args.search,
                                            args.nprobe))
    source = agree(world, lambda: inputs.open_inputs(args.input, manifest, args.split))
    writer = agree(world, lambda: output.PredictionWriter(
        args.out, output.output_format(args.out, args.format),
        model_dir.read_keys(args.model, manifest["num_classes"])) if world.is_root else None)
    return model, source, writer


def main(argv=None) -> int:
    args = parse_args(argv)
    from app.inference.predictor import predict  # noqa: PLC0415 - after parsing
    from app.runlog import init_logging, progress_bar  # noqa: PLC0415
    from mpi.agree import SetupError, exit_on_setup_error  # noqa: PLC0415
    from mpi.world import init_world  # noqa: PLC0415

    world = init_world(use_horovod=False)
    log = init_logging(world)
    try:
        model, source, writer = _setup(world, args)
    except SetupError as exc:
        return exit_on_setup_error(world, exc)
    log.info("%d inputs, %d classes, %s search on %d rank(s)", len(source.names),
             model.manifest["num_classes"], args.search, world.size)
    bar = progress_bar(world, len(source.names), 0, "predict", unit="input")
    try:
        done, skipped = predict(world, model, source, args.top_k, args.batch_size, writer,
                                bar, log)
    except SetupError as exc:  # an input that does not fit, found while reading it
        bar.close()
        if writer is not None:
            writer.abandon()
        return exit_on_setup_error(world, exc)
    bar.close()
    if world.is_root:
        writer.close()
        log.info("predicted %d inputs (top %d) to %s; skipped %d unreadable", done, args.top_k,
                 args.out, len(skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
