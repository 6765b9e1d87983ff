"""app.backbones: output shapes, a ResNet that learns, deterministic augmentation, input errors."""
import re

import pytest
import torch
import torch.nn.functional as F

from app.backbones import augment_images, build_backbone
from app.config import ModelConfig


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from threads, and two threads on shared cores are 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(b, height=8, width=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, height, width, 3), generator=gen, dtype=torch.uint8)


def test_mlp_shapes_and_dtype():
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_dim=8, mlp_hidden=16, mlp_layers=2)
    feat_bD = build_backbone(cfg, (5,))(torch.randn(4, 5))
    assert feat_bD.shape == (4, 8) and feat_bD.dtype == torch.float32
    # float32 shards feed a float64 model; no hidden layers leaves one projection.
    model = build_backbone(ModelConfig(embedding_dim=3, mlp_layers=0), (5,)).double()
    assert model(torch.randn(4, 5)).dtype == torch.float64
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 1


def test_resnet_shapes_and_input_scaling():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet", embedding_dim=6, resnet_blocks=[1, 2], resnet_width=4)
    model = build_backbone(cfg, (8, 8, 3)).eval()
    x_bHW3 = _images(3)
    feat_bD = model(x_bHW3)
    assert feat_bD.shape == (3, 6) and feat_bD.dtype == torch.float32
    # uint8 and float pixels on the same 0-255 scale are the same input.
    torch.testing.assert_close(model(x_bHW3.float()), feat_bD)
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert max(widths) == 8  # the second stage doubles the width


def test_resnet_overfits_a_tiny_batch():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet", embedding_dim=16, resnet_blocks=[1, 1], resnet_width=8)
    backbone = build_backbone(cfg, (8, 8, 3))
    head = torch.nn.Linear(16, 4)
    x_bHW3, labels_b = _images(16), torch.arange(16) % 4
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(head(backbone(x_bHW3)), labels_b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("backbone, shape",
                         [("mlp", (8, 8, 3)), ("resnet", (16,)), ("resnet", (8, 8, 1))])
def test_wrong_input_kind_names_backbone_and_shape(backbone, shape):
    with pytest.raises(ValueError, match=re.escape(f"model.backbone: '{backbone}'")) as info:
        build_backbone(ModelConfig(backbone=backbone), shape)
    assert f"input shape is {shape}" in str(info.value)


def test_batch_of_wrong_shape_is_rejected():
    model = build_backbone(ModelConfig(embedding_dim=4, mlp_hidden=4), (5,))
    with pytest.raises(ValueError, match=r"expected a batch of shape \(b, 5\), got \(2, 6\)"):
        model(torch.zeros(2, 6))


def test_augmentation_is_deterministic_and_keeps_dtype_and_shape():
    x_bHW3 = _images(32, 6, 7)
    out = augment_images(x_bHW3, torch.Generator().manual_seed(3))
    assert out.dtype == torch.uint8 and out.shape == x_bHW3.shape
    assert torch.equal(out, augment_images(x_bHW3, torch.Generator().manual_seed(3)))
    assert not torch.equal(out, augment_images(x_bHW3, torch.Generator().manual_seed(4)))
    floats = augment_images(x_bHW3.double(), torch.Generator().manual_seed(3))
    assert floats.dtype == torch.float64 and torch.equal(floats, out.double())


def test_augmented_images_are_crops_of_the_padded_image_or_their_mirrors():
    pad, x_bHW3 = 4, _images(24, 5, 6)
    out = augment_images(x_bHW3, torch.Generator().manual_seed(0), pad=pad)
    padded = F.pad(x_bHW3, (0, 0, pad, pad, pad, pad))
    offsets, flips = set(), set()
    for i in range(len(x_bHW3)):
        candidates = [(dy, dx, flip) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                      for flip in (0, 1)]
        matches = [(dy, dx, flip) for dy, dx, flip in candidates
                   if torch.equal(out[i].flip(1) if flip else out[i],
                                  padded[i, dy:dy + 5, dx:dx + 6])]
        assert matches, f"sample {i} is no crop of its padded image"
        offsets.add(matches[0][:2])
        flips.add(matches[0][2])
    assert len(offsets) > 5 and flips == {0, 1}


def test_flip_only_returns_the_image_or_its_mirror():
    x_bHW3 = _images(16)
    out = augment_images(x_bHW3, torch.Generator().manual_seed(1), pad=0)
    flipped = torch.tensor([not torch.equal(o, x) for o, x in zip(out, x_bHW3)])
    assert 0 < int(flipped.sum()) < len(x_bHW3)
    # Mirroring the flipped samples back restores the batch.
    restored = torch.where(flipped[:, None, None, None], out.flip(2), out)
    assert torch.equal(restored, x_bHW3)


def test_augmentation_rejects_non_image_batches():
    with pytest.raises(ValueError, match=r"b x H x W x 3"):
        augment_images(torch.zeros(4, 8), torch.Generator())
