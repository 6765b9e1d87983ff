"""LARS and LAMB (app/training/optimizers.py) against float64 references written here in numpy
from the papers' formulas, over a small model with a weight matrix, a bias, a batch-norm layer
and a zero-initialised weight matrix (trust ratio 1 on its first step); plus the 1-D exclusion,
resuming from a saved state, and the config's refusals."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from app.config import load_config
from app.training import optimizers
from app.training.optimizers import Lamb, Lars

LRS = [0.5, 0.3, 0.2]  # the trainer sets each step's lr in the groups (schedule)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2, bias=False)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
        model[2].weight.zero_()
    return model


def gradients(model: nn.Module, steps: int) -> list[list[np.ndarray]]:
    """Seeded gradients, of very different sizes per tensor (so trust ratios differ)."""
    rng = np.random.default_rng(1)
    shapes = [tuple(p.shape) for p in model.parameters()]
    return [[rng.normal(size=s) * 10.0 ** (i - 2) for i, s in enumerate(shapes)]
            for _ in range(steps)]


def run_torch(model: nn.Module, opt, grads, lrs=LRS) -> list[list[np.ndarray]]:
    """Parameters after each step."""
    out = []
    for lr, step_grads in zip(lrs, grads):
        for group in opt.param_groups:
            group["lr"] = lr
        for p, g in zip(model.parameters(), step_grads):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
        out.append([p.detach().numpy().copy() for p in model.parameters()])
    return out


def lars_reference(weights, grads, lrs, momentum, wd, eta):
    w = [x.copy() for x in weights]
    v = [np.zeros_like(x) for x in weights]
    out = []
    for lr, step_grads in zip(lrs, grads):
        for i, g in enumerate(step_grads):
            if w[i].ndim >= 2:
                w_norm, g_norm = np.sqrt(np.sum(w[i] ** 2)), np.sqrt(np.sum(g ** 2))
                denom = g_norm + wd * w_norm
                trust = eta * w_norm / denom if w_norm > 0 and denom > 0 else 1.0
                update = trust * (g + wd * w[i])
            else:
                update = g
            v[i] = momentum * v[i] + update
            w[i] = w[i] - lr * v[i]
        out.append([x.copy() for x in w])
    return out


def lamb_reference(weights, grads, lrs, betas, eps, wd):
    b1, b2 = betas
    w = [x.copy() for x in weights]
    m = [np.zeros_like(x) for x in weights]
    v = [np.zeros_like(x) for x in weights]
    out = []
    for t, (lr, step_grads) in enumerate(zip(lrs, grads), start=1):
        for i, g in enumerate(step_grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            r = (m[i] / (1 - b1 ** t)) / (np.sqrt(v[i] / (1 - b2 ** t)) + eps)
            trust = 1.0
            if w[i].ndim >= 2:
                r = r + wd * w[i]
                w_norm, r_norm = np.sqrt(np.sum(w[i] ** 2)), np.sqrt(np.sum(r ** 2))
                trust = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
            w[i] = w[i] - lr * trust * r
        out.append([x.copy() for x in w])
    return out


def initial(model):
    return [p.detach().numpy().copy() for p in model.parameters()]


def assert_close(got, want):
    for step, (a_step, b_step) in enumerate(zip(got, want), start=1):
        for i, (a, b) in enumerate(zip(a_step, b_step)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15,
                                       err_msg=f"step {step}, parameter {i}")


def test_lars_equals_the_float64_reference_over_three_steps():
    model = small_model()
    grads = gradients(model, 3)
    want = lars_reference(initial(model), grads, LRS, momentum=0.9, wd=0.01, eta=0.02)
    opt = Lars(model.parameters(), momentum=0.9, weight_decay=0.01, trust_coefficient=0.02)
    got = run_torch(model, opt, grads)
    assert_close(got, want)
    # The zero-initialised weight moved at step 1 (trust ratio 1, not 0).
    assert np.abs(got[0][4]).max() > 0


def test_lamb_equals_the_float64_reference_over_three_steps():
    model = small_model()
    grads = gradients(model, 3)
    want = lamb_reference(initial(model), grads, LRS, betas=(0.8, 0.99), eps=1e-6, wd=0.01)
    opt = Lamb(model.parameters(), betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)
    got = run_torch(model, opt, grads)
    assert_close(got, want)
    assert np.abs(got[0][4]).max() > 0


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_biases_and_norm_parameters_get_the_plain_update(name):
    """1-D tensors: exactly torch's SGD with momentum (LARS) or Adam (LAMB), without weight
    decay, whatever trust_coefficient and weight_decay are; 2-D tensors are adapted."""
    model, plain_model = small_model(), small_model()
    grads = gradients(model, 3)
    if name == "lars":
        opt = Lars(model.parameters(), momentum=0.9, weight_decay=0.1, trust_coefficient=0.05)
        plain = torch.optim.SGD(plain_model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = Lamb(model.parameters(), betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
        plain = torch.optim.Adam(plain_model.parameters(), lr=0.1, betas=(0.8, 0.99), eps=1e-6)
    got, want = run_torch(model, opt, grads), run_torch(plain_model, plain, grads)
    one_d = [i for i, p in enumerate(model.parameters()) if p.ndim == 1]
    assert len(one_d) == 3  # the Linear bias, the BatchNorm weight and bias
    for step_got, step_want in zip(got, want):
        for i in one_d:
            np.testing.assert_allclose(step_got[i], step_want[i], rtol=1e-13, atol=1e-15)
    for i in (0, 4):  # the zero weight matrix is plain at step 1 only (trust 1)
        assert not np.allclose(got[-1][i], want[-1][i]), f"parameter {i} was not adapted"


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_a_saved_state_resumes_the_uninterrupted_steps_exactly(name):
    """state_dict -> torch.save -> torch.load(weights_only=True) -> load_state in a new
    optimizer: steps 3-4 are bit for bit those of a run without the interruption."""
    make = {"lars": lambda ps: Lars(ps, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02),
            "lamb": lambda ps: Lamb(ps, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)}[name]
    lrs = [0.5, 0.3, 0.2, 0.1]
    model = small_model()
    grads = gradients(model, 4)
    whole = run_torch(model, make(model.parameters()), grads, lrs)
    model = small_model()
    opt = make(model.parameters())
    run_torch(model, opt, grads[:2], lrs[:2])
    buffer = io.BytesIO()
    torch.save({"backbone": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model = small_model()
    model.load_state_dict(saved["backbone"])
    opt = make(model.parameters())
    optimizers.load_state(opt, saved["optimizer"])
    resumed = run_torch(model, opt, grads[2:], lrs[2:])
    for a_step, b_step in zip(resumed, whole[2:]):
        for a, b in zip(a_step, b_step):
            assert np.array_equal(a, b)


def test_resuming_takes_the_configs_hyperparameters_and_refuses_another_optimizers_state():
    model = small_model()
    opt = Lars(model.parameters(), trust_coefficient=0.02)
    run_torch(model, opt, gradients(model, 1))
    again = Lars(model.parameters(), trust_coefficient=0.05)
    optimizers.load_state(again, opt.state_dict())
    assert again.param_groups[0]["trust_coefficient"] == 0.05
    assert again.state[next(model.parameters())]["momentum_buffer"] is not None
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="not this optimizer's"):
        optimizers.load_state(sgd, opt.state_dict())
    with pytest.raises(ValueError, match="not this optimizer's"):
        optimizers.load_state(Lamb(model.parameters()), opt.state_dict())


def test_rebuilt_from_its_parameter_groups_keeps_the_hyperparameters():
    """Horovod's DistributedOptimizer re-creates the class from `param_groups` alone."""
    model = small_model()
    opt = Lamb(model.parameters(), lr=0.3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)
    rebuilt = Lamb(opt.param_groups)
    for key in ("lr", "betas", "eps", "weight_decay"):
        assert rebuilt.param_groups[0][key] == opt.param_groups[0][key]


def test_build_reads_the_config():
    cfg = load_config(None, ["optim.name=lars", "optim.trust_coefficient=0.02",
                             "optim.momentum=0.8", "optim.weight_decay=0.01"]).optim
    group = optimizers.build(list(small_model().parameters()), cfg).param_groups[0]
    assert (group["trust_coefficient"], group["momentum"], group["weight_decay"]) == (0.02, 0.8,
                                                                                      0.01)
    cfg = load_config(None, ["optim.name=lamb", "optim.eps=1e-6", "optim.betas=[0.8,0.9]"]).optim
    opt = optimizers.build(list(small_model().parameters()), cfg)
    assert isinstance(opt, Lamb) and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert opt.param_groups[0]["eps"] == 1e-6


@pytest.mark.parametrize("sets,message", [
    (["optim.trust_coefficient=0.01"],
     "optim.trust_coefficient: 0.01 is not read by optim.name=sgd"),
    (["optim.name=lamb", "optim.trust_coefficient=0.01"], "optim.trust_coefficient"),
    (["optim.name=lars", "optim.eps=1e-6"], "optim.eps: 1e-06 is not read by optim.name=lars"),
    (["optim.eps=1e-6"], "optim.eps"),
    (["optim.name=lars", "optim.betas=[0.8,0.9]"], "optim.betas"),
    (["optim.name=lamb", "optim.momentum=0.5"], "optim.momentum"),
    (["optim.name=lars", "optim.trust_coefficient=0"],
     "optim.trust_coefficient: 0.0 out of range, must be > 0"),
    (["optim.name=lamb", "optim.eps=0"], "optim.eps: 0.0 out of range"),
    (["optim.name=lion"], "optim.name: 'lion' not one of sgd|adamw|lars|lamb"),
])
def test_config_refuses_a_key_the_optimizer_does_not_read(sets, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("|", r"\|")):
        load_config(None, sets)


@pytest.mark.parametrize("sets, key", [(["optim.betas=[0.5,0.9]"], "optim.betas"),
                                       (["optim.name=adamw", "optim.momentum=0.5"],
                                        "optim.momentum")])
def test_sgd_and_adamw_refuse_what_they_do_not_read(sets, key):
    with pytest.raises(ValueError, match=f"^{key}: .* is not read by optim.name="):
        load_config(None, sets)
