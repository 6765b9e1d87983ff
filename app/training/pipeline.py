"""The overlapping step pipeline (`comm.overlap: true`): the classifier's part of a step in
`comm.micro_batches` micro-batches whose exchanges travel while the next one computes.

Legend: b = this rank's batch, m = a micro-batch's share of it, M = P m (a micro-batch over all
ranks), N = P b (the global batch), D = embedding dim, c = this shard's rows in the step,
A = active classes per sample (knn), p = pairs this rank scores.

What is split and what is not. The backbone runs forward ONCE on the whole local batch (its
batch norm sees the same batch as without overlap, so statistics, running buffers and
gradients are unchanged), and its backward runs once with the accumulated feature gradient. Only
the classifier is micro-batched: micro-batch j holds samples [lo_j, hi_j) of every rank's batch
(sizes differ by at most one when m does not divide b). Everything chosen per step is chosen
once, from the whole global batch, exactly as the one-batch step does: the labels' allgather,
the sampled rows (`sampled`), the active classes and random negatives (`knn`), and the one leaf
of the step's rows, whose `.grad` accumulates the row gradients of all micro-batches; the
classifier's sparse row update then runs once per step (`ShardedClassifier.step`). Per sample
the softmax is the same (a sample's loss depends on its own feature and the rows only), each
micro-batch backpropagates its samples' share sum / N of the global-mean loss, so the shares
add up to the loss, the feature gradients and the row gradients of the one-batch step; only the
order of float additions differs.

Interleaving. Each micro-batch is a generator that computes up to its next exchange, starts it
(mpi/nonblocking.py) and yields the Pending; `interleave` runs them round robin, so micro-batch
j's exchange travels while j+1 computes, and resumes j with the result. Every rank runs the
same schedule, so the collectives start in the same order everywhere. Exchanges per micro-batch:
features (Iallgatherv), then for `full`/`sampled` the row max and the row sums of the sharded
softmax (Iallreduce, Megatron's vocab-parallel cross-entropy as in app/classifier/softmax.py),
for `knn` the pair similarities and their gradients (Ialltoallv both ways), then the feature
gradients (Ireduce_scatter).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from app.classifier.knn_softmax import (
    active_classes,
    assemble,
    pair_similarities,
    plan_pairs,
)
from app.classifier.softmax import (
    apply_margin_,
    class_logits,
    local_exp_sums,
    local_row_max,
    logit_grad_,
)
from app.training import data_parallel
from app.training.sparse_overlap import OverlappedSparseExchange
from mpi import collectives, nonblocking
from mpi.partition import class_owner
from mpi.world import Traffic


def micro_slices(batch: int, micro_batches: int) -> list[tuple[int, int]]:
    """[lo, hi) of each micro-batch of a `batch`-sample batch: `micro_batches` parts whose sizes
    differ by at most one (at most `batch` parts; none empty)."""
    parts = max(1, min(micro_batches, batch))
    bounds = [batch * j // parts for j in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def interleave(micro) -> list:
    """Run generators round robin: each yields a Pending and is resumed with its result when
    its turn comes again. Returns their return values in order."""
    results, active = [None] * len(micro), []
    for j, gen in enumerate(micro):
        try:
            active.append((j, gen, next(gen)))
        except StopIteration as stop:
            results[j] = stop.value
    while active:
        still = []
        for j, gen, pending in active:
            try:
                still.append((j, gen, gen.send(pending.wait())))
            except StopIteration as stop:
                results[j] = stop.value
        active = still
    return results


def build(comm_cfg, classifier, sparse) -> StepPipeline | None:
    """The pipeline of `comm.overlap: true` (None when off); `sparse` is the trainer's
    SparseGradients or None (dense gradients)."""
    if not comm_cfg.overlap:
        return None
    return StepPipeline(classifier, comm_cfg.micro_batches, sparse)


class StepPipeline:
    """The micro-batched classifier loss of `classifier` (app/classifier/sharded.py), and the
    backward and updates after it."""

    def __init__(self, classifier, micro_batches: int, sparse=None):
        self.classifier, self.micro_batches = classifier, micro_batches
        self.world, self.cfg = classifier.world, classifier.cfg
        self.hooks = OverlappedSparseExchange(sparse) if sparse is not None else None

    def record(self) -> dict:
        """What metrics.jsonl records of the pipeline on every line."""
        return {"micro_batches": self.micro_batches}

    def update(self, feat_bD: torch.Tensor, grad_bD: torch.Tensor, optimizer, step: int,
               row_lr: float, first_free: int | None = None) -> tuple[int, float]:
        """After `loss`: the backbone's backward with the feature gradient, its gradient
        exchange (Horovod's hooks, dense, or ours, sparse, start each tensor's as backward
        produces it), the classifier's row update while they travel, then the backbone's
        optimizer step. `first_free` (train.freeze_backbone_steps): only the classifier rows
        from that class on learn, the backbone not. Returns (rows updated, Horovod wait s)."""
        if first_free is not None:
            return self.classifier.step(row_lr, first_free), 0.0
        if self.hooks is not None:
            self.hooks.arm(step)
        feat_bD.backward(grad_bD)
        rows = self.classifier.step(row_lr)
        if self.hooks is None:
            return rows, data_parallel.step(self.world, optimizer)
        self.hooks.finish()
        optimizer.step()
        return rows, 0.0

    def loss(self, feat_bD: torch.Tensor, labels_b: torch.Tensor,
             step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(global-batch mean loss, d loss / d feat_bD) after the classifier's forward and
        backward: the one-batch `ShardedClassifier.loss` + backward, micro-batched. The row
        gradients wait in the classifier for its `step()` (or `discard()`)."""
        world, clf = self.world, self.classifier
        batch = feat_bD.shape[0]
        sizes = clf._equal_batch_sizes(batch)
        labels_N = collectives.allgather(world, labels_b, sizes, Traffic.LABELS)
        feat_bD = feat_bD.detach()
        parts = micro_slices(batch, self.micro_batches)
        # Global rows (rank-major, b per rank) of each micro-batch.
        rank_lo = torch.arange(world.size).unsqueeze(1) * batch
        rows = [(rank_lo + torch.arange(lo, hi)).reshape(-1) for lo, hi in parts]
        if self.cfg.mode == "knn":
            micro, finish = self._knn(feat_bD, labels_N, parts, rows, step)
        else:
            micro, finish = self._softmax(feat_bD, labels_N, parts, rows, step)
        results = interleave(micro)
        grad_bD = torch.cat([grad for _, grad in results])
        return finish(torch.stack([part for part, _ in results]).sum()), grad_bD

    def _softmax(self, feat_bD, labels_N, parts, rows, step):
        """`full` / `sampled`: the step's columns from the whole global batch, then one
        generator per micro-batch."""
        clf, n_global = self.classifier, labels_N.shape[0]
        cols = clf.columns(labels_N, step)
        weight = clf.weight_cD
        leaf = (weight.detach() if cols.rows_c is None else weight[cols.rows_c]).requires_grad_()
        clf.hold(cols.rows_c, leaf)
        micro = [self._softmax_micro(feat_bD[lo:hi], cols.target_N[r], leaf, n_global)
                 for (lo, hi), r in zip(parts, rows)]
        return micro, lambda loss_sum: loss_sum / n_global

    def _softmax_micro(self, feat_mD, target_M, leaf, n_global):
        """One micro-batch of the sharded cross-entropy (forward and backward)."""
        world, cfg = self.world, self.cfg
        m = feat_mD.shape[0]
        feat_MD = yield nonblocking.iallgather(world, feat_mD, [m] * world.size, Traffic.FEATURES)
        feat_MD = feat_MD.requires_grad_()
        logits_Mc = class_logits(feat_MD, leaf, cfg.logit, cfg.scale)
        apply_margin_(logits_Mc, target_M, cfg.logit, cfg.scale, cfg.margin, cfg.margin_type)
        with torch.no_grad():
            local_max = local_row_max(logits_Mc)
        max_M = yield nonblocking.iallreduce(world, local_max, "max", Traffic.LOGITS)
        with torch.no_grad():
            exp_Mc, stats = local_exp_sums(logits_Mc.detach(), max_M, target_M)
        sums_M2 = yield nonblocking.iallreduce(world, stats, kind=Traffic.LOGITS)
        with torch.no_grad():
            sum_exp_M = sums_M2[:, 0]
            loss_M = torch.log(sum_exp_M) + max_M - sums_M2[:, 1]
            # d (sum of the global batch's losses / N) / d logits: softmax - one-hot, / N
            # (the one-batch backward with the mean's gradient 1/N).
            grad_N = torch.full((logits_Mc.shape[0],), 1.0 / n_global, dtype=logits_Mc.dtype)
            grad_Mc = logit_grad_(exp_Mc.div_(sum_exp_M.unsqueeze(1)), grad_N, target_M)
        logits_Mc.backward(grad_Mc)
        grad_mD = yield nonblocking.ireduce_scatter(world, feat_MD.grad, [m] * world.size,
                                                    Traffic.FEATURE_GRADIENTS)
        return loss_M.sum(), grad_mD

    def _knn(self, feat_bD, labels_N, parts, rows, step):
        """`knn`: the active classes of the whole global batch (one draw of the random
        negatives), the leaf of every local row any pair of the step touches, then one
        generator per micro-batch."""
        clf, world = self.classifier, self.world
        if clf.graph is None:
            raise ValueError("softmax.mode=knn needs a KNN graph; call set_graph() first")
        cls_NA, valid_NA = active_classes(labels_N, clf.graph, clf.num_classes,
                                          self.cfg.random_negatives, clf._generator(step, 0))
        owner_NA = torch.from_numpy(class_owner(cls_NA.numpy(), clf.num_classes, world.size))
        rows_u = torch.unique(cls_NA[owner_NA == world.rank] - clf.start)
        leaf = clf.weight_cD[rows_u].requires_grad_()
        clf.hold(rows_u, leaf)
        micro = [self._knn_micro(feat_bD[lo:hi], cls_NA[r], valid_NA[r], rows_u, leaf,
                                 labels_N.shape[0]) for (lo, hi), r in zip(parts, rows)]
        clf.pairs_last_step = int((owner_NA == world.rank).sum())

        def finish(loss_sum):
            return collectives.allreduce(world, (loss_sum / labels_N.shape[0]).reshape(1))[0]
        return micro, finish

    def _knn_micro(self, feat_mD, cls_MA, valid_MA, rows_u, leaf, n_global):
        """One micro-batch of the KNN softmax (app/classifier/sharded.py `_knn_loss` and its
        backward)."""
        world, cfg, clf = self.world, self.cfg, self.classifier
        m, num_active = feat_mD.shape[0], cls_MA.shape[1]
        plan = plan_pairs(cls_MA, valid_MA, clf.num_classes, world.rank, world.size, m)
        local_p = cls_MA.reshape(-1)[plan.mine_p] - clf.start
        inv_p = torch.searchsorted(rows_u, local_p)
        feat_MD = yield nonblocking.iallgather(world, feat_mD, [m] * world.size, Traffic.FEATURES)
        feat_MD = feat_MD.requires_grad_()
        sim_p = pair_similarities(feat_MD, leaf, inv_p, plan.mine_p // num_active, cfg.logit)
        sim_recv = yield nonblocking.ialltoallv(world, sim_p.detach().unsqueeze(1),
                                                plan.send_counts, plan.recv_counts,
                                                Traffic.LOGITS)
        sim_recv = sim_recv.squeeze(1).requires_grad_()
        sim_mA = assemble(sim_recv, plan, m)
        logits_mA = sim_mA * cfg.scale if cfg.logit == "cosine" else sim_mA
        target_m = torch.zeros(m, dtype=torch.int64)  # column 0 is the label
        apply_margin_(logits_mA, target_m, cfg.logit, cfg.scale, cfg.margin, cfg.margin_type)
        lo = world.rank * m
        logits_mA = logits_mA.masked_fill(~valid_MA[lo:lo + m], -torch.inf)
        loss_sum = F.cross_entropy(logits_mA, target_m, reduction="sum")
        (loss_sum / n_global).backward()
        grad_p = yield nonblocking.ialltoallv(world, sim_recv.grad.unsqueeze(1),
                                              plan.recv_counts, plan.send_counts, Traffic.LOGITS)
        sim_p.backward(grad_p.squeeze(1))
        grad_MD = feat_MD.grad if feat_MD.grad is not None else torch.zeros_like(feat_MD)
        grad_mD = yield nonblocking.ireduce_scatter(world, grad_MD, [m] * world.size,
                                                    Traffic.FEATURE_GRADIENTS)
        return loss_sum.detach(), grad_mD
