"""Backbones: the data-parallel part of the model, mapping a batch of inputs to features.

Every rank holds a full replica; Horovod sums its gradients (each rank's backward holds its
samples' share of the global-mean loss; app/training/data_parallel.py). Nothing
here communicates. Parameters are initialised from torch's global RNG: seed it, and broadcast
the initial state from rank 0, for identical replicas.

Shape legend: b batch, d input vector size, H W image height and width, D embedding_dim.
Images arrive as stored in the HDF5 shards: b x H x W x 3, channels last, uint8.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from app.config import ModelConfig


def build_backbone(model_cfg: ModelConfig, input_shape: tuple[int, ...]) -> nn.Module:
    """A module mapping a batch of inputs of per-sample shape `input_shape` to feat_bD.

    `mlp` takes vectors (input_shape == (d,)), `resnet` takes images (input_shape == (H, W, 3)).
    The last layer is a BatchNorm1d, so training needs batches of 2 or more samples per rank.
    Raises ValueError naming model.backbone if the dataset's input shape does not fit it.
    """
    shape = tuple(int(n) for n in input_shape)
    if model_cfg.backbone == "mlp":
        if len(shape) != 1 or shape[0] < 1:
            raise ValueError(
                f"model.backbone: 'mlp' needs vector inputs of shape (d,), but the dataset's "
                f"input shape is {shape}; use 'resnet' for images"
            )
        return MlpBackbone(shape[0], model_cfg)
    # ModelConfig admits no backbone other than mlp and resnet.
    if len(shape) != 3 or shape[2] != 3 or min(shape) < 1:
        raise ValueError(
            f"model.backbone: 'resnet' needs images of shape (H, W, 3), but the dataset's "
            f"input shape is {shape}; use 'mlp' for vectors"
        )
    return ResNetBackbone(shape, model_cfg)


def augment_images(x_bHW3: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding of `pad` pixels on every side) and random horizontal flip.

    Input and output: b x H x W x 3, any dtype, on any device; dtype, shape and device are kept.
    Each sample gets its own offsets and flip, all drawn from `generator` (on its device), so
    the result is a function of the generator's state. One gather, no per-image loop.
    """
    if pad < 0:
        raise ValueError(f"augment_images: pad must be >= 0, got {pad}")
    if x_bHW3.ndim != 4 or x_bHW3.shape[3] != 3:
        raise ValueError(
            f"augment_images: expected a batch of b x H x W x 3 images, got {tuple(x_bHW3.shape)}"
        )
    b, height, width, _ = x_bHW3.shape
    offset_y_b = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=generator.device)
    offset_x_b = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=generator.device)
    flip_b = torch.randint(0, 2, (b,), generator=generator, device=generator.device).bool()
    device = x_bHW3.device
    offset_y_b, offset_x_b, flip_b = offset_y_b.to(device), offset_x_b.to(device), flip_b.to(device)

    # F.pad lists dimensions from the last: channels (none), then W, then H.
    padded = F.pad(x_bHW3, (0, 0, pad, pad, pad, pad))
    cols_W = torch.arange(width, device=device)
    rows_bH = offset_y_b[:, None] + torch.arange(height, device=device)
    # A flipped crop reads the same window right to left.
    cols_bW = offset_x_b[:, None] + torch.where(flip_b[:, None], cols_W.flip(0), cols_W)
    batch_b = torch.arange(b, device=device)
    return padded[batch_b[:, None, None], rows_bH[:, :, None], cols_bW[:, None, :]]


class MlpBackbone(nn.Module):
    """x_bd -> feat_bD: (Linear-BatchNorm-ReLU) x mlp_layers, then Linear-BatchNorm.

    The features are the last BatchNorm's output, with no ReLU, so they can take any sign.
    Inputs are cast to the parameters' dtype (float32 shards feed a float64 model).
    """

    def __init__(self, input_dim: int, model_cfg: ModelConfig) -> None:
        super().__init__()
        self.input_shape = (input_dim,)
        layers: list[nn.Module] = []
        width = input_dim
        for _ in range(model_cfg.mlp_layers):
            # No bias: the BatchNorm right after subtracts the batch mean, which cancels it.
            layers += [nn.Linear(width, model_cfg.mlp_hidden, bias=False),
                       nn.BatchNorm1d(model_cfg.mlp_hidden), nn.ReLU(inplace=True)]
            width = model_cfg.mlp_hidden
        layers += [nn.Linear(width, model_cfg.embedding_dim, bias=False),
                   nn.BatchNorm1d(model_cfg.embedding_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x_bd: torch.Tensor) -> torch.Tensor:
        _check_batch(x_bd, self.input_shape)
        return self.net(x_bd.to(self.net[0].weight.dtype))


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (projected when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # Each block starts as the identity (Goyal et al. 2017), which keeps the first steps of
        # large-batch training stable.
        nn.init.zeros_(self.bn2.weight)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x), inplace=True)


class ResNetBackbone(nn.Module):
    """x_bHW3 (uint8, or float on the same 0-255 scale) -> feat_bD.

    A compact CIFAR-style ResNet: 3x3 stem, stages of basic blocks (`resnet_blocks` per stage,
    `resnet_width` channels doubled per stage, stride 2 from the second stage), global average
    pool, Linear, BatchNorm1d. Pixels are scaled to [0, 1] and normalised with mean = std = 0.5.
    """

    def __init__(self, input_shape: tuple[int, int, int], model_cfg: ModelConfig) -> None:
        super().__init__()
        self.input_shape = input_shape
        width = model_cfg.resnet_width
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        blocks = []
        channels = width
        for stage, num_blocks in enumerate(model_cfg.resnet_blocks):
            stage_channels = width * 2**stage
            for i in range(num_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_BasicBlock(channels, stage_channels, stride))
                channels = stage_channels
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Linear(channels, model_cfg.embedding_dim, bias=False),
                                  nn.BatchNorm1d(model_cfg.embedding_dim))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x_bHW3: torch.Tensor) -> torch.Tensor:
        _check_batch(x_bHW3, self.input_shape)
        # (x / 255 - 0.5) / 0.5 in one multiply-add.
        x_bHW3 = x_bHW3.to(self.head[0].weight.dtype) * (2.0 / 255.0) - 1.0
        # A view with channels-last strides, which conv2d takes without a copy.
        x_b3HW = x_bHW3.permute(0, 3, 1, 2)
        h_bCHW = self.stages(self.stem(x_b3HW))
        return self.head(h_bCHW.mean(dim=(2, 3)))


def _check_batch(x: torch.Tensor, input_shape: tuple[int, ...]) -> None:
    if tuple(x.shape[1:]) != input_shape:
        expected = ", ".join(map(str, input_shape))
        raise ValueError(
            f"backbone input: expected a batch of shape (b, {expected}), got {tuple(x.shape)}"
        )
