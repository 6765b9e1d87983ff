"""Resuming follows the checkpoint rank 0 chose, whatever the other ranks see on disk: ranks with
different views of the checkpoint directory (an injected listing per rank) all load the same
step, and a failure to load on one rank stops every rank with the same SetupError."""
import logging
import tempfile
from pathlib import Path

import pytest
import torch

from app import checkpoint
from app.config import load_config
from app.training.trainer import Trainer
from mpi import collectives
from mpi.agree import SetupError

LOG = logging.getLogger("test_resume_choice")


@pytest.fixture(scope="module")
def trained_run(world):
    """A 4-step run with checkpoints at steps 2 and 4, in a directory every rank shares."""
    root = None
    if world.is_root:
        from data_prep.synthetic import SyntheticParams, generate

        root = tempfile.mkdtemp(prefix="resume-choice-")
        generate(Path(root) / "data", SyntheticParams(seed=2, dim=8, per_class=4, val_per_class=1),
                 30, progress=False)
    root = Path(collectives.broadcast_object(world, root))
    cfg = config(root)
    Trainer(world, cfg, False, LOG).run()
    return root


def config(root: Path):
    return load_config(None, [f"data.path={root / 'data'}", f"out_dir={root / 'run'}",
                              "train.steps=4", "train.batch_size=4", "train.checkpoint_every=2",
                              "model.mlp_hidden=8", "model.embedding_dim=4", "train.log_every=1"])


def rows_of(directory: Path, trainer) -> torch.Tensor:
    manifest = checkpoint.read_manifest(directory)
    clf = trainer.classifier
    return torch.from_numpy(checkpoint.read_rows(directory, manifest, clf.start, clf.stop)["weight"])


def test_every_rank_resumes_from_the_checkpoint_rank_0_chose(world, trained_run):
    steps = checkpoint.complete_checkpoints(trained_run / "run")
    assert [p.name for p in steps] == ["step-00000002", "step-00000004"]
    # Rank 0 sees only the older checkpoint; every other rank would pick the newer one.
    seen = steps[0] if world.rank == 0 else steps[1]
    trainer = Trainer(world, config(trained_run), True, LOG)
    trainer.restore(choose=lambda run_dir: seen)
    assert trainer.start_step == 2
    assert collectives.allgather_object(world, trainer.start_step) == [2] * world.size
    assert torch.equal(trainer.classifier.weight_cD, rows_of(steps[0], trainer))


def test_no_checkpoint_on_rank_0_means_step_0_on_every_rank(world, trained_run):
    newest = checkpoint.latest_checkpoint(trained_run / "run")
    seen = None if world.rank == 0 else newest
    trainer = Trainer(world, config(trained_run), True, LOG)
    trainer.restore(choose=lambda run_dir: seen)
    assert collectives.allgather_object(world, trainer.start_step) == [0] * world.size


def test_a_load_failure_on_the_last_rank_stops_every_rank(world, trained_run):
    trainer = Trainer(world, config(trained_run), True, LOG)
    def unreadable(arrays):
        raise ValueError(f"rows of rank {world.rank} unreadable")

    if world.rank == world.size - 1:  # only this rank fails to load its rows
        trainer.classifier.load_state_arrays = unreadable
    with pytest.raises(SetupError) as caught:
        trainer.restore()
    messages = collectives.allgather_object(world, str(caught.value))
    assert messages == [f"rows of rank {world.size - 1} unreadable"] * world.size
