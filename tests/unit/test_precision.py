"""train.precision (app/training/precision.py): fp32 is the plain forward pass, bit for bit;
bf16 runs the backbone's matmuls in bfloat16 and hands float32 features and gradients on."""
import pytest
import torch

from app.backbones import build_backbone
from app.config import ModelConfig
from app.training.precision import backbone_features

CASES = {"mlp": (ModelConfig(embedding_dim=8, mlp_hidden=16), (12,)),
         "resnet": (ModelConfig(backbone="resnet", embedding_dim=8, resnet_blocks=[1],
                                resnet_width=4), (8, 8, 3))}


def _inputs(shape):
    gen = torch.Generator().manual_seed(1)
    if len(shape) == 1:
        return torch.randn(6, *shape, generator=gen)
    return torch.randint(0, 256, (6, *shape), generator=gen, dtype=torch.uint8)


def _forward_backward(name, precision):
    cfg, shape = CASES[name]
    torch.manual_seed(0)
    model = build_backbone(cfg, shape)
    linear_out = []
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.register_forward_hook(lambda _m, _i, out: linear_out.append(out.dtype))
    feat = backbone_features(model, _inputs(shape), precision)
    (feat ** 2).sum().backward()
    return feat, [p.grad for p in model.parameters()], set(linear_out)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fp32_is_the_plain_forward_bit_for_bit(name):
    cfg, shape = CASES[name]
    torch.manual_seed(0)
    model = build_backbone(cfg, shape)
    plain = model(_inputs(shape))
    (plain ** 2).sum().backward()
    feat, grads, dtypes = _forward_backward(name, "fp32")
    assert dtypes == {torch.float32} and torch.equal(feat, plain)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_computes_in_bf16_and_returns_float32(name):
    feat32, _, _ = _forward_backward(name, "fp32")
    feat, grads, dtypes = _forward_backward(name, "bf16")
    assert dtypes == {torch.bfloat16}  # every matmul / convolution ran in bf16
    assert feat.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert not torch.equal(feat, feat32)
    # To bf16's precision (8-bit significand) through a few layers.
    torch.testing.assert_close(feat, feat32, rtol=5e-2, atol=5e-2)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision: 'fp16'"):
        backbone_features(torch.nn.Identity(), torch.zeros(1, 2), "fp16")
