"""Backbone registry and the ``build_network`` factory.

Backbones are registered by name so that configs can select them with a plain
string.  A registered factory is called as ``factory(in_channels=..., image_size=...)``
and must return an ``nn.Module`` mapping (B, C, H, W) -> (B, feat_dim) with a
``feat_dim`` attribute.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch.nn as nn

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a backbone class/factory under ``name``."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        old = _BACKBONES.get(name)
        # Same qualified name = the module was re-imported (e.g. reload): allow.
        if old is not None and (old.__module__, old.__qualname__) != (factory.__module__, factory.__qualname__):
            raise ValueError(f"backbone {name!r} is already registered to {old.__module__}.{old.__qualname__}")
        _BACKBONES[name] = factory
        return factory

    return deco


def list_backbones() -> list[str]:
    """Sorted names of all registered backbones."""
    return sorted(_BACKBONES)


def build_backbone(name: str, in_channels: int, image_size: int) -> nn.Module:
    """Instantiate the backbone ``name``; unknown names raise ``ValueError``."""
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(list_backbones())}")
    return _BACKBONES[name](in_channels=in_channels, image_size=image_size)


def build_network(
    backbone: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    proj_dim: int = 128,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
):
    """Build a :class:`CoRegNetwork` (backbone + classifier + projection head).

    Initialisation uses torch's global RNG, so call ``torch.manual_seed`` with a
    different seed before building each of the two Co-Reg networks.
    """
    from .network import CoRegNetwork  # local import: network imports nothing from here

    net = build_backbone(backbone, in_channels=in_channels, image_size=image_size)
    return CoRegNetwork(net, num_classes=num_classes, in_channels=in_channels,
                        proj_dim=proj_dim, mean=mean, std=std)
