"""Per-sample state written by training steps, applied to the next state version at epoch end.

Co-Reg writes its per-sample state in the epoch's sweep (co-divide). Most partial-label methods
(PRODEN, RC, LWS, CR-DPLL, PiCO, ALIM) instead update a sample's confidence row right after its
batch, from that step's predictions, and read it the next time the sample comes round. In their
loaders a sample comes round once per epoch, so "read the previous version during the epoch,
write the new one at its end" is their rule. A streaming shuffle buffer comes close: most
samples once an epoch, a few carried over to the next epoch while as many others repeat; a
repeat reads the value committed at the last epoch end, and its last write counts. Here:

  * `StepOutput.writes` ({part: {field: (n, C) or (n,) tensor}}) hands the new rows over; the
    trainer calls `add` with the part's (shard, key) identities and each row's order
    (pass, step, stream), so the result does not depend on how streams sit on ranks;
  * each rank appends them to a buffer of at most `buffer_rows` rows, flushed to chunk files
    RUN/state/writes/e<epoch>/rank<r>-<seq>.npz (memory is bounded by the buffer, not by N);
    per-candidate fields are kept per candidate (sum |S_i| values), as in the state files;
  * at the end of the epoch every rank applies, one shard at a time, the rows of every rank's
    chunks to the shards it sweeps, in (pass, step, stream) order, last write wins (a sample a
    stream repeats within an epoch), and version v+1 is committed like a co-divide version;
  * a mid-epoch checkpoint flushes first and records each rank's chunk count; a resumed run
    deletes the chunks written after it (by the run that was killed) and goes on appending.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Dict, List, Optional, Sequence

import numpy as np

from coreg_dist.state import FieldSpec, StateStore
from train.epoch_context import StateUpdate

_CHUNK = re.compile(r"^rank(\d+)-(\d{6})\.npz$")


class StepWrites:
    """This rank's log of per-sample rows written by training steps in one epoch."""

    def __init__(self, store: StateStore, fields: Sequence[str], rank: int, buffer_rows: int = 65536):
        unknown = [f for f in fields if f not in store.fields]
        if unknown:
            raise ValueError(f"step-written state fields {unknown} are not state fields "
                             f"(declare them in the method's state_fields)")
        self.store, self.rank, self.buffer_rows = store, rank, max(1, int(buffer_rows))
        self.fields: Dict[str, FieldSpec] = {f: store.fields[f] for f in fields}
        self.epoch = -1
        self.seq = 0
        self._rows: List[Dict[str, np.ndarray]] = []
        self._n = 0

    # ------------------------------------------------------------------ files
    def folder(self, epoch: int) -> str:
        return os.path.join(self.store.root, "writes", f"e{epoch:05d}")

    def _own_chunks(self, epoch: int) -> List[str]:
        d = self.folder(epoch)
        if not os.path.isdir(d):
            return []
        return sorted(f for f in os.listdir(d) if (m := _CHUNK.match(f)) and int(m.group(1)) == self.rank)

    def begin_epoch(self, epoch: int, resume_seq: Optional[int] = None) -> None:
        """A fresh epoch drops this rank's chunks of it (a run killed after writing some);
        a resumed one keeps the first `resume_seq`, those its checkpoint has seen."""
        self.epoch, self._rows, self._n = epoch, [], 0
        keep = int(resume_seq or 0)
        for f in self._own_chunks(epoch):
            if int(_CHUNK.match(f).group(2)) >= keep:
                os.unlink(os.path.join(self.folder(epoch), f))
        self.seq = keep

    # ------------------------------------------------------------------ logging
    def add(self, order: np.ndarray, shards: Sequence[str], keys: Sequence[str], Y: Optional[np.ndarray],
            values: Dict[str, np.ndarray]) -> None:
        """Rows of one batch part: `order` (n, 3) int64 = (pass, step, stream) per row; `values`
        per field: (n, C) dense rows for a per-candidate field (read at the candidates, Y (n, C)),
        (n, ...) for the others."""
        n = len(keys)
        if not n:
            return
        missing = set(self.fields) - set(values)
        extra = set(values) - set(self.fields)
        if missing or extra:
            raise ValueError(f"step writes must give exactly the fields {sorted(self.fields)}; "
                             f"missing {sorted(missing)}, unknown {sorted(extra)}")
        rec = {"order": np.asarray(order, dtype=np.int64).reshape(n, 3),
               "shard": np.asarray(list(shards), dtype=str), "key": np.asarray(list(keys), dtype=str)}
        if any(s.per_candidate for s in self.fields.values()):
            if Y is None:
                raise ValueError("per-candidate step writes need the batch's candidate sets")
            mask = np.asarray(Y) > 0
            rec["__ncand__"] = mask.sum(1).astype(np.int32)
        for name, spec in self.fields.items():
            v = np.asarray(values[name])
            if len(v) != n:
                raise ValueError(f"step write of '{name}': {len(v)} rows for {n} samples")
            rec[name] = (v[mask] if spec.per_candidate else v).astype(spec.dtype)
        self._rows.append(rec)
        self._n += n
        if self._n >= self.buffer_rows:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        rows, self._rows, self._n = self._rows, [], 0
        out = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        os.makedirs(self.folder(self.epoch), exist_ok=True)
        path = os.path.join(self.folder(self.epoch), f"rank{self.rank}-{self.seq:06d}.npz")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **out)
        os.replace(tmp, path)
        self.seq += 1

    # ------------------------------------------------------------------ applying
    def apply(self, coll, prev: int, index: Dict, shards: Sequence[str]) -> Dict:
        """Collective: every rank's rows -> state version prev + 1 for the shards this rank
        sweeps; returns the new index (per-shard counts carried over: steps change no
        membership)."""
        self.flush()
        coll.barrier()                                   # every rank's chunks are on disk
        folder = self.folder(self.epoch)
        chunks = sorted(f for f in os.listdir(folder) if _CHUNK.match(f)) if os.path.isdir(folder) else []
        touching: Dict[str, List[str]] = {}
        for f in chunks:
            with np.load(os.path.join(folder, f), allow_pickle=False) as z:
                for s in np.unique(z["shard"]).tolist():
                    touching.setdefault(s, []).append(f)
        new = prev + 1
        self.store.discard(new)
        coll.barrier()
        update = StateUpdate(self.store, prev, new, shards, coll, epoch=self.epoch)
        for shard in shards:
            self._apply_shard(update, shard, [os.path.join(folder, f) for f in touching.get(shard, [])])
            update.end_shard(shard)
        update.commit(lambda st: index["shards"][st.shard])
        if coll.is_main:                                 # applied: the log is not needed again
            shutil.rmtree(folder, ignore_errors=True)
        coll.barrier()
        return update.index

    def _apply_shard(self, update: StateUpdate, shard: str, paths: List[str]) -> None:
        if not paths:
            return
        parts = []
        for p in paths:
            with np.load(p, allow_pickle=False) as z:
                m = z["shard"] == shard
                rec = {"order": z["order"][m], "key": z["key"][m]}
                ncand = z["__ncand__"] if "__ncand__" in z.files else None
                for name, spec in self.fields.items():
                    a = z[name]
                    if spec.per_candidate:      # per-candidate values of the selected rows
                        ptr = np.concatenate([[0], np.cumsum(ncand, dtype=np.int64)])
                        rec[name] = [a[ptr[i]:ptr[i + 1]] for i in np.flatnonzero(m)]
                    else:
                        rec[name] = a[m]
                parts.append(rec)
        order = np.concatenate([r["order"] for r in parts])
        keys = np.concatenate([r["key"] for r in parts])
        # (pass, step, stream) ascending; the last row of a key is the one that counts
        idx = np.lexsort((order[:, 2], order[:, 1], order[:, 0]))
        last: Dict[str, int] = {}
        for i in idx.tolist():
            last[keys[i]] = i
        pick = sorted(last.values(), key=lambda i: keys[i])
        values = {}
        for name, spec in self.fields.items():
            if spec.per_candidate:
                flat = [v for r in parts for v in r[name]]
                values[name] = (np.concatenate([flat[i] for i in pick]) if pick
                                else np.zeros(0, dtype=spec.dtype))
            else:
                values[name] = np.concatenate([r[name] for r in parts])[pick]
        update.put(shard, [keys[i] for i in pick], values)
