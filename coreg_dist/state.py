"""Per-sample training state, kept per shard on disk, keyed by sample key, versioned per epoch.

Co-Reg remembers things about every training sample across epochs: each network's GMM weight
w, its division-loss history and its candidate-masked prediction. The published code keeps N x C
tensors indexed by position. Here:

  * state lives in one file per image shard, `RUN/state/vNNNNN/<shard>.npz`, holding the shard's
    member keys (`__keys__`), their candidate counts (`__ncand__`) and one array per field;
  * a prediction masked to the candidate set is stored *per candidate* (`per_candidate=True`):
    a flat array of sum_i |S_i| values in candidate order, so the state grows with the candidate
    sets, never with the class count (1e9 images x 21k classes x 4 B would be 84 TB);
  * a rank only ever holds the shards it is reading (one file at a time per stream), so memory
    is bounded by the shard size, not by N;
  * every co-divide writes a new version from the previous one; `index.json`, written last by
    rank 0 once every rank has written its shards, is the version's commit marker and lists
    per-shard counts (members, |P| per network, ...). Checkpoints name the version they need,
    so a run killed while a version is half written resumes from the complete one before it.

The files have the shape of a label column (one per image shard, keyed), so they could live
beside the image shards.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from coreg_dist.io import atomic_path, atomic_write_json, read_json
from coreg_dist.labels import segment_indices

INDEX = "index.json"
_VDIR = re.compile(r"^v(\d{5})$")


@dataclass(frozen=True)
class FieldSpec:
    shape: Tuple[int, ...] = ()     # per-sample shape, () for a scalar (ignored if per_candidate)
    dtype: str = "float32"
    fill: float = 0.0
    per_candidate: bool = False     # one value per candidate class, in candidate (sorted) order


class ShardState:
    """The state rows of one shard: member keys, candidate counts, one array per field."""

    def __init__(self, shard: str, keys: Sequence[str], ncand: Sequence[int],
                 fields: Dict[str, FieldSpec], arrays: Optional[Dict[str, np.ndarray]] = None):
        self.shard = shard
        self.keys = np.asarray(list(keys), dtype=str)
        self.ncand = np.asarray(ncand, dtype=np.int32)
        if len(self.keys) != len(self.ncand):
            raise ValueError(f"state of {shard}: {len(self.keys)} keys but {len(self.ncand)} counts")
        self.ptr = np.concatenate([[0], np.cumsum(self.ncand, dtype=np.int64)])
        self.fields = dict(fields)
        self.arrays: Dict[str, np.ndarray] = {}
        for name, spec in self.fields.items():
            if arrays is not None and name in arrays:
                self.arrays[name] = np.asarray(arrays[name], dtype=spec.dtype)
            else:
                self.arrays[name] = np.full(self._shape(spec), spec.fill, dtype=spec.dtype)
        self._row: Optional[Dict[str, int]] = None

    def __len__(self) -> int:
        return len(self.keys)

    def _shape(self, spec: FieldSpec) -> Tuple[int, ...]:
        return (int(self.ptr[-1]),) if spec.per_candidate else (len(self.keys),) + tuple(spec.shape)

    def row(self, key: str) -> int:
        """Row of a key, -1 for a key that is not a member."""
        if self._row is None:
            self._row = {k: i for i, k in enumerate(self.keys.tolist())}
        return self._row.get(key, -1)

    def rows(self, keys: Iterable[str]) -> np.ndarray:
        return np.asarray([self.row(k) for k in keys], dtype=np.int64)

    # ------------------------------------------------------------------ per-candidate fields
    def _flat_index(self, rows: np.ndarray) -> np.ndarray:
        return segment_indices(self.ptr[rows], self.ncand[rows])

    def get_candidates(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Concatenated per-candidate values of `rows` (in row order)."""
        return self.arrays[name][self._flat_index(np.asarray(rows, dtype=np.int64))]

    def set_candidates(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        idx = self._flat_index(rows)
        if len(idx) != len(values):
            raise ValueError(f"state of {self.shard}: field '{name}' needs {len(idx)} candidate values "
                             f"for {len(rows)} samples, got {len(values)}")
        self.arrays[name][idx] = values

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, __keys__=self.keys, __ncand__=self.ncand, **self.arrays)

    @classmethod
    def load(cls, path: str, fields: Dict[str, FieldSpec], shard: str = "") -> "ShardState":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"per-sample state missing: {path}")
        with np.load(path, allow_pickle=False) as z:
            # A field the file lacks (added to the method after this state was written: a run
            # resumed by a newer version) starts at its fill value, as in a new state.
            arrays = {n: z[n] for n in fields if n in z.files}
            return cls(shard or os.path.basename(path)[:-4], z["__keys__"], z["__ncand__"],
                       fields, arrays)


class StateStore:
    """The versioned per-shard state of a run: RUN/state/vNNNNN/<shard>.npz + index.json."""

    def __init__(self, run_dir: str, fields: Dict[str, FieldSpec]):
        self.root = os.path.join(run_dir, "state")
        self.fields = dict(fields)

    def vdir(self, version: int) -> str:
        return os.path.join(self.root, f"v{version:05d}")

    def path(self, version: int, shard: str) -> str:
        return os.path.join(self.vdir(version), shard + ".npz")

    def read(self, version: int, shard: str, fields: Optional[Dict[str, FieldSpec]] = None) -> ShardState:
        return ShardState.load(self.path(version, shard), fields or self.fields, shard)

    def write(self, version: int, state: ShardState) -> None:
        os.makedirs(self.vdir(version), exist_ok=True)
        state.save(self.path(version, state.shard))

    def commit(self, version: int, index: Dict) -> None:
        """Rank 0, after every rank wrote its shards: the index is the commit marker."""
        atomic_write_json(os.path.join(self.vdir(version), INDEX), index)

    def is_complete(self, version: int) -> bool:
        return os.path.isfile(os.path.join(self.vdir(version), INDEX))

    def read_index(self, version: int) -> Dict:
        path = os.path.join(self.vdir(version), INDEX)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"state version {version} is incomplete: {path} is missing")
        return read_json(path)

    def versions(self) -> List[int]:
        if not os.path.isdir(self.root):
            return []
        return sorted(int(m.group(1)) for d in os.listdir(self.root) if (m := _VDIR.match(d)))

    def discard(self, version: int) -> None:
        shutil.rmtree(self.vdir(version), ignore_errors=True)

    def prune(self, keep: Iterable[int]) -> None:
        """Remove every version not in `keep` (the ones that kept checkpoints name)."""
        keep = set(keep)
        for v in self.versions():
            if v not in keep:
                self.discard(v)
