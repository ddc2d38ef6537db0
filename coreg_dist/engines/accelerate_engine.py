"""Hugging Face accelerate behind the engine seam: `accelerate launch` runs the same trainer.

    accelerate launch --config_file configs/accelerate/cpu-2proc.yaml -m train.cli --config configs/demo.yaml
    accelerate launch --config_file configs/accelerate/multi-gpu.yaml -m train.cli --config configs/gpu.yaml

The trainer joins the process group the launcher describes (coreg_dist.dist, with its timeout);
the Accelerator adopts it and wraps each network and its optimizer (`prepare`: DDP with the
same settings as DDPEngine, mixed precision from the launch config). Backward goes through
`accelerator.backward`, clipping through `accelerator.clip_grad_norm_`. On CPU the Accelerator
is made with cpu=True: without it, two `accelerate launch` processes silently train apart.
"""
from __future__ import annotations

import datetime

import torch
from torch import nn

from coreg_dist.engines.base import Engine

_ACCELERATOR = None


def shared_accelerator(cfg, device: str):
    """One Accelerator per process, shared by the engines of both networks."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        _ACCELERATOR = Accelerator(
            cpu=not device.startswith("cuda"),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True,
                                                           broadcast_buffers=False),
                             InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.dist.timeout_s))])
    return _ACCELERATOR


class AccelerateEngine(Engine):
    name = "accelerate"

    def __init__(self, net: nn.Module, cfg, coll, device: str):
        super().__init__(net, cfg, coll, device)
        self.accelerator = shared_accelerator(cfg, device)
        if self.accelerator.num_processes != coll.world_size:
            raise RuntimeError(f"accelerate sees {self.accelerator.num_processes} process(es), the "
                               f"launcher started {coll.world_size}: launch with `accelerate launch "
                               "--config_file configs/accelerate/<name>.yaml` (see README)")
        self.model, self.opt = self.accelerator.prepare(net, self.opt)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self) -> float:
        norm = 0.0
        if self.cfg.train.grad_clip > 0:
            norm = float(self.accelerator.clip_grad_norm_(self.net.parameters(), self.cfg.train.grad_clip))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return norm
