"""Rank-local streaming of samples from WebDataset shards: the data path of training.

Where a sample goes, from image to batch:

    image shard (bytes) --+                                   read by the rank that owns the shard
    label column (cand) --+-- join by key (join_shard) --+    for this pass, nothing else
    per-sample state -----+                              |
                                                         v
      route (a per-sample predicate on the state: "w1 > 0.5" = network 2's P)  -- before decode
      -> cycle the stream's shards (seeded order per cycle) until the pass has its steps
      -> shuffle buffer of bytes (webdataset's shuffle, seeded per stream and route)
      -> decode + resize/crop to the training resolution (coreg_dist.data.transform)
      -> chunks of B / S samples per step and stream  -> DataLoader worker -> main process
      -> the rank's chunks of a step, in stream order = the rank's batch

The unit of data order is the *logical stream* (`data.streams`, S). A pass assigns the shards
to S streams (seeded, balanced by the routed sample counts of each shard); stream s belongs to
rank s mod W and, within it, to one DataLoader worker (webdataset's node and worker splitting,
applied to streams). Every step takes B / S samples from every stream, so

  * every rank runs exactly the same number of steps, whatever its shards hold: a stream that
    runs short cycles its shards again (a new seeded order), one that holds more stops early;
  * the global batch of a step does not depend on the number of ranks or workers, only on S
    and the seed: a run on 1 process and on 2 ranks with the same S sees the same batches;
  * a stream's position is (pass, step, samples taken after its shuffle buffer): replaying the
    seeded stream and skipping that many samples *before decoding* resumes it exactly.

Sweeps (co-divide, evaluation) are the other kind of pass: every sample of the rank's shards
once, in shard order, in batches that never cross a shard (so per-shard results can be
written as soon as a shard is done), with uneven per-rank counts; the caller ends them with a
collective every rank reaches.

Damage never stops a rank: a corrupt image, a truncated shard, a label that does not join are
reported as events (kind, shard, key, source path) with the chunk that met them, counted by the
main process's ErrorLog and summed over ranks in the report.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle as wds_shuffle

from coreg_dist.runtime import worker_context
from coreg_dist.data.transform import ImageDecodeError, ImageTransform
from coreg_dist.labels import expand_top_few
from coreg_dist.shards.format import CAND, COLUMN_DIR, IMAGE_DIR, TOPI, TOPP
from coreg_dist.shards.reader import ShardReadError, decode_field, image_field, iter_tar_spans, read_spans
from coreg_dist.state import FieldSpec, ShardState, StateStore

ErrorEvent = Tuple[str, str, str, str, str]      # kind, shard, key, source path, message


def seed_of(*parts: int) -> int:
    """An explicit seed formula: (seed, epoch, pass, stream, route, cycle, ...) -> 64-bit int."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0])


def text_id(text: str) -> int:
    """A stable integer for a name (shard names in seeds); Python's hash() is salted per process."""
    import zlib
    return zlib.crc32(text.encode("utf-8"))


# ---------------------------------------------------------------------------- where shards are
@dataclass(frozen=True)
class ShardSource:
    """Opens shards under the dataset root, or through a URL template webdataset's gopen opens
    (`data.shard_url`, e.g. "pipe:aws s3 cp s3://bucket/ds/{path} -")."""
    root: str
    url_template: str = ""

    def url(self, relpath: str) -> str:
        if self.url_template:
            if self.url_template.startswith("pipe:"):     # a shell command: quote the path
                import shlex
                relpath = shlex.quote(relpath)
            return self.url_template.format(path=relpath)
        import os
        return os.path.join(self.root, relpath)

    def image(self, shard: str) -> str:
        return self.url(f"{IMAGE_DIR}/{shard}.tar")

    def column(self, column: str, shard: str) -> str:
        return self.url(f"{COLUMN_DIR}/{column}/{shard}.tar")


# ---------------------------------------------------------------------------- shard assignment
def assign_shards(names: Sequence[str], weights: Sequence[int], n_streams: int,
                  seed: int, fill_empty: bool = True) -> List[List[str]]:
    """Deal shards to streams: a seeded random order, each shard to the least-loaded stream.

    Loads end within one shard of each other. Shards of weight 0 are left out. A stream that got
    nothing while some shard has weight (fewer useful shards than streams) reads all of them,
    in its own order (`fill_empty`; a training stream must yield its steps): correct, if
    wasteful — reshard the data with more, smaller shards. Sweeps, which must see each sample
    once, leave such a stream empty."""
    order = np.random.default_rng(seed).permutation(len(names))
    loads = np.zeros(n_streams, dtype=np.int64)
    out: List[List[str]] = [[] for _ in range(n_streams)]
    for i in order:
        if weights[i] <= 0:
            continue
        s = int(np.argmin(loads))
        out[s].append(names[i])
        loads[s] += int(weights[i])
    useful = [names[i] for i in order if weights[i] > 0] if fill_empty else []
    for s in range(n_streams):
        if not out[s] and useful:
            rng = np.random.default_rng(seed + s + 1)
            out[s] = [useful[i] for i in rng.permutation(len(useful))]
    return out


# ---------------------------------------------------------------------------- reading a shard
@dataclass(frozen=True)
class StreamContext:
    """Everything a worker needs to read samples (picklable: it travels to worker processes)."""
    source: ShardSource
    num_classes: int
    transform: ImageTransform
    column: str = ""                              # label column with the candidate sets
    state_root: str = ""                          # RUN directory of the per-sample state
    state_version: int = -1                       # -1: no state (evaluation, the init scan)
    state_fields: Tuple[Tuple[str, FieldSpec], ...] = ()
    soft_labels: bool = False                     # read the column's scores: Part.soft (KD)


def _source_of(fields: Dict[str, bytes]) -> str:
    raw = fields.get("json")
    if not raw:
        return ""
    try:
        meta = json.loads(raw.decode("utf-8"))
        return str(meta.get("path") or meta.get("source") or meta.get("url") or "")
    except Exception:
        return ""


SPAN_FIELDS = ("img_start", "img_end", "col_start", "col_end")   # byte spans the first scan records


def _read_column(ctx: StreamContext, shard: str,
                 errors: List[ErrorEvent]) -> Optional[Dict[str, Tuple[Dict[str, bytes], int, int]]]:
    """key -> (the label fields wanted, span) of one column shard (a shard's labels are small);
    None if the shard cannot be read at all."""
    out: Dict[str, Tuple[Dict[str, bytes], int, int]] = {}
    url = ctx.source.column(ctx.column, shard)
    keep = (CAND, TOPI, TOPP) if ctx.soft_labels else (CAND,)
    try:
        for key, fields, start, end in iter_tar_spans(url):
            if CAND in fields:
                out[key] = ({k: fields[k] for k in keep if k in fields}, start, end)
    except ShardReadError as exc:
        errors.append(("truncated_shard", shard, exc.last_key or "", url, str(exc)))
    except Exception as exc:          # missing file, dead server, failing pipe command
        errors.append(("unreadable_shard", shard, "", url, f"{type(exc).__name__}: {exc}"))
        return None
    return out


def _no_scores(ctx: StreamContext, where: str) -> ValueError:
    return ValueError(f"no {TOPI}/{TOPP} (per-annotator scores) in column '{ctx.column}' ({where}): "
                      "soft labels need a column written with scores (a CLIP column with "
                      "annotator.store_topk > 0, or a VLM column with vlm.logprobs)")


def require_scores(ctx: StreamContext, shard: str) -> None:
    """Before training on soft labels: the column's first record of `shard` has scores."""
    url = ctx.source.column(ctx.column, shard)
    for _, fields, _, _ in iter_tar_spans(url):
        if TOPI not in fields or TOPP not in fields:
            raise _no_scores(ctx, url)
        return


def _soft_label(ctx: StreamContext, label: Dict[str, bytes], cand: np.ndarray) -> np.ndarray:
    """The annotators' average distribution (C,) from the stored top-few scores (classes an
    annotator did not store count as 0), renormalised; uniform over S where nothing was scored."""
    if TOPI not in label or TOPP not in label:
        raise _no_scores(ctx, "a record without them")
    idx = np.asarray(decode_field(TOPI, label[TOPI]), dtype=np.int64)
    val = np.asarray(decode_field(TOPP, label[TOPP]), dtype=np.float32)
    val = np.where(idx >= 0, val, 0.0)                    # -1: the annotator gave no answer
    soft = expand_top_few(np.clip(idx, 0, None), val, ctx.num_classes).reshape(-1, ctx.num_classes).mean(0)
    total = soft.sum()
    if not total > 0:
        soft = np.zeros(ctx.num_classes, dtype=np.float32)
        soft[cand] = 1.0 / len(cand)
        return soft
    return (soft / total).astype(np.float32)


def _sample(ctx: StreamContext, shard: str, key: str, fields: Dict[str, bytes],
            label: Optional[Dict[str, bytes]], row: int, errors: List[ErrorEvent]) -> Optional[Dict]:
    """A raw sample from its image fields and label fields; None (reported) if unusable."""
    src = _source_of(fields)
    ext = image_field(fields)
    if ext is None:
        errors.append(("missing_image", shard, key, src, f"no image field among {sorted(fields)}"))
        return None
    cls = -1
    if "cls" in fields:
        try:
            cls = int(decode_field("cls", fields["cls"]))
            if not -1 <= cls < ctx.num_classes:
                raise ValueError(f"class {cls} outside [0, {ctx.num_classes})")
        except ValueError as exc:
            errors.append(("bad_label", shard, key, src, f"cls field: {exc}"))
            cls = -1
    cand, soft = None, None
    if ctx.column:
        try:   # sorted and unique: the order per-candidate state values follow
            cand = np.unique(np.asarray(decode_field(CAND, label[CAND]), dtype=np.int64).reshape(-1))
        except Exception as exc:
            errors.append(("bad_candidates", shard, key, src, f"cand.npy: {exc}"))
            return None
        if ctx.soft_labels:
            soft = _soft_label(ctx, label, cand)       # a column without scores: a ValueError
    return {"key": key, "shard": shard, "data": fields[ext], "ext": ext, "cls": cls,
            "cand": cand, "soft": soft, "row": row, "src": src}


def join_shard(ctx: StreamContext, shard: str, errors: List[ErrorEvent],
               state: Optional[ShardState] = None,
               want: Optional[Callable[[ShardState, int], bool]] = None) -> Iterator[Dict]:
    """The samples of one image shard joined by key with its label column and per-sample state.

    Yields raw samples (image bytes not decoded): {key, shard, data, ext, src, cls, cand, row,
    span, col_span}. With a state, only its members come out (the first scan left the others
    out: subset, bad candidate set), and only those `want(state, row)` accepts. A local shard
    whose state knows the members' byte spans is read by span: only the wanted samples'
    bytes, in file order. Otherwise (URLs, the first scan) the shard streams through.
    A member whose label cannot be found, a label without an image, damage: reported."""
    if state is not None and "bad" in state.arrays:      # undecodable: found by a sweep
        bad, inner = state.arrays["bad"], want
        want = lambda st, r: bad[r] == 0 and (inner is None or inner(st, r))
    if state is not None and not ctx.source.url_template and all(f in state.arrays for f in SPAN_FIELDS) \
            and len(state) and (state.arrays["img_start"] >= 0).all():
        yield from _join_by_span(ctx, shard, errors, state, want)
        return
    labels = _read_column(ctx, shard, errors) if ctx.column else {}
    if labels is None:
        return
    url = ctx.source.image(shard)
    seen = set()
    try:
        for key, fields, start, end in iter_tar_spans(url):
            row = -1
            if state is not None:
                row = state.row(key)
                if row < 0 or (want is not None and not want(state, row)):
                    continue
            label = None
            if ctx.column:
                if key not in labels:
                    errors.append(("missing_label", shard, key, _source_of(fields),
                                   f"no entry in column '{ctx.column}' ({ctx.source.column(ctx.column, shard)})"))
                    continue
                seen.add(key)
                label = labels[key]
            s = _sample(ctx, shard, key, fields, label[0] if label else None, row, errors)
            if s is not None:
                s["span"], s["col_span"] = (start, end), (label[1], label[2]) if label else (-1, -1)
                yield s
    except ShardReadError as exc:
        errors.append(("truncated_shard", shard, exc.last_key or "", url, str(exc)))
        return
    except Exception as exc:
        errors.append(("unreadable_shard", shard, "", url, f"{type(exc).__name__}: {exc}"))
        return
    if ctx.column and state is None:
        for key in labels:
            if key not in seen:
                errors.append(("orphan_label", shard, key, ctx.source.column(ctx.column, shard),
                               "a label whose key has no image in the image shard"))


def _join_by_span(ctx: StreamContext, shard: str, errors: List[ErrorEvent], state: ShardState,
                  want) -> Iterator[Dict]:
    rows = np.arange(len(state))
    if want is not None:
        rows = np.asarray([r for r in rows if want(state, int(r))], dtype=np.int64)
    if not len(rows):
        return
    a = state.arrays
    rows = rows[np.argsort(a["img_start"][rows], kind="stable")]
    img_url, col_url = ctx.source.image(shard), ctx.source.column(ctx.column, shard) if ctx.column else ""
    images = read_spans(img_url, list(zip(a["img_start"][rows], a["img_end"][rows])))
    labels = read_spans(col_url, list(zip(a["col_start"][rows], a["col_end"][rows]))) if ctx.column else None
    try:
        for r in rows.tolist():
            key, fields = next(images)
            lkey, lfields = next(labels) if labels is not None else (key, {})
            if key != state.keys[r] or lkey != state.keys[r]:
                errors.append(("shard_changed", shard, str(state.keys[r]), img_url,
                               f"the bytes where the first scan found this key hold {key!r} / {lkey!r}: "
                               "the shard was rewritten during the run; start a new run"))
                return
            if ctx.column and CAND not in lfields:
                errors.append(("missing_label", shard, key, _source_of(fields), f"no cand.npy in {col_url}"))
                continue
            s = _sample(ctx, shard, key, fields, lfields if ctx.column else None, r, errors)
            if s is not None:
                yield s
    except ShardReadError as exc:
        errors.append(("truncated_shard", shard, exc.last_key or "", exc.path, str(exc)))
    except Exception as exc:
        errors.append(("unreadable_shard", shard, "", img_url, f"{type(exc).__name__}: {exc}"))


def load_state(ctx: StreamContext, shard: str) -> Optional[ShardState]:
    if ctx.state_version < 0:
        return None
    return StateStore(ctx.state_root, dict(ctx.state_fields)).read(ctx.state_version, shard)


# ---------------------------------------------------------------------------- passes
@dataclass(frozen=True)
class Route:
    """One part of every batch: which samples feed it, and how many per stream and step.

    `field` names a per-sample state field (scalar); a sample joins the part when
    `state[field] > value` (op ">") or `<= value` (op "<="). `field=""` takes every member."""
    name: str
    per_step: int                   # global samples per step (split evenly over the streams)
    field: str = ""
    op: str = ">"
    value: float = 0.5
    count_key: str = "n"            # per-shard count in the state index that balances the streams

    def accepts(self, state: Optional[ShardState], row: int) -> bool:
        if not self.field:
            return True
        v = float(state.arrays[self.field][row])
        return v > self.value if self.op == ">" else v <= self.value


@dataclass(frozen=True)
class PassSpec:
    """A training pass: `steps` optimizer steps of `net`, each batch made of the routes' parts.

    `attach` names per-sample state fields delivered with each sample (per-candidate fields
    arrive as dense (n, C) rows, zero outside the candidate set)."""
    name: str
    net: int
    steps: int
    routes: Tuple[Route, ...]
    attach: Tuple[str, ...] = ()


@dataclass
class Part:
    """Collated samples of one route (numpy; the trainer moves them to the device)."""
    images: np.ndarray                          # (n, C, H, W) uint8
    Y: Optional[np.ndarray]                     # (n, K) bool candidate sets (None without a column)
    true: np.ndarray                            # (n,) int64, -1 unknown
    keys: List[str]
    shards: List[str]
    attach: Dict[str, np.ndarray] = field(default_factory=dict)
    soft: Optional[np.ndarray] = None           # (n, K) float32 annotator distributions (soft_labels)

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def concat(parts: Sequence["Part"]) -> "Part":
        return Part(images=np.concatenate([p.images for p in parts]),
                    Y=None if parts[0].Y is None else np.concatenate([p.Y for p in parts]),
                    soft=None if parts[0].soft is None else np.concatenate([p.soft for p in parts]),
                    true=np.concatenate([p.true for p in parts]),
                    keys=[k for p in parts for k in p.keys], shards=[s for p in parts for s in p.shards],
                    attach={n: np.concatenate([p.attach[n] for p in parts]) for n in parts[0].attach})


def _attach(sample: Dict, state: Optional[ShardState], attach: Sequence[str]) -> Dict:
    """Copy the sample's state values it travels with (before the shuffle buffer, so nothing
    needs its shard's state later): scalars, and per-candidate values in candidate order."""
    if attach and state is not None:
        r = sample["row"]
        sample["attach"] = {n: (state.arrays[n][state.ptr[r]:state.ptr[r + 1]].copy()
                                if state.fields[n].per_candidate else state.arrays[n][r].copy())
                            for n in attach}
    return sample


def _collate(ctx: StreamContext, samples: List[Dict], attach: Sequence[str],
             image_shape: Tuple[int, ...]) -> Part:
    n, K = len(samples), ctx.num_classes
    images = np.empty((n,) + image_shape, dtype=np.uint8)
    for i, s in enumerate(samples):
        images[i] = s["image"]
    Y = None
    if ctx.column:
        Y = np.zeros((n, K), dtype=bool)
        for i, s in enumerate(samples):
            Y[i, s["cand"]] = True
    out = {}
    specs = dict(ctx.state_fields)
    for name in attach:
        if specs[name].per_candidate:
            rows = np.zeros((n, K), dtype=np.float32)
            for i, s in enumerate(samples):
                rows[i, s["cand"]] = s["attach"][name]
            out[name] = rows
        else:
            out[name] = np.stack([s["attach"][name] for s in samples]) \
                if n else np.zeros((0,) + specs[name].shape, dtype=specs[name].dtype)
    soft = None
    if ctx.column and ctx.soft_labels:
        soft = (np.stack([s["soft"] for s in samples]) if n else np.zeros((0, K), dtype=np.float32))
    return Part(images=images, Y=Y, true=np.asarray([s["cls"] for s in samples], dtype=np.int64),
                keys=[s["key"] for s in samples], shards=[s["shard"] for s in samples], attach=out,
                soft=soft)


def _apply_fixed(sample: Dict, state: Optional[ShardState]) -> Dict:
    """A sample with a manual (few-shot) label learns from that label alone: S = {label}."""
    if state is not None and "fixed" in state.arrays and sample["row"] >= 0:
        fixed = int(state.arrays["fixed"][sample["row"]])
        if fixed >= 0:
            sample["cand"] = np.array([fixed], dtype=np.int64)
    return sample


@dataclass(frozen=True)
class StreamPlan:
    """One logical stream of one pass: for each route, its shards in this pass's order."""
    stream: int
    shards: Tuple[Tuple[str, ...], ...]          # per route
    seeds: Tuple[int, ...]                       # per route: seed of its cycles and shuffle buffer
    counts: Tuple[int, ...] = ()                 # per route: routed samples in its shards (index)
    skip: Tuple[int, ...] = ()                   # per route: samples already taken (resume)
    spare: Tuple[Tuple[str, ...], ...] = ()      # per route: every shard with routed samples, for
                                                 # a stream whose own yield nothing decodable


class _RouteReader:
    """The sample stream of one (stream, route): joined, routed, cycled, shuffled, decoded."""

    def __init__(self, ctx: StreamContext, route: Route, shards: Sequence[str], seed: int,
                 skip: int, attach: Sequence[str], shuffle_buffer: int, errors: List[ErrorEvent],
                 spare: Sequence[str] = ()):
        self.ctx, self.route, self.shards, self.seed = ctx, route, list(shards), seed
        self.spare = [n for n in spare if n not in set(self.shards)]
        self.errors = errors
        self.attach = attach
        self.undecodable: set = set()      # (shard, key) that failed to decode in this pass
        self.taken = 0
        src = self._routed()
        if shuffle_buffer > 1:
            src = wds_shuffle(src, bufsize=shuffle_buffer, initial=shuffle_buffer,
                              rng=random.Random(seed))
        self.src = src
        for _ in range(skip):          # resume: replay the seeded stream without decoding
            next(self.src)
            self.taken += 1

    def _routed(self) -> Iterator[Dict]:
        cycle = 0
        while True:
            order = self.shards if cycle == 0 else \
                [self.shards[i] for i in np.random.default_rng(seed_of(self.seed, cycle)).permutation(len(self.shards))]
            found = 0
            for shard in order:
                state = load_state(self.ctx, shard)
                for s in join_shard(self.ctx, shard, self.errors, state, want=self.route.accepts):
                    if (shard, s["key"]) in self.undecodable:
                        continue
                    found += 1
                    yield _attach(_apply_fixed(s, state), state, self.attach)
            if found == 0 and self.spare:
                # Every sample of this stream's own shards was unreadable or undecodable (the
                # next co-divide sweep marks such samples bad for good): borrow the others'.
                self.shards, self.spare = self.shards + self.spare, []
                continue
            if found == 0:
                raise RuntimeError(
                    f"no decodable sample left for part '{self.route.name}' in shards "
                    f"{self.shards[:5]}{'...' if len(self.shards) > 5 else ''}: see the corrupt_image "
                    "and truncated_shard reports above")
            cycle += 1

    def take(self, n: int, image_shape: Tuple[int, ...]) -> Part:
        got: List[Dict] = []
        while len(got) < n:
            s = next(self.src)
            self.taken += 1
            try:
                s["image"] = self.ctx.transform(s["data"])
            except ImageDecodeError as exc:
                if (s["shard"], s["key"]) not in self.undecodable:
                    self.undecodable.add((s["shard"], s["key"]))
                    self.errors.append(("corrupt_image", s["shard"], s["key"], s["src"], str(exc)))
                continue
            got.append(s)
        return _collate(self.ctx, got, self.attach, image_shape)


@dataclass
class Chunk:
    step: int
    stream: int
    parts: Dict[str, Part]
    taken: Dict[str, int]            # per route: samples taken after the shuffle buffer so far
    errors: List[ErrorEvent]


class PassDataset(IterableDataset):
    """Yields this rank's chunks of a pass, step by step; each worker owns whole streams."""

    def __init__(self, ctx: StreamContext, spec: PassSpec, streams: Sequence[StreamPlan],
                 n_streams: int, start_step: int, shuffle_buffer: int, image_shape: Tuple[int, ...]):
        self.ctx, self.spec, self.streams = ctx, spec, list(streams)
        self.n_streams, self.start_step = n_streams, start_step
        self.shuffle_buffer, self.image_shape = shuffle_buffer, image_shape

    def __iter__(self) -> Iterator[Chunk]:
        mine = worker_share(self.streams)
        errors: List[ErrorEvent] = []
        readers = []
        for plan in mine:
            # A buffer larger than what the stream holds would only cycle its shards to fill up.
            readers.append([_RouteReader(self.ctx, r, plan.shards[i], plan.seeds[i],
                                         plan.skip[i] if plan.skip else 0, self.spec.attach,
                                         min(self.shuffle_buffer, max(1, plan.counts[i]))
                                         if plan.counts else self.shuffle_buffer, errors,
                                         plan.spare[i] if plan.spare else ())
                            for i, r in enumerate(self.spec.routes)])
        per = {r.name: r.per_step // self.n_streams for r in self.spec.routes}
        for step in range(self.start_step, self.spec.steps):
            for plan, rr in zip(mine, readers):
                parts = {r.route.name: r.take(per[r.route.name], self.image_shape) for r in rr}
                taken = {r.route.name: r.taken for r in rr}
                yield Chunk(step, plan.stream, parts, taken, list(errors))
                errors.clear()


def plan_streams(spec: PassSpec, shard_counts: Dict[str, Dict[str, int]], n_streams: int,
                 seed_parts: Sequence[int]) -> List[StreamPlan]:
    """All S streams of a pass (the same on every rank): per route, shards balanced by its count."""
    names = sorted(shard_counts)
    per_route = []
    for ri, r in enumerate(spec.routes):
        weights = [int(shard_counts[n].get(r.count_key, 0)) for n in names]
        per_route.append(assign_shards(names, weights, n_streams, seed_of(*seed_parts, ri)))
    spare = tuple(tuple(n for n in names if int(shard_counts[n].get(r.count_key, 0)) > 0)
                  for r in spec.routes)
    return [StreamPlan(stream=s, shards=tuple(tuple(pr[s]) for pr in per_route),
                       seeds=tuple(seed_of(*seed_parts, ri, s, 1) for ri in range(len(spec.routes))),
                       counts=tuple(sum(int(shard_counts[n].get(r.count_key, 0)) for n in pr[s])
                                    for r, pr in zip(spec.routes, per_route)),
                       spare=spare)
            for s in range(n_streams)]


def rank_streams(plans: Sequence[StreamPlan], rank: int, world: int) -> List[StreamPlan]:
    """Stream s belongs to rank s mod W: webdataset's node splitting (split_by_node's
    islice(rank, None, world)), applied to streams. Done here from explicit arguments, not
    webdataset's function, which reads RANK / WORLD_SIZE from the environment first."""
    return list(plans)[rank::world]


def worker_share(items: Sequence) -> List:
    """This DataLoader worker's items (all of them in the main process): webdataset's worker
    splitting, from torch's worker info only (its split_by_worker prefers WORKER /
    NUM_WORKERS environment variables, which a user's environment may set)."""
    info = get_worker_info()
    return list(items) if info is None else list(items)[info.id::info.num_workers]


@dataclass
class StepData:
    """One step of this rank: its streams' chunks concatenated in stream order."""
    step: int
    parts: Dict[str, Part]
    streams: List[int]                         # local streams, in order
    sizes: Dict[str, List[int]]                # per part: rows of each local stream
    taken: Dict[int, Dict[str, int]]           # per local stream and route: stream position
    errors: List[ErrorEvent]
    wait_s: float = 0.0                        # time spent waiting for the data


def _loader(dataset: IterableDataset, num_workers: int, prefetch: int) -> DataLoader:
    kw = dict(batch_size=None, num_workers=num_workers)
    if num_workers > 0:
        kw.update(prefetch_factor=max(1, prefetch), persistent_workers=False,
                  multiprocessing_context=worker_context("torch", __name__))
    return DataLoader(dataset, **kw)


def iterate_pass(ctx: StreamContext, spec: PassSpec, streams: Sequence[StreamPlan], n_streams: int,
                 start_step: int = 0, *, num_workers: int = 0, prefetch: int = 2,
                 shuffle_buffer: int = 1000, image_shape: Tuple[int, ...] = ()) -> Iterator[StepData]:
    """This rank's steps of a pass (`streams` = the rank's StreamPlans, in stream order)."""
    if not streams:
        raise ValueError("this rank owns no stream: data.streams must be >= the world size")
    # Workers take turns in the DataLoader: a worker with more streams than another would run
    # ahead and its chunks pile up here, so use a worker count that divides the streams.
    workers = max([w for w in range(1, min(num_workers, len(streams)) + 1) if len(streams) % w == 0],
                  default=0) if num_workers else 0
    ds = PassDataset(ctx, spec, streams, n_streams, start_step, shuffle_buffer, image_shape)
    order = [p.stream for p in streams]
    pending: Dict[int, Dict[int, Chunk]] = {}
    it = iter(_loader(ds, workers, prefetch))
    t0 = time.perf_counter()
    for chunk in it:
        got = pending.setdefault(chunk.step, {})
        got[chunk.stream] = chunk
        if len(got) < len(order):
            continue
        del pending[chunk.step]
        chunks = [got[s] for s in order]
        parts = {name: Part.concat([c.parts[name] for c in chunks]) for name in chunks[0].parts}
        sizes = {name: [len(c.parts[name]) for c in chunks] for name in chunks[0].parts}
        wait = time.perf_counter() - t0
        yield StepData(step=chunk.step, parts=parts, streams=order, sizes=sizes,
                       taken={c.stream: c.taken for c in chunks},
                       errors=[e for c in chunks for e in c.errors], wait_s=wait)
        t0 = time.perf_counter()


# ---------------------------------------------------------------------------- sweeps
@dataclass
class SweepBatch:
    shard: str
    part: Part
    last: bool                                 # the shard's final batch (maybe empty)
    errors: List[ErrorEvent]
    wait_s: float = 0.0


class SweepDataset(IterableDataset):
    def __init__(self, ctx: StreamContext, shards: Sequence[str], batch_size: int,
                 attach: Sequence[str], image_shape: Tuple[int, ...], need_label: bool):
        self.ctx, self.shards, self.batch_size = ctx, list(shards), batch_size
        self.attach, self.image_shape, self.need_label = tuple(attach), image_shape, need_label

    def __iter__(self) -> Iterator[SweepBatch]:
        for shard in worker_share(self.shards):
            errors: List[ErrorEvent] = []
            state = load_state(self.ctx, shard)
            buf: List[Dict] = []
            for s in join_shard(self.ctx, shard, errors, state):
                if self.need_label and s["cls"] < 0:
                    continue
                try:
                    s["image"] = self.ctx.transform(s["data"])
                except ImageDecodeError as exc:
                    errors.append(("corrupt_image", shard, s["key"], s["src"], str(exc)))
                    continue
                buf.append(_attach(_apply_fixed(s, state), state, self.attach))
                if len(buf) == self.batch_size:
                    yield SweepBatch(shard, _collate(self.ctx, buf, self.attach, self.image_shape),
                                     False, errors)
                    buf, errors = [], []
            yield SweepBatch(shard, _collate(self.ctx, buf, self.attach, self.image_shape),
                             True, errors)


def iterate_sweep(ctx: StreamContext, shards: Sequence[str], batch_size: int, *,
                  attach: Sequence[str] = (), image_shape: Tuple[int, ...] = (),
                  need_label: bool = False, num_workers: int = 0,
                  prefetch: int = 2) -> Iterator[SweepBatch]:
    """Every sample of `shards` (this rank's) once, in per-shard batches."""
    ds = SweepDataset(ctx, shards, batch_size, attach, image_shape, need_label)
    t0 = time.perf_counter()
    for b in _loader(ds, min(num_workers, max(1, len(shards))) if num_workers else 0, prefetch):
        b.wait_s = time.perf_counter() - t0
        yield b
        t0 = time.perf_counter()


def sweep_shards(shard_counts: Dict[str, int], rank: int, world: int, seed: int) -> List[str]:
    """The shards a rank sweeps: balanced by size, the same split on every rank, in name order."""
    names = sorted(shard_counts)
    mine = assign_shards(names, [max(1, shard_counts[n]) for n in names], world, seed,
                         fill_empty=False)[rank]
    return sorted(mine)
