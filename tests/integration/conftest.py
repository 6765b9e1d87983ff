"""Integration fixtures: small real datasets generated once per session."""
import pytest

from tests.integration.launch import run

import sys


def make_dataset(out, classes=60, per_class=16, val_per_class=4, dim=16, kind="vectors", seed=0):
    cmd = [sys.executable, "-m", "data_prep.synthetic", "--out", str(out), "--num-classes",
           str(classes), "--per-class", str(per_class), "--val-per-class", str(val_per_class),
           "--dim", str(dim), "--kind", kind, "--seed", str(seed)]
    proc = run(cmd, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def vectors_dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "vectors60")


@pytest.fixture(scope="session")
def other_dataset(tmp_path_factory):
    """Same shapes, a different number of classes (for the resume-mismatch test)."""
    return make_dataset(tmp_path_factory.mktemp("data") / "vectors70", classes=70)
