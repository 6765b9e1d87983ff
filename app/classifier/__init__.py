"""The class-sharded classifier and its softmax modes.

- `sharded`: `ShardedClassifier` (rank r's rows of W, its loss in every mode, its row update)
  and `RowSGD`, the lazy row-sparse optimizer;
- `softmax`: the local math of `full` and `sampled` (logits, margins, the sharded
  cross-entropy whose normaliser is all-reduced);
- `knn_softmax`: the (sample, class) pairs of `knn` mode and their routing between ranks;
- `centres`: class centres under the backbone, imprinting the rows with them.
"""
from app.classifier.sharded import RowSGD, ShardedClassifier, init_rows

__all__ = ["RowSGD", "ShardedClassifier", "init_rows"]
