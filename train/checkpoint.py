"""Atomic per-epoch checkpoints and `--resume latest`.

    RUN/checkpoints/epoch_0007/state.pt        networks, optimisers, prototypes, queues, RNG, epoch
    RUN/checkpoints/epoch_0007/samples/*.npz   per-sample state, one file per shard, keyed
    RUN/checkpoints/latest                     name of the newest complete checkpoint

A checkpoint folder is written under a temporary name and renamed when complete, and `latest`
is replaced after that, so a run killed at any moment resumes from a complete epoch. Every
random stream of an epoch is derived from (seed, epoch, ...), so resuming at an epoch boundary
reproduces the uninterrupted run exactly (same device, deterministic ops).
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from coreg_dist.io import atomic_write_text

LATEST = "latest"


def _dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def rng_state() -> Dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str, epoch: int, method, extra: Dict, keep: int = 2) -> str:
    base = _dir(run_dir)
    name = f"epoch_{epoch:04d}"
    final = os.path.join(base, name)
    tmp = os.path.join(base, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save({"epoch": epoch, "method": method.name, "method_state": method.state_dict(),
                "rng": rng_state(), **extra}, os.path.join(tmp, "state.pt"))
    if method.sample_state is not None:
        method.sample_state.save(os.path.join(tmp, "samples"))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(os.path.join(base, LATEST), name + "\n")
    done = sorted(d for d in os.listdir(base) if d.startswith("epoch_"))
    for old in done[:-keep]:
        shutil.rmtree(os.path.join(base, old), ignore_errors=True)
    return final


def find_checkpoint(run_dir: str, spec: str) -> Optional[str]:
    """`latest` -> the newest complete checkpoint of run_dir (None if there is none yet);
    anything else is a checkpoint folder path."""
    if spec == "latest":
        pointer = os.path.join(_dir(run_dir), LATEST)
        if not os.path.isfile(pointer):
            return None
        path = os.path.join(_dir(run_dir), open(pointer).read().strip())
    else:
        path = spec
    if not os.path.isfile(os.path.join(path, "state.pt")):
        raise FileNotFoundError(f"config key 'train.resume': no checkpoint at {path} "
                                "(expected a folder with state.pt)")
    return path


def load_checkpoint(path: str, method) -> Tuple[int, Dict]:
    """Restore the method (and its per-sample state); returns (epoch, the saved payload)."""
    payload = torch.load(os.path.join(path, "state.pt"), map_location="cpu",
                         weights_only=False)
    if payload["method"] != method.name:
        raise ValueError(f"{path} is a checkpoint of method '{payload['method']}', "
                         f"not '{method.name}'")
    method.load_state_dict(payload["method_state"])
    if method.sample_state is not None:
        method.sample_state.load(os.path.join(path, "samples"))
    set_rng_state(payload["rng"])
    return int(payload["epoch"]), payload
