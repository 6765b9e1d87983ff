"""The exported search index on clustered synthetic rows (data_prep.clustered_rows): only valid
ids, deterministic for a fixed index, and a recall on new queries at least the lower bound the
export writes into the manifest; exact search equals a float64 brute force."""
import logging
import math

import faiss
import numpy as np
import pytest
import torch

from app import checkpoint
from app.inference import export
from app.inference.index import recall
from app.inference.search import ExactSearcher, IndexSearcher
from data_prep.clustered_rows import clustered_weights

C, D = 6000, 32


def queries(rows_cD, num, seed, noise=0.6):
    rng = np.random.default_rng(seed)
    q = rows_cD[rng.choice(len(rows_cD), num, replace=False)]
    q = q + noise / math.sqrt(D) * rng.standard_normal(q.shape)
    return torch.from_numpy((q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32))


def export_index(root, rows_cD, kind, range_rows, target, num_queries):
    """`rows_cD` written as a checkpoint, then its rows and `kind` index as app.export writes
    them (ranges of `range_rows`), nprobe chosen for `target` recall on `num_queries` queries:
    (rows, indexes, index section)."""
    c = len(rows_cD)
    entry = checkpoint.write_rows(root / "ckpt", 0, c, {"weight": rows_cD})
    manifest = {"num_classes": c, "embedding_dim": D, "dtype": "float32", "classifier": [entry]}
    source = export.Source(root / "ckpt", manifest, {}, {}, "cosine", "vectors", (D,), [], "")
    options = export.IndexOptions(kind, 0, 0, target, 0)
    rows, indexes = export.write_rows_and_index(root, source, range_rows, options,
                                                logging.getLogger("test"))
    section = export.choose_nprobe(root, rows, indexes, "cosine", torch.float32,
                                   queries(rows_cD, num_queries, 1), options)
    return rows, indexes, section


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Rows and index files as app.export writes them (3 ranges), with the index section."""
    root = tmp_path_factory.mktemp("index")
    rows_cD = clustered_weights(C, D, 0, C, family=8, spread=0.6) * 3.0  # any norm: cosine
    rows, _, section = export_index(root, rows_cD, "ivf", 2500, 0.9, 1000)
    return root, rows_cD, rows, section


def searcher(root, section):
    shards = [(faiss.read_index(str(root / e["file"])), e["start"]) for e in section["files"]]
    return IndexSearcher(shards, "cosine", section["nprobe"])


def test_exact_search_equals_float64_brute_force(exported):
    _, rows_cD, _, _ = exported
    q = queries(rows_cD, 200, 2)
    scores, ids = ExactSearcher(torch.from_numpy(rows_cD), 0, "cosine").search(q, 5)
    unit = rows_cD.astype(np.float64) / np.linalg.norm(rows_cD, axis=1, keepdims=True)
    sim = q.double().numpy() @ unit.T
    want = np.argsort(-sim, axis=1)[:, :5]
    assert (ids.numpy() == want).mean() > 0.999
    assert np.allclose(scores.numpy(), np.take_along_axis(sim, want, 1), atol=1e-5)


def test_index_returns_valid_ids_and_is_deterministic(exported):
    root, rows_cD, _, section = exported
    assert [(e["start"], e["stop"]) for e in section["files"]] == \
        [(0, 2500), (2500, 5000), (5000, 6000)]
    q = queries(rows_cD, 300, 3)
    a_scores, a_ids = searcher(root, section).search(q, 10)
    b_scores, b_ids = searcher(root, section).search(q, 10)  # indexes read again
    assert torch.equal(a_ids, b_ids) and torch.equal(a_scores, b_scores)
    assert ((a_ids >= 0) & (a_ids < C)).all()
    assert all(len(set(row)) == 10 for row in a_ids.tolist())
    assert (a_scores[:, :-1] >= a_scores[:, 1:]).all()


def test_recall_on_new_queries_is_at_least_the_manifest_bound(exported):
    root, rows_cD, rows, section = exported
    stated = section["recall"]
    assert stated["queries"] == 1000 and stated["at_1"] >= 0.9 and section["nprobe"] >= 1
    assert stated["at_1_lower_bound"] < stated["at_1"]
    q = queries(rows_cD, 1000, 4)
    exact = export.exact_topk(root, rows, "cosine", torch.float32, q, 5)
    _, found = searcher(root, section).search(q, 5)
    measured = recall(exact, found)
    assert measured["at_1"] >= stated["at_1_lower_bound"]
    assert measured["at_5"] >= stated["at_5_lower_bound"]


def test_fewer_lists_scanned_lower_the_recall(exported):
    """nprobe changes what is searched (a test that can fail if it were ignored)."""
    root, rows_cD, rows, section = exported
    q = queries(rows_cD, 500, 5)
    exact = export.exact_topk(root, rows, "cosine", torch.float32, q, 5)
    one = searcher(root, dict(section, nprobe=1)).search(q, 5)[1]
    every = searcher(root, dict(section, nprobe=10_000)).search(q, 5)[1]
    assert recall(exact, one)["at_1"] < recall(exact, every)["at_1"] == 1.0


def test_hnsw_export_searches_a_graph_and_keeps_its_recall(tmp_path):
    rows_cD = clustered_weights(2000, D, 0, 2000, family=8, spread=0.6)
    rows, indexes, section = export_index(tmp_path, rows_cD, "hnsw", 2000, 0.95, 500)
    assert section["nprobe"] in (16, 32, 64) and indexes[0]["nlist"] == 0
    index = faiss.read_index(str(tmp_path / section["files"][0]["file"]))
    assert hasattr(index, "hnsw")
    q = queries(rows_cD, 500, 2)
    exact = export.exact_topk(tmp_path, rows, "cosine", torch.float32, q, 5)
    _, found = IndexSearcher([(index, 0)], "cosine", section["nprobe"]).search(q, 5)
    assert ((found >= 0) & (found < 2000)).all()
    assert recall(exact, found)["at_1"] >= section["recall"]["at_1_lower_bound"]


def test_pq4_export_scans_codes_reranks_rows_and_keeps_its_recall(tmp_path):
    """ivf-pq4: 4-bit fast-scan codes, re-scored on float16 rows (scores within 1e-3 of exact
    for the ids it returns), valid ids, deterministic, recall >= the manifest's lower bound."""
    rows_cD = clustered_weights(C, D, 0, C, family=8, spread=0.6)
    rows, indexes, section = export_index(tmp_path, rows_cD, "ivf-pq4", 4000, 0.95, 1000)
    index = faiss.read_index(str(tmp_path / section["files"][0]["file"]))
    assert hasattr(index, "refine_index") and "FastScan" in type(
        faiss.downcast_index(index.base_index)).__name__
    assert section["recall"]["at_1"] >= 0.95 and indexes[0]["nlist"] > section["nprobe"]
    q = queries(rows_cD, 1000, 2)
    found = searcher(tmp_path, section).search(q, 5)
    assert all(torch.equal(a, b) for a, b in zip(found, searcher(tmp_path, section).search(q, 5)))
    assert ((found[1] >= 0) & (found[1] < C)).all()
    unit = rows_cD / np.linalg.norm(rows_cD, axis=1, keepdims=True)
    want = np.einsum("nd,nkd->nk", q.numpy(), unit[found[1].numpy()])
    assert np.abs(found[0].numpy() - want).max() < 1e-3
    exact = export.exact_topk(tmp_path, rows, "cosine", torch.float32, q, 5)
    assert recall(exact, found[1])["at_1"] >= section["recall"]["at_1_lower_bound"]
