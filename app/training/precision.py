"""Mixed precision (`train.precision`): where bfloat16 is used and where it is not.

`bf16`: the backbone's forward pass runs under torch.autocast(bfloat16) on the device its
input is on (matmuls and convolutions in bfloat16, reductions as autocast keeps them); its
features are cast to float32 before they reach the classifier, so the classifier's logits, the
softmax, the loss and the row gradients are float32 whatever the backbone computed in, and the
backbone's gradients come back through the cast as float32 parameters' gradients. `fp32`: the
forward pass exactly as without this module (no autocast, no cast).

Used by the trainer (app/training/trainer.py) and the one-GPU benchmark (app/bench/gpu.py).
"""
from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16")


def backbone_features(backbone: torch.nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """The backbone's features of `x` in `precision` (see the module docstring)."""
    if precision == "fp32":
        return backbone(x)
    if precision != "bf16":
        raise ValueError(f"precision: {precision!r}, expected one of {PRECISIONS}")
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
        feat = backbone(x)
    return feat.float()
