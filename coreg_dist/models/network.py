"""The Co-Reg network: normalisation + backbone + classifier + projection head."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _channel_stats(values: Sequence[float] | None, in_channels: int, default: float, name: str) -> torch.Tensor:
    vals = [default] * in_channels if values is None else [float(v) for v in values]
    if len(vals) == 1:
        vals = vals * in_channels  # allow a scalar-like [v] for any channel count
    if len(vals) != in_channels:
        raise ValueError(f"{name} has {len(vals)} values, expected {in_channels} (one per channel)")
    return torch.tensor(vals, dtype=torch.float32).view(1, in_channels, 1, 1)


class CoRegNetwork(nn.Module):
    """Backbone with a linear classifier and an L2-normalised projection head.

    ``forward(x)`` takes images as floats in [0, 1] (normalisation lives inside
    the model so that augmentation can work in pixel space) and returns logits,
    or ``(logits, z)`` with ``with_proj=True`` where ``z`` (B, proj_dim) has unit
    L2 norm (used by the MoCo-style contrastive loss and the prototypes).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        in_channels: int,
        proj_dim: int = 128,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = int(backbone.feat_dim)
        self.num_classes = num_classes
        self.in_channels = in_channels
        # Buffers (not parameters): saved in checkpoints and moved by .to(device).
        self.register_buffer("mean", _channel_stats(mean, in_channels, 0.5, "mean"))
        self.register_buffer("std", _channel_stats(std, in_channels, 0.5, "std"))
        self.classifier = nn.Linear(self.feat_dim, num_classes)
        self.head = nn.Sequential(
            nn.Linear(self.feat_dim, self.feat_dim),
            nn.ReLU(inplace=True),
            nn.Linear(self.feat_dim, proj_dim),
        )
        self.channels_last = False  # set by to_channels_last()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone feature (B, feat_dim) of [0, 1] images."""
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def forward(self, x: torch.Tensor, with_proj: bool = False):
        feat = self.features(x)
        logits = self.classifier(feat)
        if not with_proj:
            return logits
        # Normalise in fp32: under bf16 autocast the head output is bf16 and
        # its norm would be off by ~1e-2.
        z = F.normalize(self.head(feat).float(), dim=1)
        return logits, z


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convert ``model`` to channels_last in place and return it.

    Besides converting the 4-D weights, this flags a :class:`CoRegNetwork` so
    its forward also converts inputs: otherwise every conv would reorder the
    activations back and forth and lose the speed-up.
    """
    model.to(memory_format=torch.channels_last)
    for m in model.modules():
        if isinstance(m, CoRegNetwork):
            m.channels_last = True
    return model
