"""The engine seam: everything that turns a loss into new weights, for one network.

    engine = build_engine(net, cfg, coll, device)       # one per independently stepped network
    logits = engine.forward(x)                          # precision, channels_last, the wrapper
    engine.backward(loss); engine.step()                # gradient sync, clipping, optimizer step

Methods compute losses and never touch an optimizer; the trainer calls backward and step. So a
way of training (one process, DDP, DeepSpeed ZeRO, accelerate) is one Engine class, plugged in
here once for Co-Reg and every baseline. One engine per network, not one over both: with one
optimizer over both networks, the idle network's zero gradients would still receive weight
decay and momentum.

What an engine must also answer, because sharded engines (ZeRO-3) do not hold whole parameters:
  full_parameters()   a context in which the network's parameters are whole on every rank
                      (reading them: EMA key encoders, checksums, state_dict; or, with
                      modify=True, writing them: loading weights). Collective for ZeRO-3.
  uneven_forwards()   a context for passes where ranks make different numbers of forwards
                      (co-divide sweeps, evaluation): a ZeRO-3 forward is a collective, so there
                      the engine forwards a gathered copy instead.
  save_collective / load_collective(folder)
                      the engine's own checkpoint (DeepSpeed's partitioned optimizer state),
                      written by every rank into the trainer's checkpoint folder.

DDP notes. Gradient forwards go through the DistributedDataParallel wrapper; forwards under
no_grad (pseudo-labels, co-divide, evaluation) use the bare module, so they cost no
communication. `find_unused_parameters=True` because a method may leave parts unused in some
steps (Co-Reg's projection head before its feature terms start). Buffers are not broadcast at
every forward; the trainer averages them over ranks at pass boundaries, before evaluation and
before checkpoints (`sync_buffers`), so every rank evaluates and saves the same network.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Dict

import torch
from torch import nn


def make_optimizer(net: nn.Module, cfg) -> torch.optim.Optimizer:
    """The authors' optimizer (SGD with momentum and weight decay), for every engine."""
    t = cfg.train
    return torch.optim.SGD(net.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


class Engine:
    name = "local"
    state_format = "torch"               # engines of one format resume each other's checkpoints

    def __init__(self, net: nn.Module, cfg, coll, device: str):
        self.net, self.cfg, self.coll, self.device = net, cfg, coll, device
        self.opt = make_optimizer(net, cfg)
        self.model: nn.Module = net          # what gradient forwards call

    # ------------------------------------------------------------------ forward
    def autocast(self):
        if not self.cfg.model.bf16:
            return nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)

    def inference_module(self) -> nn.Module:
        """What forwards without gradients call (the bare network: no wrapper, no communication)."""
        return self.net

    def forward(self, x: torch.Tensor, with_proj: bool = False, module: nn.Module = None):
        """Forward under the configured precision; outputs back in float32 for the losses.
        With gradients enabled it goes through the (possibly wrapped) training model."""
        m = module if module is not None else (self.model if torch.is_grad_enabled() else self.inference_module())
        if self.cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = next(m.parameters()).dtype
        if x.dtype != dtype:               # an engine that holds the weights in bf16 takes bf16 in
            x = x.to(dtype)
        with self.autocast():
            out = m(x, with_proj=with_proj)
        if with_proj:
            return out[0].float(), out[1].float()
        return out.float()

    # ------------------------------------------------------------------ update
    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip (if configured), optimizer step, zero the gradients; returns the grad norm (or 0)."""
        norm = 0.0
        if self.cfg.train.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.train.grad_clip))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return norm

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def sync_buffers(self) -> None:
        self.coll.average_buffers(self.net)

    # ------------------------------------------------------------------ whole parameters
    def full_parameters(self, modify: bool = False):
        return nullcontext()

    def uneven_forwards(self):
        return nullcontext()

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> Dict:
        """What rank 0 saves for this engine in model.pt (every rank holds the same)."""
        return {"opt": self.opt.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        self.opt.load_state_dict(state["opt"])

    def save_collective(self, folder: str) -> None:
        """Collective: every rank writes its part of the engine's state under folder."""

    def load_collective(self, folder: str) -> None:
        """Collective: every rank reads back what save_collective wrote."""


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, net: nn.Module, cfg, coll, device: str):
        super().__init__(net, cfg, coll, device)
        dev = torch.device(device)
        self.model = nn.parallel.DistributedDataParallel(
            net, device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=True, broadcast_buffers=False)
