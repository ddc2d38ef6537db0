"""PreAct ResNet-18 exactly as DivideMix (``PreResNet.py``) and Co-Reg (``utils/resnet.py``) build it.

The authors' network, module for module (their ``ResNet(PreActBlock, [2, 2, 2, 2])``, whose
classifier Co-Reg removes; the classifier and the projection head live in
:class:`~coreg_dist.models.network.CoRegNetwork`):

* stem: 3x3 conv (stride 1, no bias) -> BatchNorm -> ReLU; no max-pool;
* four stages of two :class:`PreActBlock` (64, 128, 256, 512 channels; strides 1, 2, 2, 2);
* after ``layer4`` nothing: no final BatchNorm / ReLU (the blocks end with an un-normalised sum,
  and the authors pool that sum directly);
* global average pooling -> (B, 512). The authors write ``avg_pool2d(out, 4)``; for their inputs
  the last map is 4x4 (28 px: 28-28-14-7-4; 32 px: 32-32-16-8-4; 64 px: 64-32-16-8-4), so the
  adaptive global pool used here gives the same numbers.

Co-Reg's ``input_size == "64x64"`` (EuroSAT, FER2013, GTSRB) makes the first stage stride 2; so
does ``image_size == 64`` here, exactly as theirs. 28 and 32 px (their "32x32" path) use stride 1,
exactly as theirs. Our extension for other sizes (the authors define none): stride 2 for every
``image_size >= 64`` (e.g. 96 or 128 px photos keep compute and the final map comparable), stride 1
below 64; the adaptive pool accepts any final map size.

Parameters (3 channels): 11,166,144 at 28/32 px; 11,170,240 at 64 px, where layer1's first block
gets the authors' 1x1 projection shortcut (64 x 64 weights) for its stride 2. tests/test_presets.py
derives these numbers. The state-dict keys are those of the authors' ``encoder`` (loaded into this
module, their weights give the same features).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_backbone


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """BN-ReLU -> conv3x3(stride) -> BN-ReLU -> conv3x3, plus the shortcut.

    As in the authors' block, the shortcut is taken from the **pre-activated input**
    ``relu(bn1(x))``, not from ``x``: for identity blocks too (an empty ``nn.Sequential``), and
    through a bias-free 1x1 conv (no BatchNorm) where the stride or the width changes. The sum is
    returned un-normalised; the next block's ``bn1`` normalises it.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        # nn.Sequential as theirs, so that state-dict keys match their encoder's
        # ("layerN.0.shortcut.0.weight").
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes * self.expansion, 1,
                                                    stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


@register_backbone("preact_resnet18")
class PreActResNet18(nn.Module):
    """The authors' PreAct ResNet-18 feature extractor: (B, C, H, W) -> (B, 512)."""

    feat_dim = 512

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_blocks=(2, 2, 2, 2)):
        super().__init__()
        # [C] input_size "64x64" -> stride 2 in layer1; > 64 px is our extension (module docstring).
        self.first_stride = 2 if image_size >= 64 else 1
        self.conv1 = _conv3x3(in_channels, 64)
        self.bn1 = nn.BatchNorm2d(64)
        widths, strides = (64, 128, 256, 512), (self.first_stride, 2, 2, 2)
        in_planes, layers = 64, []
        for width, stride, n in zip(widths, strides, num_blocks):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(PreActBlock(in_planes, width, s))
                in_planes = width * PreActBlock.expansion
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """Final (B, 512, h, w) map before global pooling: layer4's output, un-normalised."""
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.forward_map(x), 1), 1)
