"""The KNN graph refresh that does not stop training (`knn.refresh_mode=background`), through the
real trainer on every rank: it trains exactly as a synchronous refresh from the same snapshot
swapped at the same step; every rank swaps at the same step and no step mixes two graphs; the
loop runs steps while the build runs; a resume between snapshot and swap reproduces the
uninterrupted run.

Runs are in-process (a `Trainer` per run on every rank, as app.train makes it), float64, with a
subclass that records on each rank, per step, the step of the graph in use before and after the
step (a graph file's `step` attribute is the step whose rows it was built from) and whether a
graph build was still running when the step started.
"""
import logging
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from app.config import load_config
from app.training.trainer import Trainer
from mpi import collectives

LOG = logging.getLogger("test_knn_refresh")
STEPS, EVERY, LAG = 14, 4, 3
# Refreshes snapshot the rows at steps 4, 8, 12 and are swapped in before steps 7, 11 (15: after
# the run). A checkpoint every 5 steps falls between snapshot and swap (5: the refresh of 4 is
# pending; 10: that of 8).
SETTINGS = [f"train.steps={STEPS}", "train.batch_size=8", "train.dtype=float64",
            "train.log_every=1", "model.mlp_hidden=16", "model.embedding_dim=8",
            "optim.classifier_lr=1.0", "softmax.mode=knn", "softmax.k=6",
            "softmax.random_negatives=2", f"knn.refresh_every={EVERY}", "knn.rebuild_every=2",
            "knn.index=flat", f"knn.refresh_lag={LAG}", "model.classifier_init=random",
            "train.checkpoint_every=5"]


class Recording(Trainer):
    """The trainer, recording per step: (step, graph step before, graph step after, loss) in
    `trace`, and in `building` whether a refresh's build had not finished as the step began."""

    def __init__(self, *args):
        super().__init__(*args)
        self.trace, self.building = [], []

    def _step(self, step, lr):
        before = self.classifier.graph.step
        pending = self.graphs.pending
        self.building.append(pending is not None and not pending.job.done())
        out = super()._step(step, lr)
        self.trace.append((step, before, self.classifier.graph.step, out[0]))
        return out


@pytest.fixture(scope="module")
def root(world):
    path = None
    if world.is_root:
        from data_prep.synthetic import SyntheticParams, generate

        path = tempfile.mkdtemp(prefix="knn-refresh-")
        generate(Path(path) / "data", SyntheticParams(seed=3, dim=8, per_class=6, val_per_class=1),
                 120, progress=False)
    return Path(collectives.broadcast_object(world, path))


def train(world, root: Path, name: str, *extra: str, resume: bool = False) -> Recording:
    """One run in root/name on every rank, as app.train runs it. An exception (the injected
    crash) is raised after the run's threads and lock are released."""
    cfg = load_config(None, [f"data.path={root / 'data'}", f"out_dir={root / name}", *SETTINGS,
                             *extra])
    trainer = Recording(world, cfg, resume, LOG)
    trainer.open_run_dir()
    try:
        trainer.restore()
        trainer.run()
    except RuntimeError:
        trainer.graphs.close()  # collective: every rank crashes at the same step
        trainer.reader.close()
        trainer.val_reader.close()
        raise
    finally:
        trainer.release()
    return trainer


@pytest.fixture(scope="module")
def runs(world, root):
    return {mode: train(world, root, mode, f"knn.refresh_mode={mode}")
            for mode in ("sync", "background")}


def graph_in_use(step: int) -> int:
    """The step of the rows the graph used by step `step` was built from."""
    return max([s for s in range(EVERY, STEPS, EVERY) if s + LAG <= step], default=0)


def assert_same_training(a: Recording, b: Recording, rtol: float = 1e-6, first: int = 0) -> None:
    """The same steps, graphs and losses (from step `first` of b on) and the same weights."""
    b_trace = b.trace[first:]
    assert [t[:3] for t in a.trace] == [t[:3] for t in b_trace]
    for (step, _, _, x), (_, _, _, y) in zip(a.trace, b_trace):
        assert abs(x - y) <= rtol * abs(y), f"step {step}: loss {x} vs {y}"
    assert torch.allclose(a.classifier.weight_cD, b.classifier.weight_cD, rtol=rtol, atol=0)
    for p, q in zip(a.backbone.parameters(), b.backbone.parameters()):
        assert torch.allclose(p, q, rtol=rtol, atol=0)


def test_background_refresh_trains_as_a_sync_refresh_swapped_at_the_same_step(world, runs):
    assert_same_training(runs["background"], runs["sync"])
    # The refreshes change the graph, so a swap at another step would change the losses.
    with h5py.File(runs["sync"].run_dir / "knn/graph-step-00000000.h5") as first, \
            h5py.File(runs["sync"].run_dir / "knn/graph-step-00000004.h5") as second:
        assert not np.array_equal(first["neighbors"][:], second["neighbors"][:])


def test_every_rank_swaps_at_the_same_step_and_no_step_mixes_two_graphs(world, runs):
    for trainer in runs.values():
        trace = [t[:3] for t in trainer.trace]
        assert collectives.allgather_object(world, trace) == [trace] * world.size
        assert trace == [(s, graph_in_use(s), graph_in_use(s)) for s in range(STEPS)]


def test_background_steps_run_while_the_graph_builds(world, runs):
    # A sync build ends before its step runs; a background one overlaps the steps after the
    # snapshot (a build here takes longer than a step: collectives and an fsynced file).
    assert not any(runs["sync"].building)
    assert any(runs["background"].building)
    detail = "built beside the training loop"
    for mode, trainer in runs.items():
        with h5py.File(trainer.run_dir / "knn/graph-step-00000004.h5") as f:
            assert (detail in f.attrs["index_detail"]) == (mode == "background")


def test_resume_between_snapshot_and_swap_reproduces_the_uninterrupted_run(world, root, runs):
    with pytest.raises(RuntimeError, match="injected failure"):
        train(world, root, "crash", "knn.refresh_mode=background", "train.crash_at_step=6")
    state = torch.load(root / "crash/checkpoints/step-00000005/trainer.pt", weights_only=True)
    assert state["knn"]["built_at"] == 0
    assert state["knn"]["pending"]["built_at"] == 4 and state["knn"]["pending"]["swap_at"] == 7
    resumed = train(world, root, "crash", "knn.refresh_mode=background", resume=True)
    assert resumed.start_step == 5
    assert_same_training(resumed, runs["background"], first=5)
