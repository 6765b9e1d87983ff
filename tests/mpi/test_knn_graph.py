"""The distributed KNN graph under mpirun -np 2|3|4: every rank generates the full W from a seed,
keeps its own rows, and the ring-built graph must equal a one-process exact graph of the full W.
"""
import numpy as np
import pytest
import torch

from app import knn_graph
from data_prep.clustered_rows import clustered_weights
from mpi import collectives
from mpi.partition import class_range
from tests.unit.test_knn_graph import assert_same_graph, exact_graph


def full_weight(num_classes: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((num_classes, dim))


def uneven_range(num_classes: int, rank: int, size: int) -> tuple[int, int]:
    """Rank r holds a share growing with r (rank 0 gets the smallest, maybe none)."""
    cuts = [num_classes * r * (r + 1) // (size * (size + 1)) for r in range(size + 1)]
    return cuts[rank], cuts[rank + 1]


def gather_rows(world, graph) -> np.ndarray:
    """The whole (C, K) graph, from every rank's rows."""
    return collectives.allgather(world, torch.from_numpy(graph.neighbors_ck)).numpy()


@pytest.mark.parametrize("split", ["balanced", "uneven"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_distributed_flat_graph_equals_exact(world, split, chunk, monkeypatch):
    if chunk:  # several ring rounds, ranks with different numbers of chunks
        monkeypatch.setattr(knn_graph, "CHUNK_ROWS", chunk)
    num_classes, k = 203, 8
    weight = full_weight(num_classes, 10, seed=11)
    part = class_range if split == "balanced" else uneven_range
    start, stop = part(num_classes, world.rank, world.size)
    before = world.traffic.bytes_sent
    graph = knn_graph.build_graph(world, weight[start:stop], start, num_classes, k, index="flat")
    assert (graph.start, graph.stop) == (start, stop)
    ref_ids, ref_sim = exact_graph(weight, k)
    assert_same_graph(graph.neighbors_ck, ref_ids[start:stop], ref_sim[start:stop])
    np.testing.assert_allclose(graph.similarity_ck[:, 1:], ref_sim[start:stop], atol=1e-5)
    # The ring moved rows and partial top-K between ranks, and said so.
    assert world.traffic.bytes_sent > before
    recall = knn_graph.recall_at_k(world, weight[start:stop], start, num_classes, graph,
                                   num_samples=150, seed=3)
    assert recall == 1.0


def test_fewer_classes_than_ranks(world):
    # C < P: some ranks own no class; K > C is clamped to C.
    num_classes = max(1, world.size - 1)
    weight = full_weight(num_classes, 4, seed=12)
    start, stop = class_range(num_classes, world.rank, world.size)
    graph = knn_graph.build_graph(world, weight[start:stop], start, num_classes, 5, index="flat")
    assert graph.neighbors_ck.shape == (stop - start, num_classes)
    ref_ids, ref_sim = exact_graph(weight, num_classes)
    assert_same_graph(graph.neighbors_ck, ref_ids[start:stop], ref_sim[start:stop])
    recall = knn_graph.recall_at_k(world, weight[start:stop], start, num_classes, graph)
    assert recall == 1.0


@pytest.mark.parametrize("index", ["ivf", "auto"])
def test_approximate_graph_on_clustered_weights(world, index, monkeypatch):
    # Families straddle ranks; `auto` takes its large-C path (IVF + refinement on the ring).
    monkeypatch.setattr(knn_graph, "FLAT_MAX_CLASSES", 100)
    num_classes = 3000
    start, stop = uneven_range(num_classes, world.rank, world.size)
    weight = clustered_weights(num_classes, 32, start, stop, seed=5)
    graph = knn_graph.build_graph(world, weight, start, num_classes, 16, index=index)
    assert np.array_equal(graph.neighbors_ck[:, 0], np.arange(start, stop))
    assert all(len(set(row)) == 16 for row in graph.neighbors_ck.tolist())
    recall = knn_graph.recall_at_k(world, weight, start, num_classes, graph, num_samples=400)
    assert recall >= 0.9
    assert len(set(collectives.allgather_object(world, recall))) == 1


def test_write_graph_is_collective_and_reopens(world, tmp_path_factory):
    num_classes, k = 97, 5
    weight = full_weight(num_classes, 6, seed=13)
    start, stop = uneven_range(num_classes, world.rank, world.size)
    graph = knn_graph.build_graph(world, weight[start:stop], start, num_classes, k, index="flat")
    # Every rank must write into the same file: rank 0 picks the directory.
    where = collectives.broadcast_object(
        world, str(tmp_path_factory.mktemp("knn")) if world.is_root else None)
    path = f"{where}/graph-step-00000003.h5"
    knn_graph.write_graph(world, path, graph, num_classes, k, step=3, recall=1.0)
    opened = knn_graph.KnnGraph.open(path, num_classes)
    assert (opened.k, opened.step, opened.index) == (k, 3, "flat")
    ref_ids, _ = exact_graph(weight, k)
    assert np.array_equal(opened.rows(np.arange(num_classes)), gather_rows(world, graph))
    assert np.array_equal(opened.rows(np.arange(num_classes))[:, 0], ref_ids[:, 0])
    world.barrier()  # nobody removes the file while another rank still reads it


def test_cell_scan_probing_every_cell_is_exact(world, monkeypatch):
    # With every cell probed and groups of one member (CELLS_KEEP >= any cell's members), the
    # grouped cell scan of `auto` sees every class and keeps all of them: no refinement, and the
    # ring-built graph must equal the exact one. Uneven split: rank 0 may own no class.
    monkeypatch.setattr(knn_graph, "FLAT_MAX_CLASSES", 100)
    monkeypatch.setattr(knn_graph, "CELLS_PER_SQRT", 0.5)
    monkeypatch.setattr(knn_graph, "CELLS_NPROBE", 1000)
    monkeypatch.setattr(knn_graph, "CELLS_KEEP", 600)
    monkeypatch.setattr(knn_graph, "CELLS_CHUNK_ROWS", 50)
    num_classes, k = 600, 9
    weight = full_weight(num_classes, 12, seed=17)
    start, stop = uneven_range(num_classes, world.rank, world.size)
    graph = knn_graph.build_graph(world, weight[start:stop], start, num_classes, k, refine=0)
    ref_ids, ref_sim = exact_graph(weight, k)
    assert_same_graph(graph.neighbors_ck, ref_ids[start:stop], ref_sim[start:stop])
