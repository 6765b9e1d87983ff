"""app/bench/: the command line reaches every part, results are written with their command, and
the KNN targets are judged right."""
import json
import subprocess
import sys

import pytest

from app.bench import knn
from app.bench.results import bench_command, load_result, write_result


def help_text(*module_and_args: str) -> str:
    return subprocess.run([sys.executable, "-m", *module_and_args, "--help"],
                          capture_output=True, text=True, check=True, timeout=120).stdout


def test_graph_subcommand_takes_its_own_options():
    out = help_text("app.bench", "graph")
    assert "--classes" in out and "--settings" in out and "refresh" in out


@pytest.mark.parametrize("subcommand", ["", "step", "accuracy", "knn", "comm"])
def test_help_of_the_command_and_each_subcommand(subcommand):
    out = help_text("app.bench", *filter(None, [subcommand]))
    assert out.startswith("usage: python -m app.bench")
    if subcommand:
        assert "--results" in out
    else:
        assert all(s in out for s in ("step", "accuracy", "graph", "knn"))


@pytest.mark.parametrize("module", ["app.bench.graph", "app.bench.step"])
def test_help_of_the_programs_run_under_mpirun(module):
    assert "--classes" in help_text(module)


def test_write_result_records_the_command_and_draws_the_png(tmp_path):
    def plot(plt, result):
        fig, ax = plt.subplots()
        ax.plot(result["xs"], result["ys"])
        return fig

    argv = ["step", "--classes", "10", "--name", "a b"]
    path = write_result(tmp_path / "out", "demo", bench_command(argv), {"xs": [1, 2],
                                                                         "ys": [3, 4]}, plot)
    assert path == tmp_path / "out" / "demo.json"
    result = json.loads(path.read_text())
    assert list(result)[:2] == ["command", "date"]
    assert result["command"] == "python -m app.bench step --classes 10 --name 'a b'"
    assert result["xs"] == [1, 2] and load_result(tmp_path / "out", "demo") == result
    assert (tmp_path / "out" / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["demo.json", "demo.png"]
    assert load_result(tmp_path / "out", "missing") is None


def accuracy(**top1):
    configs = {"full": ["softmax.mode=full"],
               "sampled": ["softmax.mode=sampled", "softmax.sample_rate=0.00256"],
               "knn": ["softmax.mode=knn", "softmax.k=128", "softmax.random_negatives=128"],
               "knn_big": ["softmax.mode=knn", "softmax.k=512", "softmax.random_negatives=64"]}
    return {"command": "python -m app.bench accuracy", "results": [
        {"config": configs[name], "top1": value} for name, value in top1.items()]}


def test_knn_accuracy_targets_compare_within_one_result_and_cap_active_classes():
    # knn_big has 576 active classes (> 512): it does not count, however good.
    targets = knn.knn_targets({"a": accuracy(full=0.30, sampled=0.01, knn=0.295,
                                             knn_big=0.9)}, None, None)
    assert [t["met"] for t in targets] == [True, True]
    assert "0.2950" in targets[0]["measured"]
    assert targets[0]["target"] == "a: knn top-1 within 1 point of full or above"
    assert targets[1]["target"] == "a: knn far above sampled (at least 2x its top-1)"
    targets = knn.knn_targets({"a": accuracy(full=0.30, sampled=0.2, knn=0.28)}, None, None)
    assert [t["met"] for t in targets] == [False, False]


def test_step_and_graph_targets():
    step = {"command": "s", "summary": {"ratios": {"knn_over_full_C1000000": 19.9,
                                                   "knn_C10000000_over_C100000": 0.8}}}
    graph = {"command": "g", "target": {"seconds": 90.0, "recall_at_k": 0.9, "met": True},
             "runs": [{"classes": 1_000_000, "setting": "auto", "seconds": 80.0,
                       "cpu_seconds": 79.0, "recall_at_k": 0.91}]}
    targets = knn.knn_targets({}, step, graph)
    assert [t["met"] for t in targets] == [False, True, True]
    assert [t["target"] for t in targets] == [
        "knn samples/s >= 20x full at C = 1M", "knn at C = 10M >= 0.8x its speed at C = 100k",
        "graph build at C = 1M <= 90 s with recall_at_k >= 0.9"]


def test_knn_parts_run_with_their_arguments_and_the_results_folder(tmp_path):
    seen = []
    assert knn._run_parts(["step", "accuracy"], 2, tmp_path, lambda a: seen.append(a) or 0) == 0
    assert seen == [knn.KNN_PARTS["step"] + ["--results", str(tmp_path)],
                    knn.KNN_PARTS["accuracy"] + ["--results", str(tmp_path)]]
    seen.clear()
    assert knn._run_parts(["step"], 2, knn.RESULTS, lambda a: seen.append(a) or 3) == 3
    assert seen == [knn.KNN_PARTS["step"]]  # the default folder: the command as measured
