"""app.bench gpu: its one-process classifier equals the project's (ShardedClassifier on one
rank). The benchmark's run end to end (on the CPU, with Horovod, faiss and mpi4py impossible to
import) is tests/unit/test_gpu_check_script.py's."""
import pytest
import torch

from app.bench.gpu_model import DeviceGraph, OneProcessClassifier, random_device_graph
from app.classifier import ShardedClassifier
from app.config import OptimConfig, SoftmaxConfig
from mpi.world import fake_world
from tests.softmax_reference import RandomGraph

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
