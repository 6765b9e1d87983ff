"""The local part of the sparse backbone-gradient exchange (one rank, no MPI): the sampled top-k
selection, the ratio warm-up, DGC's momentum correction and masking against a hand-written
reference, the optimizer it runs with, the residual state, and the config checks."""
import math

import pytest
import torch

from app.config import CommConfig, OptimConfig, load_config
from app.training import data_parallel
from app.training.sparse_grad import SparseGradients, select
from mpi.world import fake_world


def test_ratio_one_selects_everything_zeros_included():
    v = torch.tensor([0.0, -2.0, 0.0, 1.0])
    assert select(v, 1.0, torch.Generator().manual_seed(0)).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1])
def test_sampled_selection_is_a_top_set_of_about_k(ratio):
    v = torch.randn(200_000, generator=torch.Generator().manual_seed(1)) ** 3
    index = select(v, ratio, torch.Generator().manual_seed(2))
    k = math.ceil(ratio * v.numel())
    assert k / 2 <= index.numel() <= 2 * k
    assert torch.all(index[1:] > index[:-1])  # ascending, distinct
    chosen = torch.zeros(v.numel(), dtype=torch.bool)
    chosen[index] = True
    assert v[chosen].abs().min() >= v[~chosen].abs().max()  # every sent entry beats every kept
    assert torch.equal(index, select(v, ratio, torch.Generator().manual_seed(2)))


def test_too_many_at_the_threshold_are_cut_to_an_exact_top_k():
    v = torch.ones(100_000)  # every entry ties at the sampled threshold
    v[:5] = 2.0
    index = select(v, 0.01, torch.Generator().manual_seed(0))
    assert index.numel() == 1000 and set(range(5)) <= set(index.tolist())


def test_ratio_warms_up_geometrically():
    model = torch.nn.Linear(4, 4)
    cfg = CommConfig(gradients="sparse", sparse_ratio=0.01, sparse_warmup_steps=4)
    sparse = SparseGradients(fake_world(), model.named_parameters(), cfg, OptimConfig(), 0)
    assert [sparse.ratio(t) for t in (0, 1, 3, 4, 100)] == pytest.approx(
        [0.01 ** 0.25, 0.01 ** 0.5, 0.01, 0.01, 0.01])
    none = SparseGradients(fake_world(), model.named_parameters(),
                           CommConfig(gradients="sparse", sparse_ratio=0.01), OptimConfig(), 0)
    assert none.ratio(0) == 0.01


def dgc_reference(grads, w, m, wd, ratio):
    """Lin et al., Algorithm 1 on one rank (exact top-k): the exchanged gradient per step."""
    u, v, out = torch.zeros_like(w), torch.zeros_like(w), []
    for g in grads:
        u = m * u + g + wd * w
        v = v + u
        k = math.ceil(ratio * w.numel())
        mask = torch.zeros(w.numel(), dtype=torch.bool)
        mask[torch.topk(v.abs().reshape(-1), k).indices] = True
        mask = mask.reshape(w.shape)
        out.append(torch.where(mask, v, 0))
        u, v = torch.where(mask, 0, u), torch.where(mask, 0, v)
    return out, u, v


def test_momentum_correction_and_masking_follow_the_paper():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 6, bias=False).double()  # 48 entries: an exact top-k
    cfg = CommConfig(gradients="sparse", sparse_ratio=0.25, dense_below=10,
                     momentum_correction=True)
    optim = OptimConfig(momentum=0.9, weight_decay=0.01)
    sparse = SparseGradients(fake_world(), model.named_parameters(), cfg, optim, 0)
    grads = [torch.randn(6, 8, dtype=torch.float64) for _ in range(4)]
    w = model.weight.detach().clone()  # the weights do not move: only the exchange is tested
    expect, u, v = dgc_reference(grads, w, 0.9, 0.01, 0.25)
    for step, g in enumerate(grads):
        model.weight.grad = g.clone()
        sparse.exchange(step)
        torch.testing.assert_close(model.weight.grad, expect[step], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse.velocity["weight"], u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse.residual["weight"], v, rtol=1e-12, atol=1e-12)


def test_momentum_correction_keeps_the_dense_tensors_momentum():
    model = torch.nn.Linear(8, 6).double()
    cfg = CommConfig(gradients="sparse", dense_below=10, momentum_correction=True)
    sparse = SparseGradients(fake_world(), model.named_parameters(), cfg,
                             OptimConfig(momentum=0.5, weight_decay=0.0), 0)
    assert [n for n, _ in sparse.dense] == ["bias"]
    for step in range(3):
        model.weight.grad, model.bias.grad = torch.zeros(6, 8).double(), torch.ones(6).double()
        sparse.exchange(step)
    assert torch.equal(model.bias.grad, torch.full((6,), 1 + 0.5 + 0.25).double())


def test_optimizer_with_momentum_correction_is_plain_sgd():
    model = torch.nn.Linear(4, 4)
    comm = CommConfig(gradients="sparse", momentum_correction=True)
    opt = data_parallel.build_backbone_optimizer(fake_world(), model, OptimConfig(), comm)
    assert type(opt) is torch.optim.SGD
    assert opt.param_groups[0]["momentum"] == 0 and opt.param_groups[0]["weight_decay"] == 0
    plain = data_parallel.build_backbone_optimizer(fake_world(), model, OptimConfig(),
                                                   CommConfig(gradients="sparse"))
    assert plain.param_groups[0]["momentum"] == 0.9


def test_state_round_trip_and_regrouping_sums_the_old_ranks():
    model = torch.nn.Linear(40, 30)
    cfg = CommConfig(gradients="sparse", momentum_correction=True, dense_below=100)
    states = []
    for rank in range(3):
        sparse = SparseGradients(fake_world(), model.named_parameters(), cfg, OptimConfig(), 0)
        sparse.residual["weight"].fill_(rank + 1)
        sparse.velocity["bias"].fill_(10 * (rank + 1))
        states.append(sparse.state_dict())
    target = SparseGradients(fake_world(), model.named_parameters(), cfg, OptimConfig(), 0)
    target.load_states(states)
    assert target.residual["weight"].eq(6).all() and target.velocity["bias"].eq(60).all()
    target.load_states([])
    assert not target.residual["weight"].any()
    other = torch.nn.Linear(40, 31)
    misfit = SparseGradients(fake_world(), other.named_parameters(), cfg, OptimConfig(), 0)
    with pytest.raises(ValueError, match="residual of weight: saved shape"):
        misfit.load_states(states)


@pytest.mark.parametrize("sets,message", [
    (["comm.sparse_ratio=0.5"], "comm.sparse_ratio: set, but it only acts with "
                                "comm.gradients=sparse"),
    (["comm.momentum_correction=true"], "comm.momentum_correction: set, but"),
    (["comm.gradients=sparse", "comm.momentum_correction=true", "optim.name=adamw"],
     "comm.momentum_correction: needs optim.name=sgd"),
    (["comm.gradients=sparse", "comm.sparse_ratio=0"], "comm.sparse_ratio: 0.0 out of range"),
    (["comm.gradients=sparse", "comm.dense_below=-1"], "comm.dense_below: -1 out of range"),
    (["comm.micro_batches=3"], "comm.micro_batches: set, but it only acts with "
                               "comm.overlap=true"),
    (["comm.overlap=true", "comm.micro_batches=0"], "comm.micro_batches: 0 out of range"),
    (["comm.overlap=true", "comm.micro_batches=65", "train.batch_size=64"],
     "comm.micro_batches: 65 micro-batches of a train.batch_size=64 batch; set at most 64"),
])
def test_config_checks(sets, message):
    with pytest.raises(ValueError, match="^" + message):
        load_config(None, sets)
