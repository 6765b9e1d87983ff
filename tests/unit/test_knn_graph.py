"""app/knn/ in one process (fake world): exactness of the flat graph, column 0, the HDF5
file and its memory-mapped reader, random graphs, approximate indexes on clustered data."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from app import checkpoint
from app.knn import GraphFile, build_graph, random_graph, recall_at_k, write_graph
from app.knn import cells, ring, search, torch_search  # modules whose tuning constants change
from data_prep.clustered_rows import clustered_weights
from mpi.world import fake_world


def exact_graph(weight_CD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference in float64: (C, K) ids (column 0 = the class) and the sorted cosines."""
    x = weight_CD / np.linalg.norm(weight_CD, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k - 1]
    ids = np.concatenate([np.arange(len(x))[:, None], order], axis=1)
    return ids, np.take_along_axis(sim, order, axis=1)


def assert_same_graph(got_ids, ref_ids, ref_sim, tol=1e-5):
    """Ids equal, except where the reference's neighbours tie within `tol` (float32 order)."""
    assert got_ids.shape == ref_ids.shape
    assert np.array_equal(got_ids[:, 0], ref_ids[:, 0])
    for row in np.flatnonzero((got_ids != ref_ids).any(axis=1)):
        for j in np.flatnonzero(got_ids[row] != ref_ids[row]):
            near = np.abs(ref_sim[row] - ref_sim[row, j - 1]) <= tol
            assert got_ids[row, j] in set(ref_ids[row, 1:][near]), (row, j)


def tied_weight(num_classes: int, dim: int, seed: int) -> np.ndarray:
    """Gaussian rows, with a few exact duplicates (other classes tie with a class's self and
    neighbours tie with each other) and a zero row (every cosine with it 0)."""
    weight = np.random.default_rng(seed).standard_normal((num_classes, dim))
    weight[[3, 4, num_classes - 1]] = weight[num_classes // 2]
    weight[num_classes // 3] = 0.0
    return weight


def assert_exact_up_to_ties(got, weight_CD: np.ndarray, ref_sim, tol=1e-5):
    """Every row of `got` (a LocalGraph) is an exact top-K of the float64 cosines, whatever
    order ties took: column 0 the class, K distinct classes, the scores the reference's sorted
    top-K (`ref_sim`: (n, K-1)), each the true cosine of the class listed beside it."""
    x_CD = weight_CD / np.maximum(np.linalg.norm(weight_CD, axis=1, keepdims=True), 1e-30)
    ids = got.neighbors_ck.astype(np.int64)
    assert np.array_equal(ids[:, 0], np.arange(got.start, got.stop))
    assert all(len(set(row)) == got.k for row in ids.tolist())
    np.testing.assert_allclose(got.similarity_ck[:, 1:], ref_sim, atol=tol)
    true_ck = np.einsum("cd,ckd->ck", x_CD[got.start:got.stop], x_CD[ids[:, 1:]])
    np.testing.assert_allclose(got.similarity_ck[:, 1:], true_ck, atol=tol)


def check_torch_graph(world, weight_CD: np.ndarray, start: int, stop: int, k: int) -> None:
    """Collective: the `torch` graph of rows [start, stop) (given as a torch tensor) equals the
    faiss `flat` graph and the float64 one-process reference, ties aside."""
    num_classes = len(weight_CD)
    rows = torch.from_numpy(weight_CD[start:stop]).float()
    got = build_graph(world, rows, start, num_classes, k, index="torch")
    flat = build_graph(world, weight_CD[start:stop], start, num_classes, k, index="flat")
    assert (got.index, got.start, got.stop) == ("torch", start, stop)
    assert "on cpu" in got.detail
    assert got.neighbors_ck.dtype == np.int32 and got.similarity_ck.dtype == np.float32
    best_cC = best_cosines(weight_CD, start, stop)
    assert_exact_up_to_ties(got, weight_CD, best_cC[:, :k - 1])
    assert_exact_up_to_ties(flat, weight_CD, best_cC[:, :k - 1])
    np.testing.assert_allclose(got.similarity_ck, flat.similarity_ck, atol=1e-5)
    # Rows without ties (a gap above 1e-4 after each of the K-1 best others): the same ids.
    gaps = np.diff(-best_cC[:, :k], axis=1).min(axis=1, initial=1.0) > 1e-4
    assert gaps.sum() >= (stop - start) // 2
    assert np.array_equal(got.neighbors_ck[gaps], flat.neighbors_ck[gaps])


def best_cosines(weight_CD: np.ndarray, start: int, stop: int) -> np.ndarray:
    """float64 cosines of rows [start, stop) to every OTHER class, best first (a zero row: 0
    with everything); (n, C) with -inf last, for the class itself."""
    x_CD = weight_CD / np.maximum(np.linalg.norm(weight_CD, axis=1, keepdims=True), 1e-30)
    sim = x_CD[start:stop] @ x_CD.T
    sim[np.arange(stop - start), np.arange(start, stop)] = -np.inf
    return -np.sort(-sim, axis=1)


@pytest.fixture(scope="module")
def world():
    return fake_world()


@pytest.mark.parametrize("pieces", [False, True])
def test_torch_graph_equals_flat_and_exact(world, pieces, monkeypatch):
    if pieces:  # ring chunks, query pieces and local pieces of a few rows: many merges
        monkeypatch.setattr(ring, "CHUNK_ROWS", 23)
        monkeypatch.setattr(torch_search, "LOCAL_ROWS", 7)
        monkeypatch.setattr(torch_search, "SCORE_ELEMENTS", 7 * 5)
    check_torch_graph(world, tied_weight(150, 9, seed=4), 0, 150, 11)


def test_torch_merge_keeps_the_best_across_pieces(monkeypatch):
    # A piece's top-k must not push out better candidates found in an earlier piece.
    x_cD = torch.eye(4)[[0, 1, 2, 3, 0]] * torch.tensor([[1.0], [0.9], [0.8], [0.7], [1.0]])
    query = torch.eye(4)[:1]
    monkeypatch.setattr(torch_search, "LOCAL_ROWS", 2)
    score, ids = torch_search.local_topk(x_cD, 10, query, torch.full((1, 2), -torch.inf),
                                         torch.full((1, 2), -1), 2)
    assert sorted(ids[0].tolist()) == [10, 14] and score[0].tolist() == [1.0, 1.0]


def test_flat_graph_is_exact(world):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((300, 12))
    graph = build_graph(world, weight, 0, 300, 9, index="flat")
    ref_ids, ref_sim = exact_graph(weight, 9)
    assert graph.index == "flat" and graph.neighbors_ck.dtype == np.int32
    assert_same_graph(graph.neighbors_ck, ref_ids, ref_sim)
    np.testing.assert_allclose(graph.similarity_ck[:, 1:], ref_sim, atol=1e-5)
    np.testing.assert_allclose(graph.similarity_ck[:, 0], 1.0, atol=1e-6)
    assert recall_at_k(world, weight, 0, 300, graph, num_samples=100) == 1.0


def test_column_zero_is_self_even_with_identical_rows(world):
    # Classes 0..3 share one vector: each must still list itself first, then the other three.
    weight = np.random.default_rng(1).standard_normal((40, 6))
    weight[1:4] = weight[0]
    graph = build_graph(world, weight, 0, 40, 4, index="flat")
    assert np.array_equal(graph.neighbors_ck[:, 0], np.arange(40))
    for c in range(4):
        assert set(graph.neighbors_ck[c].tolist()) == {0, 1, 2, 3}
    assert all(len(set(row)) == 4 for row in graph.neighbors_ck.tolist())


def test_k_larger_than_classes_is_clamped_with_a_warning(world, caplog):
    weight = np.random.default_rng(2).standard_normal((5, 4))
    with caplog.at_level(logging.WARNING, logger="hundredm"):
        graph = build_graph(world, weight, 0, 5, 8, index="flat")
    assert graph.k == 5 and "using k=5" in caplog.text
    assert all(sorted(row) == list(range(5)) for row in graph.neighbors_ck.tolist())


@pytest.mark.parametrize("index", ["ivf", "hnsw", "auto"])
def test_approximate_indexes_find_the_families(world, index, monkeypatch):
    # Clustered weights (families of 16): an approximate graph must recover the families.
    # `auto` takes its large-C path (IVF + refinement) by lowering the flat limit.
    monkeypatch.setattr(search, "FLAT_MAX_CLASSES", 100)
    weight = clustered_weights(4000, 32, 0, 4000, seed=3)
    graph = build_graph(world, weight, 0, 4000, 16, index=index)
    assert np.array_equal(graph.neighbors_ck[:, 0], np.arange(4000))
    assert all(len(set(row)) == 16 for row in graph.neighbors_ck[::97].tolist())
    assert recall_at_k(world, weight, 0, 4000, graph, num_samples=500) >= 0.9


def test_cell_groups_hold_every_member_once_and_deal_families_apart():
    rng = np.random.default_rng(8)
    probe_cp = np.stack([rng.integers(0, 5, 300), rng.integers(0, 3, 300)], axis=1)
    x_cD = rng.standard_normal((300, 4)).astype(np.float32)
    rows_gD, ids_g, bounds, group = cells.cell_groups(x_cD, 1000, probe_cp, 7)
    keep = cells.CELLS_KEEP
    assert np.array_equal(np.diff(bounds), group * keep)
    assert sorted(ids_g[ids_g >= 0].tolist()) == list(range(1000, 1300))
    assert torch.equal(rows_gD[ids_g >= 0], torch.from_numpy(x_cD[ids_g[ids_g >= 0] - 1000]))
    assert not rows_gD[ids_g < 0].any()  # padding rows are zero
    for cell in range(7):
        ids = ids_g[bounds[cell]:bounds[cell + 1]].reshape(keep, -1)
        assert set(probe_cp[ids[ids >= 0] - 1000, 0].tolist()) <= {cell}
        # Members with the same second cell are spread over the groups: no group holds two of
        # them before every group holds one.
        for second in range(3):
            per_group = [(probe_cp[g[g >= 0] - 1000, 1] == second).sum() for g in ids.numpy()]
            assert max(per_group) - min(per_group) <= 1


def test_refine_from_previous_graph_after_weights_moved(world):
    weight = clustered_weights(3000, 32, 0, 3000, seed=4)
    before = build_graph(world, weight, 0, 3000, 12, index="flat")
    moved = weight + 0.02 * np.random.default_rng(5).standard_normal(weight.shape)
    graph = build_graph(world, moved, 0, 3000, 12, refine=2, init=before)
    assert recall_at_k(world, moved, 0, 3000, graph) >= 0.95


def test_recall_of_a_random_graph_is_low(world):
    weight = clustered_weights(2000, 16, 0, 2000, seed=6)
    graph = random_graph(0, 2000, 2000, 10, seed=0)
    recall = recall_at_k(world, weight, 0, 2000, graph)
    # Column 0 always matches; the other 9 of 10 almost never do.
    assert 0.1 <= recall < 0.15


def test_hdf5_round_trip_through_the_memory_mapped_reader(world, tmp_path):
    weight = np.random.default_rng(7).standard_normal((257, 8))
    graph = build_graph(world, weight, 0, 257, 6, index="flat")
    path = tmp_path / "knn" / "graph-step-00000012.h5"
    write_graph(world, path, graph, 257, 6, step=12, recall=0.5)
    assert path.is_file() and not path.with_name(path.name + ".tmp").exists()
    with h5py.File(path, "r") as f:
        assert f["neighbors"].dtype == np.int32 and f["similarity"].dtype == np.float16
        assert f["neighbors"].chunks is None and f["neighbors"].compression is None
        assert np.array_equal(f["neighbors"][:], graph.neighbors_ck)
    g = GraphFile.open(path, 257)
    assert isinstance(g.neighbors_CK, np.memmap)
    assert (g.num_classes, g.k, g.step, g.index, g.recall_at_k) == (257, 6, 12, "flat", 0.5)
    assert g.attrs["metric"] == "cosine"
    ids = np.array([256, 0, 17])
    assert np.array_equal(g.rows(ids), graph.neighbors_ck[ids]) and g.rows(ids).dtype == np.int32
    np.testing.assert_allclose(g.similarities(ids), graph.similarity_ck[ids], atol=1e-3)
    with pytest.raises(ValueError, match="outside"):
        g.rows([257])


def test_reader_refuses_other_class_counts_and_bad_files(world, tmp_path):
    graph = random_graph(0, 50, 50, 4, seed=1)
    path = tmp_path / "g.h5"
    write_graph(world, path, graph, 50, 4, step=0, recall=float("nan"))
    with pytest.raises(ValueError, match=r"g\.h5: KNN graph written for 50 classes but this "
                                         r"run has 60"):
        GraphFile.open(path, 60)
    with pytest.raises(ValueError, match=r"missing\.h5: cannot read"):
        GraphFile.open(tmp_path / "missing.h5", 50)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(ValueError, match=r"junk\.h5: cannot read"):
        GraphFile.open(tmp_path / "junk.h5", 50)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"truncated\.h5"):
        GraphFile.open(truncated, 50)
    for name, how in [("int64.h5", "dtype"), ("chunked.h5", "contiguous")]:
        bad = tmp_path / name
        with h5py.File(bad, "w") as f:
            if how == "dtype":
                f["neighbors"] = np.zeros((50, 4), dtype=np.int64)
            else:
                f.create_dataset("neighbors", data=np.zeros((50, 4), np.int32), chunks=(10, 4))
            f["similarity"] = np.zeros((50, 4), dtype=np.float16)
            f.attrs.update(num_classes=50, k=4, metric="cosine", step=0, index="flat",
                           recall_at_k=1.0)
        with pytest.raises(ValueError, match=f"{name}: /neighbors .*{how}"):
            GraphFile.open(bad, 50)


@pytest.mark.parametrize("num_classes,k", [(10_000, 32), (40, 40), (30, 25), (1, 1)])
def test_random_graph(num_classes, k):
    whole = random_graph(0, num_classes, num_classes, k, seed=3)
    nbr = whole.neighbors_ck
    assert nbr.shape == (num_classes, k) and nbr.dtype == np.int32
    assert np.array_equal(nbr[:, 0], np.arange(num_classes))
    assert nbr.min() >= 0 and nbr.max() < num_classes
    assert all(len(set(row)) == k for row in nbr.tolist())
    # The same rows whatever the split into ranks; another seed gives another graph.
    cut = num_classes // 3
    parts = [random_graph(a, b, num_classes, k, seed=3).neighbors_ck
             for a, b in [(0, cut), (cut, num_classes)]]
    assert np.array_equal(np.concatenate(parts), nbr)
    if k > 1 and num_classes > 2 * k:
        other = random_graph(0, num_classes, num_classes, k, seed=4).neighbors_ck
        assert not np.array_equal(other, nbr)


def test_bad_arguments_are_refused(world):
    weight = np.ones((10, 4))
    with pytest.raises(ValueError, match="index='annoy'"):
        build_graph(world, weight, 0, 10, 3, index="annoy")
    with pytest.raises(ValueError, match="num_classes=12"):
        build_graph(world, weight, 0, 12, 3)
    with pytest.raises(ValueError, match="k=0"):
        build_graph(world, weight, 0, 10, 0)


def fake_run(tmp_path, num_classes=300, dim=8, step=40, splits=(0, 120, 300)):
    """A run directory with one complete checkpoint whose classifier rows are split over files
    as a run on len(splits) - 1 ranks would write them. Returns (run_dir, full weight)."""
    weight = np.random.default_rng(8).standard_normal((num_classes, dim)).astype(np.float32)
    ckpt = tmp_path / "run" / "checkpoints" / f"step-{step:08d}"
    (ckpt / "classifier").mkdir(parents=True)
    entries = []
    for a, b in zip(splits, splits[1:]):
        rel = f"classifier/rows-{a:010d}-{b:010d}.h5"
        with h5py.File(ckpt / rel, "w") as f:
            f["weight"] = weight[a:b]
            f["momentum"] = np.zeros_like(weight[a:b])
        entries.append({"start": a, "stop": b, "file": rel})
    manifest = {"format_version": 1, "step": step, "num_classes": num_classes,
                "embedding_dim": dim, "classifier": entries}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "run", weight


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    return subprocess.run([sys.executable, "-m", "app.knn_graph", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_cli_builds_the_graph_of_the_newest_checkpoint(tmp_path):
    run_dir, weight = fake_run(tmp_path)
    proc = run_cli("--run", str(run_dir), "--k", "6", "--index", "flat")
    assert proc.returncode == 0, proc.stderr
    assert "300 classes, K=6" in proc.stdout and "recall@6 1.000" in proc.stdout
    graph = GraphFile.open(run_dir / "knn" / "graph-step-00000040.h5", 300)
    assert graph.step == 40 and graph.recall_at_k == 1.0
    ref_ids, ref_sim = exact_graph(weight.astype(np.float64), 6)
    assert_same_graph(graph.rows(np.arange(300)), ref_ids, ref_sim)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = run_cli("--run", str(tmp_path / "nowhere"), "--k", "4")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: no such run "
                                                f"directory"]


@pytest.mark.parametrize("problem", ["no checkpoint", "bad manifest", "missing rows"])
def test_cli_checkpoint_problems_name_the_file(tmp_path, problem):
    # The checks main() runs before any collective (in-process: each subprocess costs seconds).
    run_dir, _ = fake_run(tmp_path)
    ckpt = run_dir / "checkpoints" / "step-00000040"
    if problem == "no checkpoint":
        (ckpt / "manifest.json").unlink()
        with pytest.raises(ValueError, match="no complete checkpoint"):
            checkpoint.read_manifest(checkpoint.find_checkpoint(run_dir))
        return
    if problem == "bad manifest":
        (ckpt / "manifest.json").write_text("{not json")
        with pytest.raises(ValueError, match=r"manifest\.json: not a readable"):
            checkpoint.read_manifest(checkpoint.find_checkpoint(run_dir))
        return
    (ckpt / "classifier" / "rows-0000000120-0000000300.h5").unlink()
    directory = checkpoint.find_checkpoint(run_dir)
    manifest = checkpoint.read_manifest(directory)
    assert checkpoint.read_rows(directory, manifest, 0, 100)["weight"].shape == (100, 8)
    with pytest.raises(ValueError, match=r"rows-0000000120-0000000300\.h5: cannot read"):
        checkpoint.read_rows(directory, manifest, 100, 300)
