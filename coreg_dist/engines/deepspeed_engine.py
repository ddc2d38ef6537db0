"""DeepSpeed ZeRO behind the engine seam: one DeepSpeed engine per network.

    deepspeed --num_gpus 8 --module train.cli --config configs/gpu.yaml dist.engine=deepspeed
    torchrun --nproc_per_node=2 -m train.cli --config configs/demo.yaml dist.engine=deepspeed \\
        dist.deepspeed_config=configs/deepspeed/zero1-fp32.json          # CPU, gloo

The JSON (configs/deepspeed/) says the ZeRO stage, precision and communication settings. What
the rest of the config already says is filled in here and must not be repeated there: the batch
sizes (train.batch_size over the ranks, no gradient accumulation), gradient clipping
(train.grad_clip, unless the JSON sets it), the optimizer (the project's SGD, passed as a client
optimizer) and the learning rate (set by the trainer every pass from the method's schedule).

ZeRO-3 keeps only a shard of each parameter on a rank. So:
  - reading whole parameters (the EMA key encoder, checksums, state_dict) goes through
    `full_parameters()` (GatheredParameters, collective, on every rank at the same point);
  - a ZeRO-3 forward gathers the parameters, i.e. it is a collective: co-divide sweeps and
    evaluation make uneven numbers of forwards per rank, so there the engine forwards a plain
    copy refreshed once per sweep (`uneven_forwards()`). That copy costs one network's memory:
    ZeRO-3 is for backbones that do not fit, which ResNets are not (stage 0-2 is the default).
ZeRO-1/2/3 also keep fp32 master weights in the optimizer: weights written into the module
directly would be overwritten at the next step, so resume goes through DeepSpeed's own
checkpoint (save_collective / load_collective), written by every rank.

DeepSpeed loads its checkpoint files with weights_only=False; the engine's checkpoint reader is
replaced by one that loads with weights_only=True (a checkpoint is data, never code).
"""
from __future__ import annotations

import copy
import json
import logging
import os
from contextlib import contextmanager
from typing import Dict

import torch
from torch import nn

from coreg_dist.engines.base import Engine, make_optimizer

TAG = "deepspeed"
# Set by the engine from the rest of the config; a JSON that sets them otherwise is refused.
RUNTIME_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def repo_path(path: str) -> str:
    """A config-relative path: as given if it exists, else relative to the repository root."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(root, path)


def deepspeed_config(cfg, world_size: int, device: str) -> Dict:
    """The JSON named by dist.deepspeed_config (auto: ZeRO-2 bf16 on CUDA, ZeRO-2 fp32 on CPU),
    completed with what the rest of the config says."""
    name = cfg.dist.deepspeed_config
    if name == "auto":
        name = ("configs/deepspeed/zero2-bf16.json" if device.startswith("cuda")
                else "configs/deepspeed/zero2-fp32.json")
    path = repo_path(name)
    try:
        with open(path) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config key 'dist.deepspeed_config': no file {name}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"config key 'dist.deepspeed_config': {path} is not valid JSON: {exc}") from None
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ValueError(f"{path}: remove '{key}': the engine passes the project's SGD "
                             "(train.lr, train.momentum, train.weight_decay) and the trainer sets the "
                             "learning rate from the method's schedule")
    micro = max(1, cfg.train.batch_size // world_size)
    want = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
            "train_batch_size": micro * world_size}
    for key in RUNTIME_KEYS:
        if key in ds and ds[key] != want[key]:
            raise ValueError(f"{path}: '{key}' is {ds[key]}, but train.batch_size={cfg.train.batch_size} "
                             f"over {world_size} rank(s) makes it {want[key]}: remove it from the JSON "
                             "(the engine fills it in)")
    ds.update(want)
    ds.setdefault("gradient_clipping", float(cfg.train.grad_clip))
    ds.setdefault("zero_allow_untested_optimizer", True)     # SGD is fine with ZeRO
    ds.setdefault("steps_per_print", 1 << 30)
    ds["_source"] = path
    return ds


def deepspeed_safe_types():
    """The plain data classes DeepSpeed pickles into its checkpoints (an enum, a named address,
    the loss scaler's settings): allowed for weights_only loading, nothing else is."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, fragment_address, LossScaler]


def _safe_load(path: str, map_location=None):
    with torch.serialization.safe_globals(deepspeed_safe_types()):
        return torch.load(path, map_location=map_location, weights_only=True)


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, net: nn.Module, cfg, coll, device: str):
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)     # its INFO lines would drown the trainer's
        self.net, self.cfg, self.coll, self.device = net, cfg, coll, device
        ds = deepspeed_config(cfg, coll.world_size, device)
        self.config_file = ds.pop("_source")
        self.stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        self.bf16 = bool(ds.get("bf16", {}).get("enabled", False))
        # A plain copy for uneven forwards under ZeRO-3, taken before DeepSpeed shards the module.
        self.shadow = copy.deepcopy(net) if self.stage == 3 else None
        self._uneven = False
        self.model, self.opt, _, _ = deepspeed.initialize(
            model=net, optimizer=make_optimizer(net, cfg), config=ds, dist_init_required=False)
        if self.shadow is not None and self.bf16:
            self.shadow.to(torch.bfloat16)
        self.model.checkpoint_engine.load = _safe_load

    # ------------------------------------------------------------------ forward
    def inference_module(self) -> nn.Module:
        if self._uneven and self.shadow is not None:
            self.shadow.train(self.net.training)
            return self.shadow
        return self.net

    # ------------------------------------------------------------------ update
    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)

    def step(self) -> float:
        self.model.step()                 # clipping (gradient_clipping), optimizer, zero_grad
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def set_lr(self, lr: float) -> None:
        for group in self.model.optimizer.param_groups:
            group["lr"] = lr

    # ------------------------------------------------------------------ whole parameters
    def full_parameters(self, modify: bool = False):
        import deepspeed
        if self.stage == 3:
            # Parameters the forward hooks left gathered or in flight (prefetch) are released
            # first: GatheredParameters cannot take a parameter that is in flight.
            self.model.empty_partition_cache()
        return deepspeed.zero.GatheredParameters(list(self.net.parameters()),
                                                 modifier_rank=0 if modify else None,
                                                 enabled=self.stage == 3)

    @contextmanager
    def uneven_forwards(self):
        if self.shadow is None:
            yield
            return
        with torch.no_grad(), self.full_parameters():
            for ps, p in zip(self.shadow.parameters(), self.net.parameters()):
                ps.copy_(p)
        for bs, b in zip(self.shadow.buffers(), self.net.buffers()):
            bs.data.copy_(b)
        self._uneven = True
        try:
            yield
        finally:
            self._uneven = False

    # ------------------------------------------------------------------ persistence
    state_format = "deepspeed"

    def state_dict(self) -> Dict:
        return {"config_file": self.config_file, "stage": self.stage}

    def load_state_dict(self, state: Dict) -> None:
        pass                              # everything is in DeepSpeed's own checkpoint

    def save_collective(self, folder: str) -> None:
        self.model.save_checkpoint(folder, tag=TAG, save_latest=False)

    def load_collective(self, folder: str) -> None:
        path, _ = self.model.load_checkpoint(folder, tag=TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed engine state (tag '{TAG}') to resume from")
