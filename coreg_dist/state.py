"""Per-sample training state, keyed by sample key and kept per shard.

Co-Reg remembers things about every training sample across epochs: each network's division
loss history, its GMM weight w and its candidate-masked prediction. The published code keeps
these as N x C tensors indexed by position; here they live in one small table per shard,
saved as `<shard>.npz` together with the shard's keys, so that

  * a resumed run re-attaches every row to its sample by key (a reordered or edited shard
    is detected, not silently misread);
  * a rank in a multi-node run only ever holds the shards it reads: nothing global of size
    N x C exists, and the same files can live beside the image shards as a column.

Within a process, rows are addressed by a global index (the position in the concatenation
of this process's shards); `gather`/`scatter` translate that to (shard, row).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from coreg_dist.io import atomic_path


@dataclass(frozen=True)
class FieldSpec:
    shape: Tuple[int, ...]      # per-sample shape, () for a scalar
    dtype: str
    fill: float = 0.0


class SampleState:
    def __init__(self, fields: Dict[str, FieldSpec]):
        self.fields = dict(fields)
        self.shards: List[str] = []
        self.keys: Dict[str, np.ndarray] = {}
        self.tables: Dict[str, Dict[str, np.ndarray]] = {}
        self.offsets = np.zeros(1, dtype=np.int64)

    # ------------------------------------------------------------------ layout
    def add_shard(self, shard: str, keys: Sequence[str]) -> None:
        if shard in self.tables:
            raise ValueError(f"shard {shard} added twice")
        n = len(keys)
        self.shards.append(shard)
        self.keys[shard] = np.asarray(keys)
        self.tables[shard] = {name: np.full((n,) + spec.shape, spec.fill, dtype=spec.dtype)
                              for name, spec in self.fields.items()}
        self.offsets = np.append(self.offsets, self.offsets[-1] + n)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, gidx: np.ndarray):
        gidx = np.asarray(gidx, dtype=np.int64)
        s = np.searchsorted(self.offsets, gidx, side="right") - 1
        return s, gidx - self.offsets[s]

    # ------------------------------------------------------------------ access
    def gather(self, name: str, gidx) -> np.ndarray:
        gidx = np.asarray(gidx, dtype=np.int64)
        spec = self.fields[name]
        out = np.empty((len(gidx),) + spec.shape, dtype=spec.dtype)
        s, r = self._locate(gidx)
        for si in np.unique(s):
            m = s == si
            out[m] = self.tables[self.shards[si]][name][r[m]]
        return out

    def scatter(self, name: str, gidx, values) -> None:
        gidx = np.asarray(gidx, dtype=np.int64)
        values = np.asarray(values)
        s, r = self._locate(gidx)
        for si in np.unique(s):
            m = s == si
            self.tables[self.shards[si]][name][r[m]] = values[m] if values.ndim else values

    def all(self, name: str) -> np.ndarray:
        """Concatenation over this process's shards (a local slice, never a global table)."""
        return np.concatenate([self.tables[s][name] for s in self.shards]) if self.shards else \
            np.zeros((0,) + self.fields[name].shape, dtype=self.fields[name].dtype)

    def set_all(self, name: str, values: np.ndarray) -> None:
        for i, s in enumerate(self.shards):
            self.tables[s][name][...] = values[self.offsets[i]:self.offsets[i + 1]]

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        for shard in self.shards:
            with atomic_path(os.path.join(folder, shard + ".npz")) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, __keys__=self.keys[shard], **self.tables[shard])

    def load(self, folder: str) -> None:
        """Re-attach saved rows by key; every shard of this state must be present."""
        for shard in self.shards:
            path = os.path.join(folder, shard + ".npz")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"per-sample state for shard {shard} missing: {path}")
            with np.load(path, allow_pickle=False) as z:
                saved_keys = z["__keys__"]
                mine = self.keys[shard]
                if len(saved_keys) != len(mine) or not np.array_equal(saved_keys, mine):
                    # Same samples in another order (or a subset): map by key.
                    where = {k: i for i, k in enumerate(saved_keys.tolist())}
                    missing = [k for k in mine.tolist() if k not in where]
                    if missing:
                        raise ValueError(f"{path}: no saved state for key {missing[0]!r} "
                                         f"({len(missing)} keys missing)")
                    order = np.array([where[k] for k in mine.tolist()], dtype=np.int64)
                else:
                    order = None
                for name in self.fields:
                    if name not in z.files:
                        raise ValueError(f"{path}: field '{name}' missing")
                    arr = z[name]
                    self.tables[shard][name][...] = arr if order is None else arr[order]
