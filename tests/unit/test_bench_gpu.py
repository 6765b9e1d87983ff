"""app.bench gpu: its one-process classifier equals the project's (ShardedClassifier on one
rank), and the benchmark runs end to end on the CPU with Horovod, faiss, mpi4py (and yaml,
omegaconf, matplotlib) impossible to import, as on a bare GPU node."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.bench.gpu_model import DeviceGraph, OneProcessClassifier, random_device_graph
from app.classifier import ShardedClassifier
from app.config import OptimConfig, SoftmaxConfig
from mpi.world import fake_world
from tests.softmax_reference import RandomGraph

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("horovod", "faiss", "mpi4py", "yaml", "omegaconf", "matplotlib")
# Runs `python -m app.bench ARGS` with BLOCKED impossible to import, then checks none was.
WRAPPER = f"""
import importlib.abc, runpy, sys
BLOCKED = {BLOCKED!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
sys.argv = ['app.bench', *sys.argv[1:]]
try:
    runpy.run_module('app.bench', run_name='__main__')
except SystemExit as exc:
    assert not exc.code, exc.code
assert not [m for m in sys.modules if m.split('.')[0] in BLOCKED]
"""


@pytest.mark.parametrize("mode,logit,margin,margin_type",
                         [("full", "cosine", 0.2, "cosface"), ("full", "dot", 0.0, "cosface"),
                          ("knn", "cosine", 0.3, "arcface"), ("knn", "dot", 0.0, "cosface")])
def test_one_process_classifier_equals_sharded_classifier_on_one_rank(mode, logit, margin,
                                                                      margin_type):
    classes, dim, batch = 40, 6, 12
    cfg = SoftmaxConfig(mode=mode, k=5, random_negatives=4, logit=logit, margin=margin,
                        margin_type=margin_type, scale=8.0 if logit == "cosine" else 1.0)
    gen = torch.Generator().manual_seed(3)
    feat = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    project = ShardedClassifier(fake_world(), classes, dim, cfg, OptimConfig(), 7,
                                dtype=torch.float64)
    initial = project.weight_cD.clone()
    ours = OneProcessClassifier(initial.clone(), cfg, OptimConfig(), 7)
    graph = RandomGraph(classes, 5)
    project.set_graph(graph)
    ours.graph = DeviceGraph(torch.from_numpy(graph.table))
    results = []
    for clf in (project, ours):
        f = feat.clone().requires_grad_()
        loss = clf.loss(f, labels, 2)
        loss = loss[0] if isinstance(loss, tuple) else loss
        loss.backward()
        rows, grads = clf.row_grads()
        rows = torch.arange(classes) if rows is None else rows
        rows = rows - project.start if clf is project else rows
        clf.step(0.5)
        weight = clf.weight_cD if clf is project else clf.weight_CD
        results.append((loss.detach(), f.grad, rows, grads, weight.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not torch.equal(results[0][4], initial)  # the step moved rows


def test_random_device_graph_rows_start_with_the_class_and_skip_it_after():
    graph = random_device_graph(1000, 8, 0, torch.device("cpu"))
    table = graph.table_CK
    assert table.dtype == torch.int32 and table.shape == (1000, 8)
    assert torch.equal(table[:, 0], torch.arange(1000, dtype=torch.int32))
    assert int(table.min()) >= 0 and int(table.max()) < 1000
    assert not (table[:, 1:] == table[:, :1]).any()
    assert graph.rows([5, 7]).tolist() == table[[5, 7]].tolist()


def test_gpu_benchmark_runs_on_the_cpu_without_mpi_horovod_faiss(tmp_path):
    args = ["gpu", "--device", "cpu", "--classes", "2e3", "5e3", "--dim", "16", "--batch", "32",
            "--k", "8", "--random-negatives", "8", "--steps", "2", "--warmup", "1",
            "--results", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=ROOT, timeout=300,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT),
                                                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_cpu_smoke.json").read_text())
    assert result["device"] == "cpu" and "not the one-GPU measurement" in result["note"]
    assert result["command"].startswith("python -m app.bench gpu --device cpu")
    for classes in (2000, 5000):
        for mode in ("full", "knn"):
            run = result["runs"][str(classes)][mode]
            assert run["fits"] and run["samples_per_s"] > 0 and run["peak_bytes"] > 0
        knn = result["runs"][str(classes)]["knn"]
        assert knn["held_bytes"] == knn["predicted_bytes"] == classes * (2 * 4 * 16 + 4 * 8)
    assert "measured_s" in result["graph_build"]["2000"]
    assert result["capacity_estimate"]["knn"]["bytes_per_class"] == 2 * 4 * 16 + 4 * 8
