"""PreAct ResNet-18 (He et al. 2016) as used by DivideMix / Co-Reg.

CIFAR-style stem (3x3 conv, stride 1, no max-pool) so 32 px inputs keep a
32x32 map in the first stage; for inputs >= 64 px the first stage is strided
to keep compute (and the 4x4 final map) comparable.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_backbone


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with identity (or 1x1 conv) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # Pre-activation: the projection shortcut sees the normalised input.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


@register_backbone("preact_resnet18")
class PreActResNet18(nn.Module):
    """PreAct ResNet-18 feature extractor: (B, C, H, W) -> (B, 512)."""

    feat_dim = 512

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_blocks=(2, 2, 2, 2)):
        super().__init__()
        self.first_stride = 2 if image_size >= 64 else 1
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        widths, strides = (64, 128, 256, 512), (self.first_stride, 2, 2, 2)
        in_planes, layers = 64, []
        for width, stride, n in zip(widths, strides, num_blocks):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(PreActBlock(in_planes, width, s))
                in_planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(512)  # final BN+ReLU: blocks end un-normalised

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """Final (B, 512, h, w) feature map before global pooling."""
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.relu(self.bn(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.forward_map(x), 1), 1)
