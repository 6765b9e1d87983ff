"""`python -m app.train --config FILE [--set key=value ...] [--resume] [--init-from RUN_OR_CKPT]`
under mpirun or srun.

Trains the hybrid-parallel classifier (docs/design.md) in the run directory `out_dir`. Exit codes:
0 done, 2 bad config, dataset or checkpoint, or an out_dir that cannot be used or is used by
another run (one line on stderr, nothing written), also a damaged shard row (e.g. a NaN input)
that a rank reads during training (one line naming the shard and row, all ranks stopped),
3 stopped by SIGUSR1, SIGTERM or SIGINT after writing a checkpoint (--resume continues), 1 a
failure during training (traceback tagged with the rank; all ranks are stopped), or a non-finite
loss under train.on_nonfinite (one line naming the step). What mpirun and sbatch report around
these: README "Exit codes".
"""
from __future__ import annotations

import argparse
import sys

from app.training.stop import StopRequest

# Before any other work (MPI, torch threads, the dataset): a stop signal during set-up is kept
# and honoured after the first step instead of killing the process.
STOP = StopRequest() if __name__ == "__main__" else None

from mpi.agree import SetupError, abort_on_input_error, agree, exit_on_setup_error  # noqa: E402
from mpi.world import init_world  # noqa: E402

# Stopped early by SIGUSR1/SIGTERM after writing a checkpoint (slurm/train.sbatch requeues).
EXIT_STOPPED = 3
# A failure during training, here a non-finite loss under train.on_nonfinite.
EXIT_FAILED = 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app.train", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in out_dir (any number of "
                        "ranks); starts from step 0 if there is none")
    p.add_argument("--init-from", metavar="RUN_OR_CHECKPOINT",
                   help="start a new run (step 0, fresh schedule and backbone optimizer) from "
                        "an earlier run's newest complete checkpoint (a run directory) or a "
                        "checkpoint directory, on the same dataset or a version grown from it "
                        "(--grow-from): backbone and known class rows are loaded (any number of "
                        "ranks), new classes start per model.new_rows; see README 'Continue "
                        "from an earlier run'. With --resume, a checkpoint in out_dir wins")
    return p.parse_args(argv)


def main(argv=None, stop: StopRequest | None = None) -> int:
    stop = stop or STOP or StopRequest()
    args = parse_args(argv)
    world = init_world()
    from app.config import load_config  # noqa: PLC0415 - after MPI start, keeps --help fast
    from app.runlog import init_logging  # noqa: PLC0415
    from app.training.trainer import NonFiniteLoss, Trainer  # noqa: PLC0415
    from data_prep.format import DatasetError  # noqa: PLC0415

    log = init_logging(world)
    try:
        # Every rank validates on its own, then all agree before the first collective.
        trainer = agree(world, lambda: Trainer(world, load_config(args.config, args.set),
                                               args.resume, log, args.init_from))
    except SetupError as exc:
        return _refuse(world, exc)
    try:
        try:
            trainer.open_run_dir()  # rank 0 locks out_dir until the end of the run
            trainer.restore()
        except SetupError as exc:
            return _refuse(world, exc)
        try:
            summary = trainer.run(stop)
        except DatasetError as exc:  # found by this rank alone: the others may wait in a
            abort_on_input_error(world, exc)  # collective, so MPI Abort ends them (exit 2)
        except NonFiniteLoss as exc:  # raised by every rank at the same step: orderly end
            if world.is_root:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            world.shutdown()
            return EXIT_FAILED
    finally:  # also on exit 3 and on failures (the lock would die with the process anyway)
        trainer.release()
    if "stopped_at" in summary:  # preempted: a checkpoint was written, --resume continues
        world.shutdown()
        return EXIT_STOPPED
    if world.is_root:
        print(f"final top-1 {summary['top1']:.4f} top-5 {summary['top5']:.4f} over "
              f"{summary['num_classes']} classes after {summary['steps']} steps; "
              f"run directory: {summary['run_dir']}", flush=True)
    world.shutdown()
    return 0


def _refuse(world, exc: SetupError) -> int:
    code = exit_on_setup_error(world, exc)
    world.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
