"""The class-sharded classifier: rank r holds rows `class_range(C, r, P)` of W and their
optimizer state, computes its part of the loss, and updates only the rows that took part.

Legend: b = this rank's samples, N = global batch, D = embedding dim, c = local classes.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from app.classifier.knn_softmax import active_classes, assemble, plan_pairs, pair_similarities
from app.classifier.softmax import (ShardColumns, apply_margin_, class_logits, full_columns,
                                    sampled_columns, sharded_cross_entropy)
from common.keyed_random import BLOCK_ROWS, fill_keyed_rows
from mpi import collectives
from mpi.autograd import exchange_rows, gather_rows
from mpi.partition import class_range
from mpi.world import Traffic


def init_rows(seed: int, start: int, stop: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Initial weight rows [start, stop): N(0, 1/D), keyed by (seed, block) so a row's initial
    value does not depend on how many ranks share the classes (a 1-rank and a 4-rank run start
    identically). Drawn in the target precision, so 10^7 rows need no float64 temporary."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    out = np.empty((stop - start, dim), dtype=np_dtype)
    fill_keyed_rows(out, [seed, 0xC1A55], start,
                    lambda rng, lo: rng.standard_normal((BLOCK_ROWS, dim), dtype=np_dtype))
    out *= np_dtype(1.0 / math.sqrt(dim))
    return torch.from_numpy(out).to(dtype)


class RowSGD:
    """SGD with momentum for the classifier shard that touches only the rows given to `step`.

    "Lazy" update: a row that received no gradient this step keeps its weight AND its momentum
    unchanged (no momentum drift, no weight decay), as in sparse-embedding optimizers. For rows
    that did, the update is PyTorch's SGD exactly: g = grad + wd * w; m = mu * m + g;
    w -= lr * m. When every row takes part (mode `full`) this is dense momentum SGD.
    """

    def __init__(self, weight_cD: torch.Tensor, momentum: float, weight_decay: float):
        self.weight_cD = weight_cD
        self.momentum_cD = torch.zeros_like(weight_cD)
        self.mu, self.wd = momentum, weight_decay

    @torch.no_grad()
    def step(self, rows_r: torch.Tensor | None, grad_rD: torch.Tensor, lr: float) -> None:
        if rows_r is None:  # every row: in place, no gathers
            grad_rD = grad_rD.add(self.weight_cD, alpha=self.wd) if self.wd else grad_rD
            self.momentum_cD.mul_(self.mu).add_(grad_rD)
            self.weight_cD.add_(self.momentum_cD, alpha=-lr)
            return
        # index_select / index_copy_: about 3x faster on CPU than advanced-index assignment.
        weight_rD = self.weight_cD.index_select(0, rows_r)
        m_rD = self.momentum_cD.index_select(0, rows_r).mul_(self.mu).add_(grad_rD)
        if self.wd:
            m_rD.add_(weight_rD, alpha=self.wd)
        weight_rD.sub_(m_rD, alpha=lr)
        self.momentum_cD.index_copy_(0, rows_r, m_rD)
        self.weight_cD.index_copy_(0, rows_r, weight_rD)


class ShardedClassifier:
    """Rows [start, stop) of the C x D classifier and their optimizer, on this rank.

    Distributed contract of `loss`: every rank passes its own features and labels (all ranks the
    same batch size) and backpropagates the first returned tensor; the second is the mean loss
    over the GLOBAL batch, identical on every rank. After backward the feature gradient on each
    rank is the full gradient of that global mean w.r.t. its own features, and `step()` applies
    this shard's row gradients (only the rows that took part).
    """

    def __init__(self, world, num_classes: int, dim: int, softmax_cfg, optim_cfg, seed: int,
                 dtype: torch.dtype = torch.float32):
        self.world, self.cfg = world, softmax_cfg
        self.num_classes, self.dim, self.seed = num_classes, dim, seed
        self.start, self.stop = class_range(num_classes, world.rank, world.size)
        self.weight_cD = init_rows(seed, self.start, self.stop, dim, dtype)
        self.optimizer = RowSGD(self.weight_cD, optim_cfg.classifier_momentum,
                                optim_cfg.classifier_weight_decay)
        # (rows that took part or None for all, their leaf tensor) between loss() and step().
        self._pending: tuple[torch.Tensor | None, torch.Tensor] | None = None
        self.graph = None
        self.pairs_last_step = 0

    @property
    def num_local(self) -> int:
        return self.stop - self.start

    def set_graph(self, graph) -> None:
        """The KNN graph used by mode `knn` from the next step on (anything with
        `rows(class_ids) -> (n, K) ints`, e.g. app.knn.GraphFile); swapped at a step
        boundary by the trainer."""
        self.graph = graph

    def _generator(self, step: int, stream: int) -> torch.Generator:
        # Random choices are a function of (seed, step, stream): a resumed run repeats them.
        seed = np.random.default_rng([self.seed, step, stream]).integers(2**62)
        return torch.Generator().manual_seed(int(seed))

    def columns(self, labels_N: torch.Tensor, step: int) -> ShardColumns:
        if self.cfg.mode == "sampled":
            return sampled_columns(labels_N, self.start, self.stop, self.cfg.sample_rate,
                                   self._generator(step, 1 + self.world.rank))
        return full_columns(labels_N, self.start, self.stop)

    def loss(self, feat_bD: torch.Tensor, labels_b: torch.Tensor,
             step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate on this rank, global-batch mean loss for logging).

        `full`/`sampled`: the loss is the global mean, identical on all ranks, and is also what
        each rank backpropagates (each rank's logit gradients are its own columns').
        `knn`: each rank backpropagates its own samples' share (sum / N); the shares add up to
        the global mean, which one scalar allreduce provides for logging. Either way, after
        backward the feature gradient on every rank is the full gradient of the global mean
        w.r.t. its own features. Every rank must pass the same batch size (checked: a ValueError
        on every rank otherwise)."""
        sizes = self._equal_batch_sizes(feat_bD.shape[0])
        labels_N = collectives.allgather(self.world, labels_b, sizes, Traffic.LABELS)
        feat_ND = gather_rows(self.world, feat_bD, sizes,
                              (Traffic.FEATURES, Traffic.FEATURE_GRADIENTS))
        if self.cfg.mode == "knn":
            return self._knn_loss(feat_ND, labels_N, feat_bD.shape[0], step)
        cols = self.columns(labels_N, step)
        # A leaf for this step's rows: its .grad holds exactly the row gradients to apply, so
        # nothing of the shard's size is allocated for rows that did not take part.
        if cols.rows_c is None:
            weight_leaf = self.weight_cD.detach().requires_grad_()
        else:
            weight_leaf = self.weight_cD[cols.rows_c].requires_grad_()
        logits_Nc = class_logits(feat_ND, weight_leaf, self.cfg.logit, self.cfg.scale)
        apply_margin_(logits_Nc, cols.target_N, self.cfg.logit, self.cfg.scale, self.cfg.margin,
                      self.cfg.margin_type)
        loss = sharded_cross_entropy(self.world, logits_Nc, cols.target_N).mean()
        self._pending = (cols.rows_c, weight_leaf)
        return loss, loss.detach()

    def _equal_batch_sizes(self, batch: int) -> list[int]:
        """The batch size of every rank, which the pair routing and the sharded cross-entropy
        assume equal (one tiny allgather; the same ValueError on every rank if they differ)."""
        if self.world.size == 1:
            return [batch]
        sizes = collectives.allgather(self.world, torch.tensor([batch]), [1] * self.world.size)
        if int(sizes.min()) != int(sizes.max()):
            raise ValueError(f"the classifier needs the same batch size on every rank, got "
                             f"{sizes.tolist()} (ranks 0..{self.world.size - 1})")
        return [batch] * self.world.size

    def _knn_loss(self, feat_ND, labels_N, per_rank: int, step: int):
        if self.graph is None:
            raise ValueError("softmax.mode=knn needs a KNN graph; call set_graph() first")
        cls_NA, valid_NA = active_classes(labels_N, self.graph, self.num_classes,
                                          self.cfg.random_negatives, self._generator(step, 0))
        plan = plan_pairs(cls_NA, valid_NA, self.num_classes, self.world.rank, self.world.size,
                          per_rank)
        num_active = cls_NA.shape[1]
        local_p = cls_NA.reshape(-1)[plan.mine_p] - self.start
        rows_u, inv_p = torch.unique(local_p, return_inverse=True)
        weight_leaf = self.weight_cD[rows_u].requires_grad_()
        sim_p = pair_similarities(feat_ND, weight_leaf, inv_p, plan.mine_p // num_active,
                                  self.cfg.logit)
        sim_recv = exchange_rows(self.world, sim_p.unsqueeze(1), plan.send_counts,
                                 plan.recv_counts, (Traffic.LOGITS, Traffic.LOGITS)).squeeze(1)
        sim_bA = assemble(sim_recv, plan, per_rank)
        target_b = torch.zeros(per_rank, dtype=torch.int64)  # column 0 is the label
        logits_bA = sim_bA * self.cfg.scale if self.cfg.logit == "cosine" else sim_bA
        apply_margin_(logits_bA, target_b, self.cfg.logit, self.cfg.scale, self.cfg.margin,
                      self.cfg.margin_type)
        lo = self.world.rank * per_rank
        logits_bA = logits_bA.masked_fill(~valid_NA[lo:lo + per_rank], -torch.inf)
        loss_sum = F.cross_entropy(logits_bA, target_b, reduction="sum")
        share = loss_sum / labels_N.shape[0]
        self._pending = (rows_u, weight_leaf)
        self.pairs_last_step = int(plan.mine_p.numel())
        return share, collectives.allreduce(self.world, share.detach().reshape(1))[0]

    def hold(self, rows: torch.Tensor | None, weight_leaf: torch.Tensor) -> None:
        """The step's rows (local indices, or None for all) and their leaf, whose `.grad`
        `step()` applies: for a loss computed outside `loss()` (app/training/pipeline.py)."""
        self._pending = (rows, weight_leaf)

    def row_grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(global class ids, their gradient rows) produced by the last backward; for tests and
        diagnostics. Rows that did not take part are absent."""
        assert self._pending is not None and self._pending[1].grad is not None
        rows, weight_leaf = self._pending
        local = torch.arange(self.num_local) if rows is None else rows
        return local + self.start, weight_leaf.grad

    def discard(self) -> None:
        """Forget the last loss() without applying anything (a skipped step): weights and
        momentum stay as they are."""
        self._pending = None

    def step(self, lr: float, first_free: int = 0) -> int:
        """Apply this step's row gradients (after backward). Returns the number of rows touched.
        Rows of classes below `first_free` (a global class id) keep weight and momentum."""
        assert self._pending is not None, "step() without loss()"
        rows, weight_leaf = self._pending
        self._pending = None
        grad = weight_leaf.grad
        if first_free > self.start:
            local = torch.arange(self.num_local) if rows is None else rows
            free = local >= first_free - self.start
            rows, grad = local[free], grad[free]
        self.optimizer.step(rows, grad, lr)
        return self.num_local if rows is None else int(rows.numel())

    # -- checkpointing: rows are stored by GLOBAL class range (app/checkpoint.py), so any world
    # size can load them.

    def state_arrays(self) -> dict[str, np.ndarray]:
        """This shard's rows and their optimizer state, for `checkpoint.write_rows`."""
        return {"weight": self.weight_cD.numpy(), "momentum": self.optimizer.momentum_cD.numpy()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Rows and momentum from `checkpoint.read_rows(..., names=("weight", "momentum"))`,
        copied bit for bit."""
        self.weight_cD.copy_(torch.from_numpy(arrays["weight"]))
        self.optimizer.momentum_cD.copy_(torch.from_numpy(arrays["momentum"]))
