"""The overlapping step pipeline (`comm.overlap: true`, app/training/pipeline.py) through the real
trainer on every rank: it trains exactly as the blocking step (the same losses and weights after
the same steps, relative 1e-6, float64) in every softmax mode, with dense (Horovod's hooks) and
sparse (our hooks) backbone gradients, with micro-batches of unequal sizes, and with a ResNet
whose synchronized batch norm sees the whole batch either way; its timers are present and sane.

Runs are in-process (a `Trainer` per run on every rank, as app.train makes it) with a subclass
that records each step's loss.
"""
import json
import logging
import tempfile
from pathlib import Path

import pytest
import torch

from app.config import load_config
from app.training.trainer import Trainer
from mpi import collectives

LOG = logging.getLogger("test_overlap")
STEPS = 4
SETTINGS = [f"train.steps={STEPS}", "train.batch_size=6", "train.dtype=float64",
            "train.log_every=1", "model.mlp_hidden=16", "model.embedding_dim=8",
            "optim.classifier_lr=1.0", "schedule.warmup_steps=0", "train.eval_max_samples=8"]
KNN = ["softmax.mode=knn", "softmax.k=6", "softmax.random_negatives=2", "knn.index=flat",
       "knn.refresh_every=2"]
SPARSE = ["comm.gradients=sparse", "comm.dense_below=64", "comm.sparse_ratio=0.1"]
IMAGES = ["model.backbone=resnet", "model.resnet_blocks=[1]", "model.resnet_width=4"]
CASES = {
    "full-dense": [],
    "sampled-dense": ["softmax.mode=sampled", "softmax.sample_rate=0.4",
                      "softmax.margin=0.2", "softmax.margin_type=arcface"],
    "knn-dense": KNN,
    "full-sparse": SPARSE,
    "knn-sparse": KNN + SPARSE + ["comm.momentum_correction=true"],
    "resnet-sampled-sparse": IMAGES + SPARSE + ["softmax.mode=sampled"],
}


class Recording(Trainer):
    """The trainer, recording each step's loss in `losses`."""

    def __init__(self, *args):
        super().__init__(*args)
        self.losses = []

    def _step(self, step, lr):
        out = super()._step(step, lr)
        self.losses.append(out[0])
        return out


@pytest.fixture(scope="module")
def root(world):
    path = None
    if world.is_root:
        from data_prep.synthetic import SyntheticParams, generate

        path = tempfile.mkdtemp(prefix="overlap-")
        generate(Path(path) / "vectors", SyntheticParams(seed=3, dim=8, per_class=6,
                                                         val_per_class=1), 60, progress=False)
        generate(Path(path) / "images", SyntheticParams(seed=3, dim=8, kind="images",
                                                        per_class=6, val_per_class=1,
                                                        image_size=8), 30, progress=False)
    return Path(collectives.broadcast_object(world, path))


def train(world, root: Path, name: str, extra: list[str]) -> Recording:
    data = root / ("images" if "model.backbone=resnet" in extra else "vectors")
    cfg = load_config(None, [f"data.path={data}", f"out_dir={root / name}", *SETTINGS, *extra])
    trainer = Recording(world, cfg, False, LOG)
    trainer.open_run_dir()
    try:
        trainer.restore()
        trainer.run()
    finally:
        trainer.release()
    return trainer


def metrics(trainer: Trainer) -> list[dict]:
    return [json.loads(line) for line in
            (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, world, root):
    """(blocking run, overlapped run) of one case; 4 micro-batches of a 6-sample batch (sizes
    1, 2, 1, 2)."""
    case = request.param
    off = train(world, root, f"{case}-off", CASES[case])
    on = train(world, root, f"{case}-on", CASES[case] + ["comm.overlap=true",
                                                          "comm.micro_batches=4"])
    return off, on


def test_overlap_trains_as_the_blocking_step(world, pair):
    off, on = pair
    assert len(off.losses) == len(on.losses) == STEPS
    for step, (x, y) in enumerate(zip(on.losses, off.losses)):
        assert abs(x - y) <= 1e-6 * abs(y), f"step {step}: loss {x} with overlap, {y} without"
    assert torch.allclose(on.classifier.weight_cD, off.classifier.weight_cD, rtol=1e-6,
                          atol=1e-12)
    for p, q in zip(on.backbone.parameters(), off.backbone.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-12)
    for b, c in zip(on.backbone.buffers(), off.backbone.buffers()):  # batch-norm statistics
        assert torch.allclose(b.double(), c.double(), rtol=1e-6, atol=1e-12)
    # The weights moved: the comparison is not between two untouched models.
    assert not torch.equal(on.classifier.weight_cD, on.classifier.optimizer.momentum_cD * 0)


def test_timers_are_present_and_sane(world, pair):
    off, on = pair
    for trainer, overlapped in ((off, False), (on, True)):
        lines = metrics(trainer)
        assert len(lines) == STEPS
        for line in lines:
            comm, exposed, compute = (line["comm_time_s"], line["exposed_comm_s"],
                                      line["compute_s"])
            assert comm >= 0 and exposed >= 0 and compute >= 0, line
            assert exposed <= comm + 1e-9, line
            assert compute <= line["step_time_s"] + 1e-9, line
            if world.size > 1:
                assert comm > 0, line
            if not overlapped:  # everything blocks: all of it is exposed
                assert exposed == pytest.approx(comm, rel=1e-9, abs=1e-9), line
            assert line.get("micro_batches") == (4 if overlapped else None)
