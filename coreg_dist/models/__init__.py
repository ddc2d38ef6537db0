"""Backbones and the Co-Reg network.

Usage::

    net = build_network("small_cnn", num_classes=10, in_channels=1, image_size=28)
    logits, z = net(images_in_0_1, with_proj=True)   # z: unit-norm projection
    to_channels_last(net)                              # optional CPU/GPU speed-up
"""
from .registry import build_backbone, build_network, list_backbones, register_backbone
from .network import CoRegNetwork, to_channels_last
# Imported for their @register_backbone side effect.
from .preact_resnet import PreActBlock, PreActResNet18
from .small_cnn import SmallCNN

__all__ = [
    "CoRegNetwork",
    "PreActBlock",
    "PreActResNet18",
    "SmallCNN",
    "build_backbone",
    "build_network",
    "list_backbones",
    "register_backbone",
    "to_channels_last",
]
