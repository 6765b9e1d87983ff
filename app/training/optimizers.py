"""The backbone's optimizers: torch's SGD and AdamW, and our large-batch LARS and LAMB.

LARS and LAMB scale each parameter tensor's update by a layer-wise trust ratio, so the step a
layer takes is proportional to its weight norm whatever its gradient's size (large global
batches with large learning rates). They are for the BACKBONE only; the classifier shard keeps
its row-sparse `RowSGD` (app/classifier/sharded.py), which updates only the rows a step touched.

Tensors with fewer than 2 dimensions (biases, batch-norm and layer-norm weights and biases) get
no adaptation and no weight decay: LARS gives them the plain SGD-momentum update, LAMB the plain
Adam update (You et al. 2017, 2019).

Both read `p.grad` as it is when `step()` runs. Under Horovod that is after `synchronize()`:
the SUM over ranks of each rank's share of the global-batch mean loss
(app/training/data_parallel.py), which is the gradient a one-process run with the same global
batch computes, so the trust ratios, and the whole run, are those of that one process.

Optimizer state is plain tensors and ints (`torch.load(weights_only=True)` reads it back).
"""
from __future__ import annotations

import torch


def build(params: list[torch.nn.Parameter], optim_cfg) -> torch.optim.Optimizer:
    """The optimizer `optim_cfg.name` (sgd|adamw|lars|lamb) over `params`, not yet wrapped by
    Horovod; the keys each one reads are listed in app/config.py's OptimConfig."""
    name = optim_cfg.name
    if name == "adamw":
        return torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
                                 eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)
    if name == "lars":
        return Lars(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                    weight_decay=optim_cfg.weight_decay,
                    trust_coefficient=optim_cfg.trust_coefficient)
    if name == "lamb":
        return Lamb(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                    weight_decay=optim_cfg.weight_decay)
    return torch.optim.SGD(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                           weight_decay=optim_cfg.weight_decay)


# Implementation switches of torch's optimizers, which its load_state_dict fills in itself when a
# state of another torch version lacks them: no sign of another optimizer.
_TORCH_FLAGS = {"foreach", "maximize", "capturable", "differentiable", "fused",
                "decoupled_weight_decay"}


def load_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a checkpoint's optimizer state (moments, momentum, step counts) into `optimizer`.

    The hyperparameters stay those of `optimizer`, i.e. of the config the run resumes with (a
    changed optim.* key takes effect; torch's own load_state_dict would bring back the saved
    ones). Raises ValueError when the state is another optimizer's (its parameter groups carry
    other hyperparameters: e.g. an sgd checkpoint resumed with optim.name=lars)."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise ValueError("the saved optimizer state has another number of parameter groups")
    for group, saved_group in zip(optimizer.param_groups, groups):
        differ = (set(group) ^ set(saved_group)) - _TORCH_FLAGS
        if differ:
            extra = sorted(differ)
            raise ValueError(f"the saved optimizer state is not this optimizer's (hyperparameters "
                             f"differ: {', '.join(extra)}); was optim.name changed?")
    kept = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, hyper in zip(optimizer.param_groups, kept):
        group.update(hyper)


def _trust(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator where both are > 0, else 1 (a zero weight or zero update)."""
    ok = (numerator > 0) & (denominator > 0)
    return torch.where(ok, numerator / torch.where(ok, denominator, 1.0), 1.0)


def _closure_loss(closure):
    """torch.optim's step(closure) convention: the closure's loss, computed with gradients."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _with_grad(param_groups):
    """(group, parameter) for every parameter that has a gradient."""
    return ((group, p) for group in param_groups for p in group["params"] if p.grad is not None)


def _adapted(p: torch.Tensor) -> bool:
    """Whether `p` gets the trust ratio and weight decay: not biases or norm parameters."""
    return p.ndim >= 2


class Lars(torch.optim.Optimizer):
    """LARS (You, Gitman, Ginsburg 2017), per parameter tensor w with gradient g:

        trust = eta ||w|| / (||g|| + wd ||w||)     (1 when ||w|| or the denominator is 0)
        v <- momentum v + trust (g + wd w)
        w <- w - lr v

    lr outside the momentum buffer, as torch's SGD (the project's `sgd`) keeps it. Tensors of
    fewer than 2 dimensions: v <- momentum v + g, w <- w - lr v (no trust ratio, no decay).
    Every argument has a default, as Horovod's DistributedOptimizer re-creates the class from
    the parameter groups alone."""

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001) -> None:
        if not (lr >= 0 and 0 <= momentum < 1 and weight_decay >= 0 and trust_coefficient > 0):
            raise ValueError(f"Lars: bad lr {lr}, momentum {momentum}, weight_decay "
                             f"{weight_decay} or trust_coefficient {trust_coefficient}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "trust_coefficient": trust_coefficient})

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group, p in _with_grad(self.param_groups):
            wd, eta = group["weight_decay"], group["trust_coefficient"]
            d_p = p.grad
            if _adapted(p):
                w_norm = torch.linalg.vector_norm(p)
                g_norm = torch.linalg.vector_norm(d_p)
                trust = _trust(eta * w_norm, g_norm + wd * w_norm)
                d_p = d_p.add(p, alpha=wd).mul_(trust)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = d_p.clone()
            else:
                state["momentum_buffer"].mul_(group["momentum"]).add_(d_p)
            p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019), per parameter tensor w with gradient g at its t-th step:

        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
        r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd w
        w <- w - lr (||w|| / ||r||) r      (ratio 1 when either norm is 0)

    Tensors of fewer than 2 dimensions: r without wd w and ratio 1 (Adam's update). State per
    tensor: `step` (int), `exp_avg`, `exp_avg_sq`. Every argument has a default (Horovod)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if not (lr >= 0 and all(0 <= b < 1 for b in betas) and eps > 0 and weight_decay >= 0):
            raise ValueError(f"Lamb: bad lr {lr}, betas {betas}, eps {eps} or "
                             f"weight_decay {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group, p in _with_grad(self.param_groups):
            (beta1, beta2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
            g = p.grad
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            r = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt_().add_(eps))
            if _adapted(p):
                r.add_(p, alpha=wd)
                r.mul_(_trust(torch.linalg.vector_norm(p), torch.linalg.vector_norm(r)))
            p.add_(r, alpha=-group["lr"])
        return loss
