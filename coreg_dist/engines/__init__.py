"""Engines: what turns a loss into new weights (see base.py for the seam).

    dist.engine=auto         one process: local; several: ddp, or accelerate under `accelerate launch`
    dist.engine=deepspeed    DeepSpeed ZeRO (dist.deepspeed_config names the JSON)
"""
from __future__ import annotations

import os
from contextlib import ExitStack
from typing import List

from torch import nn

from coreg_dist.engines.base import DDPEngine, Engine, make_optimizer

ENGINES = ("auto", "local", "ddp", "deepspeed", "accelerate")


def launched_by_accelerate() -> bool:
    return "ACCELERATE_MIXED_PRECISION" in os.environ     # set by `accelerate launch`


def engine_name(cfg, coll) -> str:
    name = cfg.dist.engine
    if name not in ENGINES:
        raise ValueError(f"config key 'dist.engine' is {name!r}; expected one of {', '.join(ENGINES)}")
    if name == "auto":
        if launched_by_accelerate():
            return "accelerate"
        return "ddp" if coll.distributed else "local"
    if name == "ddp" and not coll.distributed:
        return "local"
    return name


def build_engine(net: nn.Module, cfg, coll, device: str) -> Engine:
    name = engine_name(cfg, coll)
    if name == "deepspeed":
        try:
            from coreg_dist.engines.deepspeed_engine import DeepSpeedEngine
        except ImportError as exc:
            raise ImportError(f"dist.engine=deepspeed needs DeepSpeed: pip install -e '.[deepspeed]' ({exc})") from None
        return DeepSpeedEngine(net, cfg, coll, device)
    if name == "accelerate":
        try:
            from coreg_dist.engines.accelerate_engine import AccelerateEngine
        except ImportError as exc:
            raise ImportError(f"dist.engine=accelerate needs accelerate: pip install -e '.[accelerate]' ({exc})") from None
        return AccelerateEngine(net, cfg, coll, device)
    return DDPEngine(net, cfg, coll, device) if name == "ddp" else Engine(net, cfg, coll, device)


def full_parameters(engines: List[Engine], modify: bool = False) -> ExitStack:
    """Every engine's whole parameters at once (collective under ZeRO-3)."""
    stack = ExitStack()
    for e in engines:
        stack.enter_context(e.full_parameters(modify))
    return stack


def uneven_forwards(engines: List[Engine]) -> ExitStack:
    stack = ExitStack()
    for e in engines:
        stack.enter_context(e.uneven_forwards())
    return stack


__all__ = ["DDPEngine", "Engine", "build_engine", "engine_name", "full_parameters", "make_optimizer",
           "uneven_forwards"]
