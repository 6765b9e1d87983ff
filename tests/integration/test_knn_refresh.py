"""The KNN graph refresh through the real launcher: `knn.refresh_mode=background` trains exactly
as `sync` with the same `knn.refresh_lag`, `graph_wait_s` is in every metrics line (a sync
refresh waits for its whole build, a background one for less), and a crash between a refresh's
snapshot and its swap resumes, on another number of ranks, to the uninterrupted run.
(tests/mpi/test_knn_refresh.py checks the swap step on every rank, step by step.)"""
import json
from pathlib import Path

import torch

from tests.integration.test_train import assert_traces_equal, losses, train

# Refreshes at steps 4 and 8 swapped in before steps 7 and 11; checkpoints at 5 and 10 fall
# between a snapshot and its swap.
KNN = ["softmax.mode=knn", "softmax.k=8", "softmax.random_negatives=4", "knn.refresh_every=4",
       "knn.rebuild_every=2", "knn.index=flat", "knn.refresh_lag=3",
       "model.classifier_init=random", "train.checkpoint_every=5"]


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def backbone(out: Path, step: int) -> dict:
    path = out / f"checkpoints/step-{step:08d}/trainer.pt"
    return torch.load(path, weights_only=True)["backbone"]


def test_background_refresh_equals_sync_and_resumes_between_snapshot_and_swap(vectors_dataset,
                                                                              tmp_path):
    for mode in ("sync", "background"):
        proc = train(2, vectors_dataset, tmp_path / mode, 12, 24, *KNN,
                     f"knn.refresh_mode={mode}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    sync, background = tmp_path / "sync", tmp_path / "background"
    assert_traces_equal(losses(background), losses(sync))
    a, b = backbone(sync, 12), backbone(background, 12)
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=0) for k in a)

    # Lines 5 and 9 hold the refreshes (snapshots before steps 4 and 8).
    lines = {mode: records(tmp_path / mode) for mode in ("sync", "background")}
    for mode, rs in lines.items():
        assert all("graph_wait_s" in r and r["graph_wait_s"] >= 0 for r in rs), mode
    refreshes = [r for r in lines["sync"][1:] if r["knn_build_s"] > 0]
    assert [r["step"] for r in refreshes] == [5, 9]
    assert all(r["graph_wait_s"] == r["knn_build_s"] for r in refreshes)
    built = sum(r["knn_build_s"] for r in lines["background"][1:])
    assert built > 0
    assert sum(r["graph_wait_s"] for r in lines["background"]) < built

    crash = tmp_path / "crash"
    crashed = train(2, vectors_dataset, crash, 12, 24, *KNN, "knn.refresh_mode=background",
                    "train.crash_at_step=6")
    assert crashed.returncode != 0 and "injected failure" in crashed.stderr
    state = torch.load(crash / "checkpoints/step-00000005/trainer.pt", weights_only=True)
    assert state["knn"]["pending"] == {"path": "graph-step-00000004.h5", "built_at": 4,
                                       "recall": state["knn"]["pending"]["recall"],
                                       "swap_at": 7}
    resumed = train(3, vectors_dataset, crash, 12, 16, *KNN, "knn.refresh_mode=background",
                    resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_traces_equal(losses(crash), losses(sync))
