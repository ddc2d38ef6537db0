"""What a method's per-epoch work sees: the streamed sweep over this rank's shards, and the
next version of the per-sample state it writes (co-divide's results).

    for item in ctx.sweep(tag=100):                  # every training sample of this rank, once
        p = net(augment(item.part.x, item.generator(k)))
        update.put(item.shard, item.part.keys, {"loss0": ...})
        if item.last: update.end_shard(item.shard)   # a finished shard is written at once
    update.finish_sweep()
    gmm = fit_gmm_1d(update.chunks("avg0"), allreduce=coll.allreduce_fn())   # chunk by chunk
    update.map(lambda st: ...)                       # one shard file at a time
    totals = update.commit(count_fn)                 # index.json (rank 0, after a barrier)

Memory stays bounded by the shards in flight: a shard's state is loaded when its first batch
arrives and written when its last one does; the GMM reads the state files chunk by chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch

from coreg_dist.data.stream import StreamContext, iterate_sweep, seed_of, text_id
from coreg_dist.methods.base import BatchPart, make_generator
from coreg_dist.shards.reader import ErrorLog
from coreg_dist.state import ShardState, StateStore


def to_device_part(part, device: str) -> BatchPart:
    """Collated numpy samples -> tensors on the device (uint8 is what crosses to it)."""
    x = torch.from_numpy(part.images).to(device, non_blocking=True).float().div_(255.0)
    Y = None if part.Y is None else torch.from_numpy(part.Y).to(device).float()
    attach = {n: torch.from_numpy(np.ascontiguousarray(a)).to(device) for n, a in part.attach.items()}
    soft = None if part.soft is None else torch.from_numpy(part.soft).to(device)
    return BatchPart(x=x, Y=Y, true=torch.from_numpy(part.true).to(device), keys=part.keys,
                     attach=attach, soft=soft)


def report_events(errors: ErrorLog, events, rank: int) -> None:
    for kind, shard, key, src, msg in events:
        where = f" ({src})" if src else ""
        errors.report(kind, shard, key, f"{msg}{where}" + (f" [rank {rank}]" if rank else ""))


@dataclass
class SweepItem:
    shard: str
    part: BatchPart
    last: bool
    _gens: Dict
    _seed: Tuple[int, ...]

    def generator(self, k: int) -> torch.Generator:
        """The shard's generator number k: seeded by (seed, epoch, tag, k, shard), so a sample's
        view does not depend on which rank sweeps it, and a second sweep repeats the first."""
        key = (self.shard, k)
        if key not in self._gens:
            self._gens[key] = make_generator(seed_of(*self._seed, k, text_id(self.shard)))
        return self._gens[key]


class StateUpdate:
    """Writes state version `new` from `prev` for the shards this rank sweeps."""

    def __init__(self, store: StateStore, prev: int, new: int, shards: Sequence[str], coll,
                 reset: Sequence[str] = (), epoch: int = 0):
        self.store, self.prev, self.new, self.shards = store, prev, new, list(shards)
        self.coll, self.reset, self.epoch = coll, tuple(reset), epoch
        self.open: Dict[str, ShardState] = {}
        self.done: set = set()
        self.ranges: Dict[str, List[float]] = {}

    def _get(self, shard: str) -> ShardState:
        if shard not in self.open:
            st = self.store.read(self.prev, shard)
            for name in self.reset:
                st.arrays[name][...] = self.store.fields[name].fill
            self.open[shard] = st
        return self.open[shard]

    def put(self, shard: str, keys: Sequence[str], values: Dict[str, np.ndarray]) -> None:
        st = self._get(shard)
        if not len(keys):
            return
        rows = st.rows(keys)
        if (rows < 0).any():
            bad = [k for k, r in zip(keys, rows) if r < 0][:3]
            raise ValueError(f"state of {shard} has no row for keys {bad}")
        for name, v in values.items():
            if self.store.fields[name].per_candidate:
                st.set_candidates(name, rows, v)
            else:
                st.arrays[name][rows] = v
            if v.dtype.kind == "f" and v.size:
                finite = v[np.isfinite(v)]
                if finite.size:
                    lo_hi = self.ranges.setdefault(name, [np.inf, -np.inf])
                    lo_hi[0], lo_hi[1] = min(lo_hi[0], float(finite.min())), max(lo_hi[1], float(finite.max()))

    def end_shard(self, shard: str) -> None:
        self.store.write(self.new, self._get(shard))
        self.open.pop(shard, None)
        self.done.add(shard)

    def finish_sweep(self) -> None:
        """Shards that yielded nothing (unreadable this time) still get their (reset) rows."""
        for shard in self.shards:
            if shard not in self.done:
                self.end_shard(shard)

    def local_range(self, name: str) -> Tuple[float, float]:
        """(min, max) of what this rank put into `name` (inf, -inf if nothing): all-reduce them."""
        lo, hi = self.ranges.get(name, [np.inf, -np.inf])
        return lo, hi

    def map(self, fn: Callable[[ShardState], None]) -> None:
        for shard in self.shards:
            st = self.store.read(self.new, shard)
            fn(st)
            self.store.write(self.new, st)

    def chunks(self, name: str):
        """A re-iterable of this rank's finite values of `name`, one shard at a time."""
        update = self

        class _Chunks:
            def __iter__(self):
                for shard in update.shards:
                    a = update.store.read(update.new, shard, {name: update.store.fields[name]}).arrays[name]
                    yield a[np.isfinite(a)]
        return _Chunks()

    def commit(self, counts: Callable[[ShardState], Dict[str, int]]) -> Dict[str, int]:
        """Per-shard counts from every rank -> index.json of the new version (rank 0, after all
        ranks wrote their shards); returns the global totals."""
        rows = {s: counts(self.store.read(self.new, s)) for s in self.shards}
        merged: Dict[str, Dict[str, int]] = {}
        for part in self.coll.all_gather_object(rows):
            merged.update(part)
        totals: Dict[str, int] = {}
        for r in merged.values():
            for k, v in r.items():
                totals[k] = totals.get(k, 0) + int(v)
        self.index = {"version": self.new, "epoch": self.epoch, "shards": merged, "totals": totals}
        if self.coll.is_main:
            self.store.commit(self.new, self.index)
        self.coll.barrier()
        return totals


class EpochContext:
    """Handed to `method.begin_epoch` / `plan_epoch`: counts, sweeps and state updates."""

    def __init__(self, *, epoch: int, cfg, coll, device: str, store: StateStore, version: int,
                 index: Dict, stream_ctx: StreamContext, sweep_shards: Sequence[str],
                 image_shape: Tuple[int, ...], errors: ErrorLog):
        self.epoch, self.cfg, self.coll, self.device = epoch, cfg, coll, device
        self.store, self.version, self.index = store, version, index
        self.stream_ctx, self.sweep_shard_names = stream_ctx, list(sweep_shards)
        self.image_shape, self.errors = image_shape, errors
        self.data_wait_s = 0.0
        self.undecodable: Dict[str, set] = {}       # shard -> keys a sweep could not decode

    @property
    def totals(self) -> Dict[str, int]:
        return self.index["totals"]

    @property
    def shard_counts(self) -> Dict[str, Dict[str, int]]:
        return self.index["shards"]

    @property
    def num_train(self) -> int:
        return int(self.totals["n"])

    def sweep(self, attach: Sequence[str] = (), tag: int = 0) -> Iterator[SweepItem]:
        """Every training sample of this rank's shards once, in per-shard batches on the device."""
        from dataclasses import replace
        ctx = replace(self.stream_ctx, state_version=self.version)
        gens: Dict = {}
        seed = (self.cfg.run.seed, self.epoch, tag)
        d = self.cfg.data
        for b in iterate_sweep(ctx, self.sweep_shard_names, self.cfg.train.eval_batch_size,
                               attach=attach, image_shape=self.image_shape,
                               num_workers=d.num_workers, prefetch=d.prefetch):
            self.data_wait_s += b.wait_s
            report_events(self.errors, b.errors, self.coll.rank)
            for kind, shard, key, _, _ in b.errors:
                if kind == "corrupt_image":
                    self.undecodable.setdefault(shard, set()).add(key)
            yield SweepItem(b.shard, to_device_part(b.part, self.device), b.last, gens, seed)

    def state_update(self, reset: Sequence[str] = ()) -> "EpochStateUpdate":
        return EpochStateUpdate(self, reset)


class EpochStateUpdate(StateUpdate):
    """A StateUpdate that marks what the sweep could not decode as bad (later passes and sweeps
    skip it) and, once committed, becomes the context's current version."""

    def __init__(self, ctx: EpochContext, reset: Sequence[str]):
        new = ctx.version + 1
        ctx.store.discard(new)          # leftovers of a run killed while writing it
        ctx.coll.barrier()
        super().__init__(ctx.store, ctx.version, new, ctx.sweep_shard_names, ctx.coll, reset, ctx.epoch)
        self.ctx = ctx

    def end_shard(self, shard: str) -> None:
        keys = self.ctx.undecodable.get(shard)
        if keys and "bad" in self.store.fields:
            st = self._get(shard)
            rows = st.rows(sorted(keys))
            st.arrays["bad"][rows[rows >= 0]] = 1
        super().end_shard(shard)

    def commit(self, counts) -> Dict[str, int]:
        totals = super().commit(counts)
        self.ctx.version = self.new
        self.ctx.index = self.index     # every rank gathered the same; no re-read of rank 0's file
        return totals
