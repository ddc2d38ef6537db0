"""Process-level set-up shared by every entry point: command line -> config, device, seeds."""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
from typing import Optional, Sequence, Tuple

import numpy as np

from coreg_dist.config import Config, ConfigError, load_config


def parse_args(argv: Optional[Sequence[str]], description: str,
               parser: Optional[argparse.ArgumentParser] = None,
               required: Sequence[str] = ()) -> Tuple[Config, argparse.Namespace]:
    """`--config FILE` (repeatable: merged in order) plus `key=value` overrides; a config error
    exits with its message."""
    parser = parser or argparse.ArgumentParser(description=description)
    parser.add_argument("--config", action="append", default=None,
                        help="YAML preset (see configs/); repeat to merge several in order")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, required)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    return cfg, args


def worker_context(*preload: str) -> multiprocessing.context.BaseContext:
    """Where worker processes (DataLoader workers, ingest workers) come from: a fork server,
    never a fork of the calling process. That process has threads (gloo's, the progress bar's,
    TensorBoard's writer, the last loader's queue feeders); a child forked while one of them
    holds the interpreter's thread-list lock waits for it forever inside fork() (seen: 1 run
    in ~16 on 2 ranks with 2 loader workers each, stuck in CPython's PyOS_AfterFork_Child).
    The server is a fresh single-threaded process that imports `preload` once (the first
    caller's list), so each worker still starts in milliseconds."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    return ctx


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key 'run.device' is {name!r} but CUDA is not available")
    return name


def setup_process(cfg: Config) -> str:
    """Seeds, thread count and device; returns the device string."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.run.threads:
        # run.threads is for the whole machine: ranks that torchrun starts on it share them.
        # (torchrun and accelerate set LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        torch.set_num_threads(max(1, cfg.run.threads // max(1, local)))
    # Subnormal floats make small CPU models crawl (measured: 30-80 img/s instead of thousands
    # for the embedded CLIP); flushing them to zero changes no result we can measure.
    torch.set_flush_denormal(True)
    seed_everything(cfg.run.seed)
    return resolve_device(cfg.run.device)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def cpu_description() -> str:
    """'N CPUs (M usable) <model>, load average a b c' for benchmark headers: what a number was
    measured on, and how busy the machine was when it started."""
    import platform

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"{os.cpu_count()} CPUs ({usable} usable) {model or platform.processor()}, "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
