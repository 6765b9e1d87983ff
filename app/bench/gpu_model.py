"""The one-process classifier of the one-GPU benchmark (`python -m app.bench gpu`): the rows, their
RowSGD and the `full` / `knn` softmax of ONE rank, on any device, without MPI.

Why not `ShardedClassifier` itself: in this version it allocates a step's small tensors (the knn
assembly buffer, the targets, the softmax's row statistics) on the CPU, where the trainer
computes, so it cannot take rows on a GPU. This is its one-rank path (P = 1: no exchange, the
sharded cross-entropy is the plain one, every pair is this rank's and arrives in order) written
with the project's own pieces on the rows' device: `class_logits`, `apply_margin_` (full),
`active_classes` and `pair_similarities` (knn), `RowSGD`. tests/unit/test_bench_gpu.py checks
that loss, feature gradient and row gradients equal `ShardedClassifier` on one rank (float64),
and that the updated rows do.

Legend: N = batch, D = embedding dim, C = classes, K = graph neighbours, A = active classes per
sample (K + R random negatives), u = distinct rows a knn step touches.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from app.classifier.knn_softmax import active_classes, pair_similarities
from app.classifier.sharded import RowSGD
from app.classifier.softmax import apply_margin_, class_logits

# Rows drawn per chunk: no temporary of the whole C x D; the graph's int64 draws of a chunk
# stay under GRAPH_CHUNK_BYTES (its set-up must not raise the peak memory the benchmark reports).
CHUNK_ROWS = 1 << 22
GRAPH_CHUNK_BYTES = 1 << 26


class DeviceGraph:
    """A KNN graph table (C x K int32, column 0 the class itself) on a device, with the
    `rows(class_ids)` of app.knn.GraphFile (a small host copy of the rows asked for)."""

    def __init__(self, table_CK: torch.Tensor):
        self.table_CK = table_CK

    @property
    def nbytes(self) -> int:
        return self.table_CK.numel() * self.table_CK.element_size()

    def rows(self, class_ids) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(class_ids, dtype=np.int64)).to(self.table_CK.device)
        return self.table_CK.index_select(0, ids).cpu().numpy()


def random_device_graph(num_classes: int, k: int, seed: int, device) -> DeviceGraph:
    """Column 0 the class itself, then K-1 uniform random other classes (repeats possible; the
    knn softmax masks a repeated class, as for random negatives). Drawn on `device` in chunks.
    A stand-in for a graph of the weights where an exact build would not fit the time."""
    table = torch.empty((num_classes, k), dtype=torch.int32, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    chunk = max(1, GRAPH_CHUNK_BYTES // (8 * k))
    for lo in range(0, num_classes, chunk):
        ids = torch.arange(lo, min(lo + chunk, num_classes), device=device)
        others = torch.randint(0, max(num_classes - 1, 1), (ids.numel(), k - 1), device=device,
                               generator=gen)
        others += others >= ids.unsqueeze(1)  # skip the class itself
        table[lo:lo + ids.numel(), 0] = ids.to(torch.int32)
        table[lo:lo + ids.numel(), 1:] = others.to(torch.int32)
    return DeviceGraph(table)


def random_rows(num_classes: int, dim: int, seed: int, device) -> torch.Tensor:
    """N(0, 1/D) rows drawn on `device` in place (not the keyed rows of init_rows, whose
    numpy draw of 10^8 rows would take minutes on the host)."""
    weight = torch.empty((num_classes, dim), dtype=torch.float32, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for lo in range(0, num_classes, CHUNK_ROWS):
        weight[lo:lo + CHUNK_ROWS].normal_(0.0, dim ** -0.5, generator=gen)
    return weight


class OneProcessClassifier:
    """All C rows of W (`weight_CD`, on its device), their RowSGD, and the loss of `full` or
    `knn` (softmax_cfg.mode) over one process's batch; see the module docstring."""

    def __init__(self, weight_CD: torch.Tensor, softmax_cfg, optim_cfg, seed: int):
        if softmax_cfg.mode not in ("full", "knn"):
            raise ValueError(f"softmax.mode: {softmax_cfg.mode!r}; the benchmark runs full "
                             f"and knn")
        self.weight_CD, self.cfg, self.seed = weight_CD, softmax_cfg, seed
        self.num_classes = weight_CD.shape[0]
        self.optimizer = RowSGD(weight_CD, optim_cfg.classifier_momentum,
                                optim_cfg.classifier_weight_decay)
        self.graph = None
        self._pending = None

    def state_nbytes(self) -> int:
        """Bytes of the rows and their optimizer state (the momentum)."""
        return 2 * self.weight_CD.numel() * self.weight_CD.element_size()

    def _generator(self, step: int, stream: int) -> torch.Generator:
        # ShardedClassifier._generator: (seed, step, stream), on the host.
        seed = np.random.default_rng([self.seed, step, stream]).integers(2**62)
        return torch.Generator().manual_seed(int(seed))

    def loss(self, feat_ND: torch.Tensor, labels_N: torch.Tensor, step: int) -> torch.Tensor:
        """The batch's mean loss (float32 features in, float32 softmax)."""
        if self.cfg.mode == "knn":
            return self._knn_loss(feat_ND, labels_N, step)
        leaf = self.weight_CD.detach().requires_grad_()
        logits_NC = class_logits(feat_ND, leaf, self.cfg.logit, self.cfg.scale)
        apply_margin_(logits_NC, labels_N, self.cfg.logit, self.cfg.scale, self.cfg.margin,
                      self.cfg.margin_type)
        self._pending = (None, leaf)
        return F.cross_entropy(logits_NC, labels_N)

    def _knn_loss(self, feat_ND, labels_N, step: int) -> torch.Tensor:
        device = feat_ND.device
        cls_NA, valid_NA = active_classes(labels_N.cpu(), self.graph, self.num_classes,
                                          self.cfg.random_negatives, self._generator(step, 0))
        cls_NA, valid_NA = cls_NA.to(device), valid_NA.to(device)
        num_rows, num_active = cls_NA.shape
        rows_u, inv_p = torch.unique(cls_NA.reshape(-1), return_inverse=True)
        leaf = self.weight_CD[rows_u].requires_grad_()
        samples_p = torch.arange(num_rows * num_active, device=device) // num_active
        sim_NA = pair_similarities(feat_ND, leaf, inv_p, samples_p,
                                   self.cfg.logit).view(num_rows, num_active)
        logits_NA = sim_NA * self.cfg.scale if self.cfg.logit == "cosine" else sim_NA
        target_N = torch.zeros(num_rows, dtype=torch.int64, device=device)  # column 0: label
        apply_margin_(logits_NA, target_N, self.cfg.logit, self.cfg.scale, self.cfg.margin,
                      self.cfg.margin_type)
        logits_NA = logits_NA.masked_fill(~valid_NA, -torch.inf)
        self._pending = (rows_u, leaf)
        return F.cross_entropy(logits_NA, target_N, reduction="sum") / num_rows

    def row_grads(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(rows that took part or None for all, their gradient) of the last backward."""
        rows, leaf = self._pending
        return rows, leaf.grad

    def step(self, lr: float) -> None:
        rows, leaf = self._pending
        self._pending = None
        self.optimizer.step(rows, leaf.grad, lr)
