"""The KNN graph of the classes: for every class c, its K nearest classes by cosine of the
normalised classifier rows, column 0 being c itself (docs/design.md "Architecture" and
"Contracts: KNN graph file"). Every rank holds and indexes only its own class range of the
rows; the searches run on a ring of ranks.

Modules:
  ring.py          class ranges of the ranks (`Layout`), the ring pass, the top-k merge
  rows.py          argument checks, unit rows, K clamped to the number of classes
  indexes.py       faiss indexes of a rank's rows (flat, ivf, hnsw)
  search.py        `build_graph` (the distributed search) and `LocalGraph` (a rank's rows)
  cells.py         the shared-cells search of `auto` above the flat limit
  refine.py        neighbours-of-neighbours passes, rescoring of a previous graph
  recall.py        `recall_at_k` against exact search on a sample
  random_graph.py  `random_graph`
  graph_file.py    the file: `write_graph` (collective) and `GraphFile` (memory-mapped reader)
  refresh.py       `GraphRefresher`: the graph lifecycle of a training run (refresh from a
                   snapshot of the rows, swapped in at a fixed step)
  background.py    the refresh's build in a thread beside the training loop
  cli.py           `python -m app.knn_graph`

Legend (throughout): c = this rank's classes (rows), C = all classes, D = embedding dim, K =
neighbours per class (column 0 = the class itself).
"""
from app.knn.graph_file import GraphFile, write_graph
from app.knn.random_graph import random_graph
from app.knn.recall import recall_at_k
from app.knn.refresh import GraphRefresher
from app.knn.search import INDEXES, LocalGraph, build_graph

# Tuning constants stay in their modules (search.FLAT_MAX_CLASSES, cells.CELLS_*,
# ring.CHUNK_ROWS), where the code reads them at call time.
__all__ = ["INDEXES", "GraphFile", "GraphRefresher", "LocalGraph", "build_graph",
           "random_graph", "recall_at_k", "write_graph"]
