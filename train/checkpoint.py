"""Collective checkpoints, every K steps and every epoch, and `--resume latest`.

    RUN/checkpoints/e0003-p01-s000120/meta.json      where the run continues (epoch, pass, step;
                                                     e0004-p00-s000000 = after epoch 3),
                                                     world size, streams, state version (JSON)
    RUN/checkpoints/e0003-p01-s000120/model.pt       networks, key encoders, queues, prototypes,
                                                     optimizers (rank 0's; every rank holds the same)
    RUN/checkpoints/e0003-p01-s000120/engine0/       an engine's own state where it has one
                                                     (DeepSpeed: every rank's ZeRO partition)
    RUN/checkpoints/e0003-p01-s000120/rank_00001.pt  each rank's own part: its streams' positions
                                                     (shard order, samples taken), RNG states,
                                                     the epoch's running sums, its error log
    RUN/checkpoints/latest                           name of the newest complete checkpoint
    RUN/state/vNNNNN/                                the per-sample state version meta.json names

Written collectively: every rank writes its part atomically into a temporary folder; after a
barrier rank 0 writes model.pt and meta.json, renames the folder into place, points `latest` at
it and keeps the last k. A run killed at any moment resumes from a complete checkpoint.

Resume: at an epoch boundary any world size and any data.streams work (the state is per shard,
the next epoch plans from scratch). Mid-epoch the streams are replayed to their positions, which
needs the same world size and streams: anything else is refused with a message that says so.
Everything loads with `weights_only=True`: a checkpoint is data, never code.
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from coreg_dist.io import atomic_path, atomic_write_json, atomic_write_text, read_json

LATEST = "latest"
META = "meta.json"
MODEL = "model.pt"


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def checkpoint_name(epoch: int, pass_index: int, step: int) -> str:
    return f"e{epoch:04d}-p{pass_index:02d}-s{step:06d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def rng_state() -> Dict:
    """The process's global RNG states, as plain types (weights_only-loadable)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(obj, path: str) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(run_dir: str, coll, meta: Dict, model_state: Dict, rank_state: Dict,
                    keep: int = 2, collective: Optional[Callable[[str], None]] = None) -> str:
    """Collective: every rank calls it at the same step. `collective(folder)` runs on every
    rank before the commit (the engines' own sharded state, e.g. DeepSpeed's)."""
    base = checkpoint_dir(run_dir)
    name = checkpoint_name(meta["epoch"], meta["pass_index"], meta["step"])
    final, tmp = os.path.join(base, name), os.path.join(base, f".{name}.tmp")
    if coll.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    coll.barrier()
    _save(rank_state, os.path.join(tmp, rank_file(coll.rank)))
    if collective is not None:
        collective(tmp)
    coll.barrier()
    if coll.is_main:
        _save(model_state, os.path.join(tmp, MODEL))
        atomic_write_json(os.path.join(tmp, META), meta)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(os.path.join(base, LATEST), name + "\n")
        done = sorted(d for d in os.listdir(base) if d.startswith("e") and
                      os.path.isfile(os.path.join(base, d, META)))
        for old in done[:-keep]:
            shutil.rmtree(os.path.join(base, old), ignore_errors=True)
    coll.barrier()
    return final


def kept_state_versions(run_dir: str) -> set:
    """State versions that some complete checkpoint still needs."""
    base = checkpoint_dir(run_dir)
    if not os.path.isdir(base):
        return set()
    out = set()
    for d in os.listdir(base):
        meta = os.path.join(base, d, META)
        if os.path.isfile(meta):
            out.add(int(read_json(meta)["state_version"]))
    return out


def find_checkpoint(run_dir: str, spec: str) -> Optional[str]:
    """`latest` -> the newest complete checkpoint of run_dir (None if there is none yet);
    anything else is a checkpoint folder path."""
    if spec == "latest":
        pointer = os.path.join(checkpoint_dir(run_dir), LATEST)
        if not os.path.isfile(pointer):
            return None
        path = os.path.join(checkpoint_dir(run_dir), open(pointer).read().strip())
    else:
        path = spec
    if os.path.isfile(os.path.join(path, "state.pt")) and not os.path.isfile(os.path.join(path, META)):
        raise ValueError(f"{path} is a checkpoint of an earlier coreg_dist (one state.pt per epoch, "
                         "single process); this version cannot continue it: train into a new "
                         "run.out_dir, or remove its checkpoints/ folder to start over")
    if not os.path.isfile(os.path.join(path, META)):
        raise FileNotFoundError(f"config key 'train.resume': no checkpoint at {path} "
                                f"(expected a folder with {META})")
    return path


def check_resumable(path: str, meta: Dict, world_size: int, streams: int) -> None:
    """Mid-epoch positions only replay on the same world size and streams: refuse otherwise."""
    if not meta.get("mid_epoch"):
        return
    where = f"epoch {meta['epoch']}, pass {meta['pass_index']}, step {meta['step']}"
    if meta["world_size"] != world_size:
        raise ValueError(
            f"{path} was written mid-epoch ({where}) by {meta['world_size']} rank(s); this run has "
            f"{world_size}. A mid-epoch position is a position in each rank's streams and only "
            f"replays on the same world size: resume with {meta['world_size']} rank(s) "
            f"(torchrun --nproc_per_node=...), or resume an epoch-boundary checkpoint "
            f"(train.resume=<RUN>/checkpoints/e....-p00-s000000), which works with any world size.")
    if meta["streams"] != streams:
        raise ValueError(f"{path} was written mid-epoch ({where}) with data.streams={meta['streams']}; "
                         f"this run has {streams}: set data.streams={meta['streams']} to resume it")


def saved_error_logs(path: str):
    """Every rank's error log in a checkpoint (an epoch-boundary resume, perhaps on another
    number of ranks, keeps what the earlier ranks found)."""
    for name in sorted(os.listdir(path)):
        if name.startswith("rank_") and name.endswith(".pt"):
            yield torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)["errors"]


def load_checkpoint(path: str, rank: int, device: str = "cpu") -> Tuple[Dict, Dict, Optional[Dict]]:
    """(meta, model_state, this rank's part or None at an epoch boundary). weights_only=True."""
    meta = read_json(os.path.join(path, META))
    model = torch.load(os.path.join(path, MODEL), map_location=device, weights_only=True)
    rank_state = None
    rf = os.path.join(path, rank_file(rank))
    if meta.get("mid_epoch"):
        if not os.path.isfile(rf):
            raise FileNotFoundError(f"{path}: no part for rank {rank} ({rf})")
        rank_state = torch.load(rf, map_location="cpu", weights_only=True)
    return meta, model, rank_state


def check_engine(path: str, meta: Dict, engine, world_size: int) -> None:
    """Engines of one state format (local, DDP, accelerate: a torch optimizer's state) resume
    each other's checkpoints; DeepSpeed's partitioned state needs DeepSpeed on as many ranks."""
    fmt, name = meta.get("engine_format", "torch"), meta.get("engine", "local")
    if fmt != engine.state_format:
        raise ValueError(f"{path} was written by the {name} engine; this run uses {engine.name}, whose "
                         f"optimizer state is kept differently: resume with dist.engine={name}, or resume "
                         "into a new run.out_dir from scratch")
    if fmt == "deepspeed" and meta["world_size"] != world_size:
        raise ValueError(f"{path} holds DeepSpeed ZeRO partitions of {meta['world_size']} rank(s); this "
                         f"run has {world_size}: resume on {meta['world_size']} rank(s)")
