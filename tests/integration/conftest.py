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


# -- image folders and a local Slurm cluster (data_prep.build_shards, slurm/) ----------------------
IMAGE_CLASSES, IMAGES_PER_CLASS, IMAGE_SIZE = 4, 10, 16
BAD_IMAGES = {"class0/corrupt.jpg": "cannot be decoded", "class1/empty.jpg": "empty file",
              "class2/notes.jpg": "not an image"}


def class_colour(class_id):
    """The mean RGB colour of class `class_id`'s generated images (far apart between classes)."""
    return [(60 + 150 * ((class_id >> bit) & 1)) for bit in range(3)]


def make_image_folder(root, classes=IMAGE_CLASSES, per_class=IMAGES_PER_CLASS, seed=0):
    """root/classK/NN.{jpg,png}: class colour + noise, sizes that differ in aspect; plus the
    three BAD_IMAGES (a truncated JPEG, a zero-byte file, a text file named .jpg)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            h, w = 20 + 2 * i, 28 - i
            pixels = np.asarray(class_colour(c)) + rng.integers(-25, 26, (h, w, 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            image.save(root / f"class{c}/{i:02d}.{'jpg' if i % 2 else 'png'}")
    good_jpeg = (root / "class0/01.jpg").read_bytes()
    (root / "class0/corrupt.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (root / "class1/empty.jpg").write_bytes(b"")
    (root / "class2/notes.jpg").write_text("not an image\n")
    return root


def build_shards_cmd(input_, out, *extra, image_size=IMAGE_SIZE, shard_size=8):
    return ["-m", "data_prep.build_shards", "--input", str(input_), "--out", str(out),
            "--image-size", str(image_size), "--shard-size", str(shard_size), *map(str, extra)]


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images") / "folder")


@pytest.fixture(scope="session")
def image_dataset(image_folder, tmp_path_factory):
    """image_folder converted by one uninterrupted single-process build_shards run; the
    reference that interrupted and parallel builds must reproduce."""
    out = tmp_path_factory.mktemp("images") / "dataset"
    proc = run([sys.executable, *build_shards_cmd(image_folder, out)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


class LocalSlurm:
    """A running local cluster (scripts/local_slurm.sh): `env` holds SLURM_CONF for its commands."""

    def __init__(self, directory):
        import os

        self.dir = directory
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env["SLURM_CONF"] = str(directory / "slurm.conf")

    def __call__(self, *cmd, timeout=60, env=None):
        """Runs a Slurm command (sbatch, squeue, ...) against this cluster, from the repo root;
        `env` adds variables (sbatch passes them on to the job)."""
        import subprocess

        from tests.integration.launch import REPO

        return subprocess.run(list(cmd), cwd=REPO, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node Slurm cluster for the session, started and stopped by
    scripts/local_slurm.sh in a temporary directory."""
    import os
    import shutil
    import subprocess

    from tests.integration.launch import REPO

    if shutil.which("slurmctld") is None or shutil.which("slurmd") is None:
        why = ("slurmctld/slurmd not installed (Debian packages slurmctld slurmd "
               "slurm-client slurm-wlm-basic-plugins; run 'make setup')")
        if os.environ.get("CI"):  # `make setup` installs them: in CI a skip would hide a gap
            pytest.fail(why)
        pytest.skip(why)
    directory = tmp_path_factory.mktemp("slurm")
    script = str(REPO / "scripts/local_slurm.sh")
    start = subprocess.run(["bash", script, "start", str(directory)], capture_output=True,
                           text=True, timeout=120, env=dict(os.environ, PYTHON=sys.executable))
    assert start.returncode == 0, f"local Slurm did not start:\n{start.stdout}\n{start.stderr}"
    try:
        yield LocalSlurm(directory)
    finally:
        subprocess.run(["bash", script, "stop", str(directory)], capture_output=True, timeout=120)
