"""The training application (docs/design.md, "Architecture").

Entry points `python -m app.train`, `app.evaluate`, `app.knn_graph`, `app.bench`; packages
`classifier/` (the sharded classifier and its softmax modes), `knn/` (the KNN graph of the class
weights), `training/` (the loop and what it needs), `bench/` (benchmarks; nothing imports them);
modules `config`, `model`, `backbones`, `checkpoint`, `runlog`.
"""
