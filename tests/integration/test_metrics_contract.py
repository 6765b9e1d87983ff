"""The contract fields of metrics.jsonl (docs/design.md, "Run directory") with values checked
against what they must be, and determinism: the same seed and number of ranks give an identical
loss trace on the CPU."""
import json
from pathlib import Path

import pytest
import torch

from app.backbones import build_backbone
from app.config import load_config
from app.training.schedule import LRSchedule
from app.bench import comm_model
from mpi.world import Traffic
from tests.integration.test_train import train

FIELDS = ("step", "epoch", "loss", "lr", "samples_per_s", "step_time_s", "comm_time_s",
          "exposed_comm_s", "compute_s", "bytes_sent", "grad_bytes_sent", "bytes_by_kind", "peak_rss_mb", "graph_wait_s")
RUN = ["train.dtype=float32", "train.log_every=2", "softmax.mode=sampled",
       "softmax.sample_rate=0.5"]


@pytest.fixture(scope="module")
def two_runs(vectors_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    for name in ("a", "b"):
        # 60 classes x 16 samples, global batch 48: 20 steps cross an epoch boundary.
        proc = train(2, vectors_dataset, root / name, 20, 24, *RUN)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_same_seed_and_ranks_give_an_identical_loss_trace(two_runs):
    a, b = records(two_runs / "a"), records(two_runs / "b")
    assert [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b]


def test_metrics_lines_hold_the_contract_fields_with_their_values(two_runs, vectors_dataset):
    run_dir = two_runs / "a"
    cfg = load_config(str(run_dir / "config.yaml"), [])
    lines = records(run_dir)
    assert [r["step"] for r in lines] == list(range(2, 21, 2))
    schedule = LRSchedule(cfg.optim.lr, cfg.schedule, cfg.train.steps)
    backbone = build_backbone(cfg.model, (16,))
    grad_bytes = sum(p.numel() * 4 for p in backbone.parameters())
    bn_channels = [m.num_features for m in backbone.modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for r in lines:
        assert all(key in r for key in FIELDS), sorted(set(FIELDS) - set(r))
        # The lr of the window's last step; an epoch is 960 / 48 = 20 steps.
        assert r["lr"] == pytest.approx(schedule(r["step"] - 1), rel=1e-12)
        assert r["epoch"] == r["step"] // 20
        # Ring allreduce of the float32 backbone gradients on 2 ranks: 2 (P-1)/P of them,
        # counted by data_parallel.step for each Horovod step (sparse: test_sparse_training.py).
        assert r["grad_bytes_sent"] == grad_bytes
        # Plus at least this rank's features (24 x D float32) and labels sent each step.
        assert r["bytes_sent"] >= grad_bytes + 24 * (cfg.model.embedding_dim * 4 + 8)
        by_kind, dim = r["bytes_by_kind"], cfg.model.embedding_dim
        # The kinds split bytes_sent (each a mean per step rounded down).
        assert set(by_kind) <= set(Traffic.KINDS), by_kind
        assert 0 <= r["bytes_sent"] - sum(by_kind.values()) < len(by_kind), r
        assert by_kind[Traffic.GRADIENTS] == r["grad_bytes_sent"]
        # 2 ranks, 24 samples each: this rank's features and int64 labels go to the other
        # (allgather), half of the 48 x D feature gradients come back (reduce-scatter), and
        # the softmax's row max (48 float32) and row sums (48 x 2) are allreduced.
        assert by_kind[Traffic.FEATURES] == 24 * dim * 4
        assert by_kind[Traffic.LABELS] == 24 * 8
        assert by_kind[Traffic.FEATURE_GRADIENTS] == 48 * dim * 4 // 2
        assert by_kind[Traffic.LOGITS] == 2 * (48 * 4 + 48 * 2 * 4) // 2
        # The synchronized batch norm: per layer of C channels an allgather of 1 + 2 C floats
        # and a ring allreduce of 2 C (the alpha-beta model of app.bench comm assumes the same).
        assert by_kind[Traffic.BATCHNORM] == comm_model.batchnorm_s(
            comm_model.Network(0.0, 1.0), 2, bn_channels)
        assert r["samples_per_s"] > 0 and r["step_time_s"] > 0 and r["comm_time_s"] >= 0
        # Without comm.overlap every exchange blocks: all of it is exposed (tests/mpi/
        # test_overlap.py checks the overlapped timers).
        assert r["exposed_comm_s"] == pytest.approx(r["comm_time_s"], rel=1e-9, abs=1e-12)
        assert 0 <= r["compute_s"] <= r["step_time_s"]
        assert 10 < r["peak_rss_mb"] < 24 * 1024
        assert r["graph_wait_s"] == 0  # no KNN graph in sampled mode (knn: test_knn_refresh.py)
        assert torch.isfinite(torch.tensor(r["loss"]))
