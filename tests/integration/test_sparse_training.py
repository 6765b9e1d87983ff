"""Training with the sparse backbone-gradient exchange (comm.gradients=sparse) through the real
launcher on 2 ranks: it learns, sends a fraction of the dense bytes, and a crash and resume
reproduces the uninterrupted run, residuals included; on 3 ranks the residuals are regrouped."""
import json
from pathlib import Path

import pytest
import torch

from app.backbones import build_backbone
from app.config import load_config

from tests.integration.test_train import (assert_traces_equal, final_backbone_and_optimizer,
                                          losses, train)

# The MLP's 16 x 32 and 32 x 16 weights go sparse at 5% (after 4 warm-up steps), its biases and
# norm parameters dense.
SPARSE = ["comm.gradients=sparse", "comm.sparse_ratio=0.05", "comm.dense_below=64",
          "comm.sparse_warmup_steps=4"]
VARIANTS = {"residuals": SPARSE, "momentum_correction": SPARSE + ["comm.momentum_correction=true"]}


def metrics(out):
    return [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]


def residuals(out, step):
    directory = Path(out, f"checkpoints/step-{step:08d}")
    manifest = json.loads((directory / "manifest.json").read_text())
    return [torch.load(directory / name, weights_only=True) for name in manifest["rank_states"]]


def assert_states_equal(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        if isinstance(a[key], dict):
            assert_states_equal(a[key], b[key])
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sparse_training_learns_and_resumes_exactly(vectors_dataset, tmp_path, variant):
    extra = VARIANTS[variant]
    whole = train(2, vectors_dataset, tmp_path / "whole", 16, 24, *extra)
    assert whole.returncode == 0, whole.stderr[-3000:]
    trace = losses(tmp_path / "whole")
    assert trace[-1][1] < 0.9 * trace[0][1], f"the loss did not go down: {trace}"
    # Dense on 2 ranks: the ring allreduce sends all float64 backbone gradients once.
    cfg = load_config(str(tmp_path / "whole/config.yaml"), [])
    dense_bytes = sum(p.numel() * 8 for p in build_backbone(cfg.model, (16,)).parameters())
    for record in metrics(tmp_path / "whole")[4:]:  # after the warm-up
        assert 0 < record["grad_bytes_sent"] < dense_bytes / 4, (record, dense_bytes)
        assert record["bytes_sent"] > record["grad_bytes_sent"]
        by_kind = record["bytes_by_kind"]
        assert by_kind["backbone_gradients"] == record["grad_bytes_sent"]
        assert 0 <= record["bytes_sent"] - sum(by_kind.values()) < len(by_kind), record
    crashed = train(2, vectors_dataset, tmp_path / "crash", 16, 24, "train.checkpoint_every=8",
                    "train.crash_at_step=11", *extra)
    assert crashed.returncode != 0 and "injected failure" in crashed.stderr
    resumed = train(2, vectors_dataset, tmp_path / "crash", 16, 24, "train.checkpoint_every=8",
                    *extra, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_traces_equal(losses(tmp_path / "crash"), trace, rtol=1e-12)
    a, b = (final_backbone_and_optimizer(tmp_path / d, 16) for d in ("whole", "crash"))
    assert_states_equal(a, b)
    saved_whole, saved_crash = residuals(tmp_path / "whole", 16), residuals(tmp_path / "crash", 16)
    assert len(saved_whole) == 2
    for x, y in zip(saved_whole, saved_crash):
        assert_states_equal(x, y)
    assert any(t.any() for t in saved_whole[0]["residual"].values())


def test_sparse_checkpoint_resumes_on_three_ranks_with_regrouped_residuals(vectors_dataset,
                                                                          tmp_path):
    part = train(2, vectors_dataset, tmp_path / "part", 12, 24, "train.checkpoint_every=6",
                 "train.crash_at_step=6", *SPARSE)
    assert part.returncode != 0 and (tmp_path / "part/checkpoints/step-00000006").is_dir()
    more = train(3, vectors_dataset, tmp_path / "part", 12, 16, "train.checkpoint_every=6",
                 *SPARSE, resume=True)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "sparse-gradient residuals of 2 ranks regrouped onto 3" in more.stderr
    before = residuals(tmp_path / "part", 6)
    assert len(before) == 2 and len(residuals(tmp_path / "part", 12)) == 3
