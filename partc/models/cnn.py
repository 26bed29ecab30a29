"""A ResNet-style convolutional network: convolutions, BatchNorm, ReLU, residual blocks,
global average pooling and a linear classifier, on images with class targets.

``resnet_tiny()`` is the test model (about 20k parameters on 3x16x16 images);
``resnet50()`` has ResNet-50's shape (bottleneck blocks 3-4-6-3, 25.6M parameters,
224x224 images, 1000 classes) for planning.

The modules are named so that each residual block is one layer of partc's graph
(``blocks.0``, ``blocks.1``, ...: the elements of one indexed container), with the stem
and the classifier head as layers of their own; a pipeline cuts between blocks.

BatchNorm under partc: the statistics contract
    In training mode BatchNorm normalises with the mean and variance of the batch it
    sees, and updates its running statistics (``running_mean``, ``running_var``,
    ``num_batches_tracked``) in place during forward. Under partc a module sees a
    *microbatch*: with a pipeline, each of the plan's ``microbatches``; with data
    parallelism, this rank's slice of the global batch. So, as in PyTorch's own
    ``torch.distributed.pipelining`` and ``DistributedDataParallel`` (without
    ``SyncBatchNorm``):

    * **Loss and gradients** equal the single-device model trained with gradient
      accumulation over the same microbatches: the global batch cut into
      ``dp x microbatches`` equal chunks along dim 0 (data-parallel rank ``r`` gets the
      ``r``-th slice, which a pipeline cuts again), each chunk's loss divided by the chunk
      count. They do *not* equal one forward on the whole batch (whose statistics span
      every sample), unless the model has no batch-coupled operator.
    * **Running statistics, pipeline** (``pp > 1``): the stage that holds a BatchNorm
      updates its buffers once per microbatch, in microbatch order, exactly as the
      accumulating reference does; they live on that stage's rank and in its
      ``state_dict()``.
    * **Running statistics, data parallel** (``dp > 1``): each replica updates its buffers
      from its own slice (one microbatch after another under a pipeline), from the same
      starting values; after the step every replica holds the mean of the replicas'
      buffers (the reference: the accumulating run of each slice from the same start,
      averaged; counters such as ``num_batches_tracked`` are equal on every replica).
      This is what timm's ``distribute_bn(reduce=True)`` does. *Not yet so*: the
      data-parallel runtime leaves each replica with its own slice's update (DDP
      broadcasts dp rank 0's buffers before the next forward), so the matrix row
      ``resnet-tiny`` at ``dp=2`` is a known failure until the runtime all-reduces
      (averages) floating-point buffers over "dp" after each step.

    A model that needs statistics over the whole global batch should convert its
    BatchNorms to ``torch.nn.SyncBatchNorm`` (GPU only) or use a batch-independent norm
    (GroupNorm, LayerNorm). In eval mode BatchNorm reads the running statistics and
    every layout equals the single-device model exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ResNetConfig:
    image_size: int = 16
    in_channels: int = 3
    num_classes: int = 10
    stem_width: int = 8
    # One entry per stage: (blocks, width). The first block of every stage but the first
    # halves the resolution (stride 2) and projects the skip with a 1x1 convolution.
    stages: tuple[tuple[int, int], ...] = ((1, 8), (1, 16))
    bottleneck: bool = False  # ResNet-50's 1x1-3x3-1x1 blocks (output 4 x width) instead of 3x3-3x3
    stem_kernel: int = 3  # ResNet-50: a 7x7 stride-2 convolution and a 3x3 max pool
    momentum: float = 0.1  # BatchNorm's running-statistics momentum


def resnet_tiny() -> ResNetConfig:
    """Four residual blocks on 3x16x16 images (two per stage), 10 classes."""
    return ResNetConfig(stages=((2, 8), (2, 16)))


def resnet50() -> ResNetConfig:
    """ResNet-50's shape: bottleneck blocks 3-4-6-3, 224x224 images, 1000 classes."""
    return ResNetConfig(
        image_size=224, num_classes=1000, stem_width=64, stages=((3, 64), (4, 128), (6, 256), (3, 512)), bottleneck=True, stem_kernel=7
    )


class Stem(nn.Module):
    """conv -> BatchNorm -> ReLU (ResNet-50: 7x7 stride 2, then a 3x3 stride-2 max pool)."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        large = config.stem_kernel > 3
        self.conv = nn.Conv2d(config.in_channels, config.stem_width, config.stem_kernel, stride=2 if large else 1, padding=config.stem_kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(config.stem_width, momentum=config.momentum)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1) if large else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.bn(self.conv(images))))


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions (or a 1x1-3x3-1x1 bottleneck), each followed by BatchNorm,
    added to the input (projected by a 1x1 convolution + BatchNorm when the shape changes)."""

    def __init__(self, in_channels: int, width: int, stride: int, *, bottleneck: bool, momentum: float):
        super().__init__()
        out_channels = 4 * width if bottleneck else width
        if bottleneck:
            shapes = [(in_channels, width, 1, 1), (width, width, 3, stride), (width, out_channels, 1, 1)]
        else:
            shapes = [(in_channels, width, 3, stride), (width, width, 3, 1)]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, stride=s, padding=k // 2, bias=False) for i, o, k, s in shapes)
        self.norms = nn.ModuleList(nn.BatchNorm2d(o, momentum=momentum) for _, o, _, _ in shapes)
        self.project = None
        if stride != 1 or in_channels != out_channels:
            self.project = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels, momentum=momentum))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.project is None else self.project(x)
        h = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = norm(conv(h))
            if i < len(self.convs) - 1:
                h = F.relu(h)
        return F.relu(h + skip)


class Head(nn.Module):
    """Global average pooling and a linear classifier."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class ResNet(nn.Module):
    """images [B, C, H, W] -> class logits [B, num_classes]."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        self.stem = Stem(config)
        blocks = []
        channels = config.stem_width
        for stage, (count, width) in enumerate(config.stages):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(ResidualBlock(channels, width, stride, bottleneck=config.bottleneck, momentum=config.momentum))
                channels = 4 * width if config.bottleneck else width
        self.blocks = nn.ModuleList(blocks)
        self.head = Head(channels, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def image_batch(config: ResNetConfig, batch_size: int, seq_len: int | None) -> tuple[tuple[torch.Tensor], torch.Tensor]:
    """Random images [batch_size, C, H, W] and class labels [batch_size] (``seq_len`` is unused)."""
    images = torch.randn(batch_size, config.in_channels, config.image_size, config.image_size)
    return (images,), torch.randint(0, config.num_classes, (batch_size,))


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the batch."""
    return F.cross_entropy(logits.float(), labels)
