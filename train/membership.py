"""State version 0: which samples train, read once at the start of a run.

Each rank scans its share of the training shards (images joined with the label column by key,
image bytes not decoded) and writes one state file per shard listing its members:

  * a sample joins when its image and its label both exist and its candidate set is valid
    (non-empty, every class in [0, C)); the others are reported by shard, key and source path;
  * `train.max_train_samples` keeps each sample with probability max / N, decided by a hash of
    (seed, key): the same subset whatever the number of ranks, without anyone holding all keys;
  * `train.few_shot` K clean labels per class [D]: the K members of each class with the smallest
    hash of (seed, key), chosen globally (each rank proposes its K best per class; C x K keys
    cross the wire). Their candidate set becomes {true label}.

The index (members per shard) is what epoch lengths are derived from: exact, not guessed.
"""
from __future__ import annotations

import hashlib
import heapq
from typing import Dict, List, Sequence, Tuple

import numpy as np

from coreg_dist.data.stream import SPAN_FIELDS, StreamContext, join_shard
from coreg_dist.progress import progress
from coreg_dist.shards.reader import ErrorLog
from coreg_dist.state import FieldSpec, ShardState, StateStore
from train.epoch_context import report_events

# Per-sample state the trainer keeps for every method (the method adds its own fields).
TRAINER_FIELDS = {"true": FieldSpec((), "int16", -1),      # class from the image shard (logging)
                  "fixed": FieldSpec((), "int16", -1),     # few-shot manual label, -1 = none
                  "bad": FieldSpec((), "int8", 0),         # 1: its image would not decode (found by
                                                           # a sweep; skipped from then on)
                  # byte spans of the sample in its image and label shards: later passes read
                  # only the samples they need (seek), not whole shards
                  **{name: FieldSpec((), "int64", -1) for name in SPAN_FIELDS}}


def key_hash(seed: int, key: str, salt: str = "") -> float:
    """A uniform number in [0, 1) from (seed, key): stable across processes and machines."""
    h = hashlib.blake2b(f"{seed}:{salt}:{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64


def build_initial_state(store: StateStore, stream_ctx: StreamContext, shards: Sequence[str],
                        n_manifest: int, cfg, coll, errors: ErrorLog) -> Dict:
    """Scan this rank's `shards`, write state version 0 and commit its index (collective)."""
    K = stream_ctx.num_classes
    t = cfg.train
    frac = min(1.0, t.max_train_samples / n_manifest) if t.max_train_samples and n_manifest else 1.0
    shots = int(t.few_shot)
    best: Dict[int, List[Tuple[float, str, str]]] = {}      # class -> max-heap of (-hash, shard, key)
    store.discard(0)
    coll.barrier()
    counts: Dict[str, Dict[str, int]] = {}
    bar = progress(total=len(shards), desc="scan training shards", unit="shard",
                   disable=not coll.is_main)
    for shard in shards:
        events: List = []
        keys, ncand, true, spans = [], [], [], []
        for s in join_shard(stream_ctx, shard, events):
            cand = s["cand"]
            if cand.size == 0 or cand.min() < 0 or cand.max() >= K:
                events.append(("bad_candidates", shard, s["key"], s["src"],
                               f"candidate set {cand.tolist()} is empty or outside [0, {K})"))
                continue
            if frac < 1.0 and key_hash(cfg.run.seed, s["key"]) >= frac:
                continue
            keys.append(s["key"])
            ncand.append(len(cand))
            true.append(s["cls"])
            spans.append(s["span"] + s["col_span"])
            if shots > 0 and s["cls"] >= 0:
                heap = best.setdefault(s["cls"], [])
                item = (-key_hash(cfg.run.seed, s["key"], "few-shot"), shard, s["key"])
                if len(heap) < shots:
                    heapq.heappush(heap, item)
                elif item > heap[0]:
                    heapq.heapreplace(heap, item)
        report_events(errors, events, coll.rank)
        st = ShardState(shard, keys, ncand, store.fields)
        st.arrays["true"][:] = np.asarray(true, dtype=np.int16)
        if keys:
            for name, values in zip(SPAN_FIELDS, np.asarray(spans, dtype=np.int64).T):
                st.arrays[name][:] = values
        store.write(0, st)
        counts[shard] = {"n": len(keys)}
        bar.update(1)
    bar.close()
    if shots > 0:
        _apply_few_shot(store, best, shots, coll, counts)
    merged: Dict[str, Dict[str, int]] = {}
    for part in coll.all_gather_object(counts):
        merged.update(part)
    totals = {"n": sum(r["n"] for r in merged.values()),
              "fixed": sum(r.get("fixed", 0) for r in merged.values())}
    if totals["n"] == 0:
        raise ValueError(f"no usable training sample in {stream_ctx.source.root} (column "
                         f"'{stream_ctx.column}'): every sample was left out; see the errors above")
    index = {"version": 0, "epoch": -1, "shards": merged, "totals": totals}
    if coll.is_main:
        store.commit(0, index)
    coll.barrier()
    return index


def _apply_few_shot(store: StateStore, best, shots: int, coll, counts) -> None:
    proposals = [(c, -nh, shard, key) for c, heap in best.items() for nh, shard, key in heap]
    chosen: Dict[str, Dict[str, int]] = {}
    per_class: Dict[int, List[Tuple[float, str, str]]] = {}
    for part in coll.all_gather_object(proposals):
        for c, h, shard, key in part:
            per_class.setdefault(c, []).append((h, shard, key))
    for c, items in per_class.items():
        for h, shard, key in sorted(items)[:shots]:
            chosen.setdefault(shard, {})[key] = c
    for shard, picks in chosen.items():
        if shard not in counts:            # another rank's shard
            continue
        st = store.read(0, shard)
        rows = st.rows(list(picks))
        ncand = st.ncand.copy()
        ncand[rows] = 1                    # S = {true label}: one candidate
        fixed = st.arrays["fixed"].copy()
        fixed[rows] = np.asarray(list(picks.values()), dtype=fixed.dtype)
        arrays = {n: a for n, a in st.arrays.items() if not store.fields[n].per_candidate}
        arrays["fixed"] = fixed
        store.write(0, ShardState(shard, st.keys, ncand, store.fields, arrays))
        counts[shard]["fixed"] = len(picks)
