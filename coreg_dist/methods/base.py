"""The algorithm interface shared by Co-Reg and every baseline (DomainBed / PLENCH style).

The trainer owns data, schedule, evaluation, checkpoints and logs; a method owns its networks,
optimisers and per-sample state and answers four questions:

  begin_epoch(epoch, pool, passes)  what to do before the epoch (Co-Reg: co-divide)   -> metrics
  plan_epoch(epoch, pool)           which samples each optimiser step sees           -> [Step]
  update(batch)                     one optimiser step                               -> losses
  predict(x) / predict_each(x)      logits for evaluation

`state_dict()` / `load_state_dict()` persist everything but the per-sample state, which the
trainer saves per shard from `method.sample_state`.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from coreg_dist.augment import strong_augment, weak_augment
from coreg_dist.models import build_network

_METHODS: Dict[str, type] = {}


def register_method(name: str):
    def deco(cls):
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} already registered")
        cls.name = name
        _METHODS[name] = cls
        return cls
    return deco


def _register_builtin_methods() -> None:
    # Imported here, not at module top: the method modules import this one.
    from coreg_dist.methods import coreg, pce  # noqa: F401  (registration side effect)


def list_methods() -> List[str]:
    _register_builtin_methods()
    return sorted(_METHODS)


def build_method(name: str, cfg, data_info: "DataInfo", device: str) -> "Method":
    _register_builtin_methods()
    if name not in _METHODS:
        raise ValueError(f"config key 'train.method': unknown method {name!r}; "
                         f"known: {', '.join(list_methods())}")
    return _METHODS[name](cfg, data_info, device)


@dataclass
class DataInfo:
    num_classes: int
    in_channels: int
    image_size: int
    shard_names: List[str]
    shard_keys: List[List[str]]        # keys per shard, in pool order
    flip: bool = True                  # horizontal flips preserve the class (not for digits, text)


@dataclass
class Step:
    net: int                           # which network this step trains
    labeled: np.ndarray                # global pool indices
    unlabeled: Optional[np.ndarray] = None


@dataclass
class Batch:
    step: Step
    x: torch.Tensor                    # (B, C, H, W) float in [0, 1]
    Y: torch.Tensor                    # (B, K) candidate multi-hot, float
    u: Optional[torch.Tensor] = None
    uY: Optional[torch.Tensor] = None
    true: Optional[torch.Tensor] = None    # for logging only, never for learning


# A pass over the whole pool in fixed order, given by the trainer: yields (indices, x, Y).
PoolPasses = Callable[[int], Iterator[Tuple[np.ndarray, torch.Tensor, torch.Tensor]]]


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU torch generator from an explicit formula of (seed, epoch, ...), so that a run
    resumed at an epoch boundary draws exactly the same random numbers."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0]))
    return g


class Method:
    name = ""
    num_networks = 1

    def __init__(self, cfg, info: DataInfo, device: str):
        self.cfg, self.info, self.device = cfg, info, device
        self.sample_state = None
        self.epoch = 0

    # ------------------------------------------------------------------ shared helpers
    def make_network(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        net = build_network(self.cfg.model.backbone, self.info.num_classes, self.info.in_channels,
                            self.info.image_size, proj_dim=self.cfg.model.proj_dim).to(self.device)
        if self.cfg.model.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return net

    def make_optimizer(self, net: nn.Module) -> torch.optim.Optimizer:
        t = self.cfg.train
        return torch.optim.SGD(net.parameters(), lr=t.lr, momentum=t.momentum,
                               weight_decay=t.weight_decay)

    def lr_at(self, epoch: int) -> float:
        """Cosine from lr to lr * lr_min_ratio over lr_period epochs ([C] 800; 0 = the run)."""
        t = self.cfg.train
        period = t.lr_period or t.epochs
        lo = t.lr * t.lr_min_ratio
        return lo + (t.lr - lo) * 0.5 * (1 + math.cos(math.pi * min(epoch, period) / period))

    def set_lr(self, optimizers, epoch: int) -> float:
        lr = self.lr_at(epoch)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        return lr

    def weak(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return weak_augment(x, pad=self.cfg.train.crop_pad, flip=self.info.flip, generator=gen)

    def strong(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        t = self.cfg.train
        return strong_augment(x, pad=t.crop_pad, flip=self.info.flip, n_ops=t.randaug_ops,
                              cutout=None if t.cutout < 0 else t.cutout, generator=gen)

    def autocast(self):
        if not self.cfg.model.bf16:
            return nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)

    def forward(self, net: nn.Module, x: torch.Tensor, with_proj: bool = False):
        """Forward under the configured precision; outputs back in float32 for the losses."""
        if self.cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            out = net(x, with_proj=with_proj)
        if with_proj:
            return out[0].float(), out[1].float()
        return out.float()

    # ------------------------------------------------------------------ interface
    def begin_epoch(self, epoch: int, Y_all: np.ndarray, true_all: np.ndarray,
                    passes: PoolPasses) -> Dict:
        self.epoch = epoch
        return {}

    def plan_epoch(self, epoch: int, n: int) -> List[Step]:
        raise NotImplementedError

    def update(self, batch: Batch) -> Dict[str, float]:
        raise NotImplementedError

    def networks(self) -> List[nn.Module]:
        raise NotImplementedError

    @torch.no_grad()
    def predict_each(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Logits of each network (and their ensemble, where there are two)."""
        out = {}
        for i, net in enumerate(self.networks()):
            net.eval()
            out[f"net{i + 1}"] = self.forward(net, x)
        if len(out) > 1:
            out["ensemble"] = sum(out.values())
        return out

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        each = self.predict_each(x)
        return each.get("ensemble", each["net1"])

    def state_dict(self) -> Dict:
        raise NotImplementedError

    def load_state_dict(self, state: Dict) -> None:
        raise NotImplementedError
