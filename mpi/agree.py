"""Ranks that agree before they communicate: a set-up failure on one rank, or a choice that
depends on what one rank sees on disk, must not send the ranks down different paths (one rank
exits while the others wait forever in a collective).

- `agree(world, build)`: every rank runs its own set-up; a ValueError on any rank becomes the
  same `SetupError` on every rank (the message of the lowest failing rank).
- `decide_on_root(world, decide)`: rank 0 makes a choice (which checkpoint to resume from,
  whether a graph file is usable) and every rank follows it.
- `exit_on_setup_error(world, error)`: what an entry point does with a SetupError: one
  `error:` line on rank 0's stderr and exit code 2 on every rank.
- `abort_on_input_error(world, error)`: bad input that one rank finds on its own after set-up
  (a damaged shard row it reads mid-run): the one line from that rank, then the whole job ends
  with exit code 2 (MPI Abort: the other ranks may already wait in a collective).
"""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

from mpi.collectives import broadcast_object, first_error

T = TypeVar("T")

EXIT_SETUP_ERROR = 2


class SetupError(ValueError):
    """A set-up failure every rank agreed on; its message is one line naming the file or key."""


def agree(world, build: Callable[[], T]) -> T:
    """Collective: `build()` on every rank (it must not communicate), then one agreement on
    whether any rank failed. Returns this rank's result or raises SetupError on every rank."""
    result, error = None, None
    try:
        result = build()
    except ValueError as exc:  # includes data_prep's DatasetError and SetupError
        error = str(exc)
    error = first_error(world, error)
    if error:
        raise SetupError(error)
    return result


def decide_on_root(world, decide: Callable[[], T]) -> T:
    """Collective: `decide()` runs on rank 0 only and its result (picklable) is broadcast; a
    ValueError there becomes SetupError on every rank. For choices that gate collectives: ranks
    that see a shared file system differently (a checkpoint written a moment ago, a graph file
    deleted by hand) still take the same path."""
    result, error = None, None
    if world.is_root:
        try:
            result = decide()
        except ValueError as exc:
            error = str(exc)
    result, error = broadcast_object(world, (result, error))
    if error:
        raise SetupError(error)
    return result


def exit_on_setup_error(world, error: Exception) -> int:
    """Rank 0 prints the one-line error; every rank returns the set-up exit code (2)."""
    if world.is_root:
        print(f"error: {error}", file=sys.stderr, flush=True)
    return EXIT_SETUP_ERROR


def abort_on_input_error(world, error: Exception) -> None:
    """Bad input found by this rank alone while the job runs (e.g. a non-finite value in the
    shard rows it just read), when the other ranks may already wait in a collective and no
    agreement is possible: one `error:` line on this rank's stderr, then MPI Abort ends every
    rank with the set-up exit code (2), which mpirun and srun return. Never returns."""
    # The leading newline ends a progress line rank 0 may have left open on the same output.
    print(f"\nerror: {error}", file=sys.stderr, flush=True)
    world.abort(EXIT_SETUP_ERROR)
