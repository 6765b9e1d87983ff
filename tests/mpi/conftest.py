"""Run this directory under `mpirun -np N python -m pytest tests/mpi`: every rank runs the same
tests in the same order; expected values are computed from rank and size.

Only rank 0 prints pytest's report; other ranks print their failures, tagged with the rank, to
stderr. A test that hangs is ended by pytest-timeout's thread method, which exits the process, so
mpirun tears the whole job down instead of leaving the other ranks waiting.
"""
import sys

import pytest

from mpi.world import init_world

_WORLD = None


def _world():
    global _WORLD  # one World per process, created lazily inside the test session
    if _WORLD is None:
        _WORLD = init_world(use_horovod=True, abort_on_error=False)
    return _WORLD


@pytest.fixture(scope="session")
def world():
    return _world()


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    rank = _world().rank
    if rank != 0:
        reporter = config.pluginmanager.getplugin("terminalreporter")
        if reporter is not None:
            config.pluginmanager.unregister(reporter)


def pytest_runtest_logreport(report):
    if _WORLD is not None and _WORLD.rank != 0 and report.failed:
        sys.stderr.write(f"[rank {_WORLD.rank}] FAILED {report.nodeid}\n{report.longreprtext}\n")


def pytest_sessionfinish(session, exitstatus):
    if _WORLD is not None:
        _WORLD.shutdown()


def pytest_report_header(config):
    world = _world()
    return (f"MPI tests on {world.size} ranks (this is rank {world.rank}), "
            f"{world.threads} torch threads per rank, Horovod {'on' if world.hvd else 'off'}")
