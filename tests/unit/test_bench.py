"""app/bench.py: the command line reaches every part, and the KNN targets are judged right."""
import subprocess
import sys

from app import bench


def test_graph_subcommand_takes_its_own_options():
    out = subprocess.run([sys.executable, "-m", "app.bench", "graph", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--classes" in out and "--settings" in out and "refresh" in out


def accuracy(**top1):
    configs = {"full": ["softmax.mode=full"],
               "sampled": ["softmax.mode=sampled", "softmax.sample_rate=0.00256"],
               "knn": ["softmax.mode=knn", "softmax.k=128", "softmax.random_negatives=128"],
               "knn_big": ["softmax.mode=knn", "softmax.k=512", "softmax.random_negatives=64"]}
    return {"command": "python -m app.bench accuracy", "results": [
        {"config": configs[name], "top1": value} for name, value in top1.items()]}


def test_knn_accuracy_targets_compare_within_one_result_and_cap_active_classes():
    # knn_big has 576 active classes (> 512): it does not count, however good.
    targets = bench.knn_targets({"a": accuracy(full=0.30, sampled=0.01, knn=0.295,
                                               knn_big=0.9)}, None, None)
    assert [t["met"] for t in targets] == [True, True]
    assert "0.2950" in targets[0]["measured"]
    targets = bench.knn_targets({"a": accuracy(full=0.30, sampled=0.2, knn=0.28)}, None, None)
    assert [t["met"] for t in targets] == [False, False]


def test_step_and_graph_targets():
    step = {"command": "s", "summary": {"ratios": {"knn_over_full_C1000000": 19.9,
                                                   "knn_C10000000_over_C100000": 0.8}}}
    graph = {"command": "g", "target": {"seconds": 90.0, "recall_at_k": 0.9, "met": True},
             "runs": [{"classes": 1_000_000, "setting": "auto", "seconds": 80.0,
                       "cpu_seconds": 79.0, "recall_at_k": 0.91}]}
    targets = bench.knn_targets({}, step, graph)
    assert [t["met"] for t in targets] == [False, True, True]
