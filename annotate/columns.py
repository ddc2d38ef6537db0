"""Write a label column beside the image shards, shard by shard, resumably and idempotently.

Every labeler (CLIP templates, the synthetic NPLL generator, a VLM through vLLM) plugs
in here: it turns a batch of images (and, for evaluation only, their true labels) into
per-sample fields. This module owns what must be the same for all of them: the key order
(1:1 with the image shard), the content hash of each shard and the skip / refuse / redo
decision it drives (annotate/provenance.py), the per-shard stats marker written last, the
totals in column.json (derived from the markers), and the reporting of damaged input.

A rerun of the same configuration skips every shard whose marker records the same content hash;
a shard whose hash differs (other model, templates, rule, input shard, ...) is *stale*: the run
refuses before writing anything, unless `overwrite` (then stale shards are relabeled: marker
removed first, tar written under a temporary name and renamed, marker written last). Shards
without a valid marker (never written, interrupted) are written. `redo_errors` relabels the
error records of done shards and copies every other record unchanged.
"""
from __future__ import annotations

import glob
import os
import re
import time
from dataclasses import dataclass
from collections import deque
from typing import Deque, Dict, List, Optional, Protocol, Sequence

import numpy as np

from coreg_dist.io import atomic_write_json
from coreg_dist.labels import to_indices
from coreg_dist.progress import progress
from coreg_dist.shards.format import (CAND, FORMAT_VERSION, TOPI, TOPP, VOTES, Manifest,
                                      column_shard_path, image_shard_path, stats_path)
from coreg_dist.shards.reader import (ErrorLog, KeyMismatchError, ShardReadError, decode_field,
                                      decode_image, image_field, iter_tar)
from coreg_dist.shards.writer import ShardWriter

from annotate.provenance import (DONE, FAILED, PENDING, STALE, ColumnSpec, ShardState,
                                 StaleColumnError, column_states, merge_sums, refresh_column_info,
                                 splits_in_scope, stale_message, summarize)

ERR = "err.txt"
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class Labeler(Protocol):
    needs_images: bool
    # Optional attributes (read with getattr):
    #   input_columns: Sequence[str]  columns this labeler reads per sample (e.g. a VLM prompted
    #                                 with another column's candidates, a merge of columns); their
    #                                 shards' content hashes enter this column's hash, and label()
    #                                 gets inputs=[{column: {field: value} | None}] (None: that
    #                                 column has an error record for the sample)
    #   needs_meta: bool              label() gets metas=[dict | None]: each image sample's `json`
    #                                 (source path/URL, caption...), e.g. to import by source path
    #   batch_dependent: bool         the output depends on how samples are batched (synthetic:
    #                                 seeded per batch); the batch size enters the hash
    #   submit(...) -> handle, collect(handle) -> dict, pipeline_batches: int, cancel(handle)
    #                                 a labeler that waits on a server (the VLM): submit() takes
    #                                 label()'s arguments and queues the work, collect() returns
    #                                 what label() would; write_column keeps pipeline_batches
    #                                 batches submitted ahead of the one it writes (records still
    #                                 written in key order), so requests flow across batches

    def label(self, images: Optional[List], true: np.ndarray, keys: List[str],
              **extra) -> Dict[str, np.ndarray]:
        """`extra`: `inputs` and/or `metas` (see above) when the labeler asks for them.
        Return at least "Y" (B, C) bool; optionally "probs" (B, d, C), "votes" (B, d),
        "topi"/"topp" (B, d, K), and "errors": B strings, non-empty for a sample that could not
        be labeled this time (a server error): it gets an error record, retried by redo_errors.
        Stored: Y (as cand), votes, topi, topp, and "fields": {member name: B values (bytes,
        str or arrays)} for extra members (the VLM's raw.json). "stats": {name: int} counts
        that are summed per shard into the marker's `labeler_stats`."""

    def provenance(self) -> Dict:
        """Everything about the labeler, recorded in every marker and in column.json."""

    # Optional: content_provenance() -> Dict, the part of provenance() that determines the
    # output (hashed). Default: provenance() itself.


def _shard_sums(out: Dict[str, np.ndarray], true: np.ndarray, single_template: int) -> Dict:
    Y = out["Y"]
    known = true >= 0
    s = {"n": int(len(Y)), "n_labeled": int(known.sum()), "sum_candidates": int(Y.sum())}
    if known.any():
        idx = np.flatnonzero(known)
        s["covered"] = int(Y[idx, true[idx]].sum())
        probs = out.get("probs")
        if probs is not None:
            p, t = probs[idx], true[idx]
            s["zero_shot_correct"] = int((p[:, single_template].argmax(1) == t).sum())
            s["template_avg_correct"] = int((p.mean(1).argmax(1) == t).sum())
            s["per_template_correct"] = (p.argmax(2) == t[:, None]).sum(0).astype(int).tolist()
        elif out.get("votes") is not None:
            # annotators that answer with one class (a VLM): accuracy of each one's answer (an
            # abstention, -1, is never right) and of the plurality answer (ties: lowest class)
            v, t = np.asarray(out["votes"])[idx].astype(np.int64), true[idx]
            s["zero_shot_correct"] = int((v[:, single_template] == t).sum())
            counts = np.zeros((len(v), Y.shape[1]), dtype=np.int64)
            rows, cols = np.nonzero(v >= 0)
            np.add.at(counts, (rows, v[rows, cols]), 1)
            s["template_avg_correct"] = int((counts.argmax(1) == t).sum())
            s["per_template_correct"] = (v == t[:, None]).sum(0).astype(int).tolist()
    return s


def requested_splits(root: str, manifest: Manifest, splits: Sequence[str], key: str) -> List[str]:
    """The configured splits the dataset has, in order; none at all is a config error naming the
    key (e.g. `vlm.splits`), the dataset and the splits it has."""
    from coreg_dist.config import ConfigError

    have = [s for s in splits if s in manifest.splits]
    if not have:
        raise ConfigError(f"config key '{key}' ({list(splits)}) names no split of the dataset "
                          f"{root} (it has {', '.join(manifest.splits)})")
    return have


def select_shards(names: Sequence[str], task_index: int, num_tasks: int) -> List[str]:
    """A deterministic share of the shards for one array task: every num_tasks-th."""
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} out of range for {num_tasks} tasks")
    return [n for i, n in enumerate(names) if i % num_tasks == task_index]


def write_column(root: str, manifest: Manifest, column: str, splits: Sequence[str],
                 labeler: Labeler, *, batch_size: int = 256, single_template: int = 0,
                 overwrite: bool = False, redo_errors: bool = False, task_index: int = 0,
                 num_tasks: int = 1, errors: Optional[ErrorLog] = None) -> Dict:
    """Label this task's share of the shards of `splits`; returns per-split statistics (summed
    from every committed marker of the column, not only this task's)."""
    errors = errors or ErrorLog()
    spec = ColumnSpec(root, manifest, column, labeler, batch_size=batch_size)
    scope = splits_in_scope(root, manifest, column, splits)
    states = column_states(root, manifest, column, scope, spec)
    stale = [s for split in scope for s in states[split] if s.state == STALE]
    if stale and not overwrite:
        raise StaleColumnError(stale_message(column, stale, root))
    if stale:
        print(f"{column}: {len(stale)} stale shard(s) (annotator.overwrite=true): this task "
              "relabels its share of them")
    for split in splits:
        entries = manifest.shards(split)
        mine = set(select_shards([e.name for e in entries], task_index, num_tasks))
        todo: List[ShardState] = []
        skipped = adopted = 0
        for st in states[split]:
            if st.name not in mine:
                continue
            if st.state == DONE:
                if redo_errors and st.has_errors:
                    todo.append(st)
                    continue
                if st.legacy:
                    _adopt_legacy(root, column, spec, st)
                    adopted += 1
                skipped += 1
            else:                          # pending, failed, or stale with overwrite
                todo.append(st)
        sizes = {e.name: e.n for e in entries}
        t0, done = time.time(), 0
        if todo:
            bar = progress(total=sum(sizes[s.name] for s in todo), desc=f"{column} {split}", unit="img")
            done = _label_shards(root, column, todo, labeler, spec, batch_size, single_template,
                                 errors, bar)
            bar.close()
        if todo or adopted:
            dt = time.time() - t0
            kinds = {k: sum(1 for s in todo if s.state == k) for k in (PENDING, FAILED, STALE, DONE)}
            what = ", ".join(f"{v} {'with error records' if k == DONE else k}"
                             for k, v in kinds.items() if v)
            print(f"{column} {split}: labeled {done} images in {len(todo)} shards ({what}), "
                  f"{done / max(dt, 1e-9):.0f} img/s; {skipped} shards already done"
                  + (f" ({adopted} written before provenance hashing: provenance matches, "
                     "marker upgraded)" if adopted else ""), flush=True)
    info = refresh_column_info(spec, scope)
    for split in scope:
        n_stale = info["splits"][split]["shards_stale"]
        if n_stale and split not in splits:
            print(f"warning: column '{column}' split {split} (not requested here) holds {n_stale} "
                  "stale shard(s); annotate that split too (annotator.splits) or the column stays "
                  "incomplete", flush=True)
        elif n_stale:
            print(f"warning: column '{column}' split {split} still holds {n_stale} stale shard(s) "
                  "(other tasks of an overwrite not finished yet, or another configuration writing "
                  "into this column at the same time: check `coreg-annotate status`)", flush=True)
    return {split: info["splits"][split] for split in splits}


def _adopt_legacy(root: str, column: str, spec: ColumnSpec, st: ShardState) -> None:
    """A marker from before content hashes whose recorded provenance matches: record the hash
    (the tar is not touched; the marker is replaced atomically)."""
    marker = dict(st.marker)
    marker.update({"content_hash": spec.hash(st.name), "content_inputs": spec.inputs(st.name),
                   "provenance_hash": spec.provenance_hash, "adopted_legacy_marker": True,
                   "error_records": st.error_records})
    atomic_write_json(stats_path(column_shard_path(root, column, st.name)), marker)
    st.marker, st.legacy = marker, False


@dataclass
class _Item:
    key: str
    img: object
    label: int
    err: str
    kept: Optional[Dict] = None        # redo_errors: the record already in the column
    inputs: Optional[Dict] = None      # {input column: decoded fields, or None for an error record}
    meta: Optional[Dict] = None        # the image sample's json (labelers with needs_meta)


def _take(out: Dict, idx: List[int]) -> Dict:
    return {k: v[idx] for k, v in out.items() if k not in ("errors", "fields", "stats")}


def _add_counts(total: Dict[str, int], more: Optional[Dict]) -> None:
    for k, v in (more or {}).items():
        total[k] = total.get(k, 0) + int(v)


def _label_shards(root, column, todo: List[ShardState], labeler, spec: ColumnSpec, batch_size,
                  single_template, errors: ErrorLog, bar) -> int:
    """Label the shards one after the other; a labeler that waits on servers and declares
    `parallel_shards` N > 1 gets N shards written at once, each by its own thread into its own
    tar: a shard is committed only when all its answers are in, and while one shard drains its
    last batches the other keeps the servers busy. Each thread reports into its own ErrorLog,
    merged at the end (ErrorLog is not thread-safe)."""
    workers = int(getattr(labeler, "parallel_shards", 1)) if hasattr(labeler, "submit") else 1
    if workers <= 1 or len(todo) <= 1:
        return sum(_label_shard(root, column, st, labeler, spec, batch_size, single_template,
                                errors, bar, redo=(st.state == DONE)) for st in todo)
    from concurrent.futures import ThreadPoolExecutor

    logs = [ErrorLog(every=errors.every, stream=errors.stream) for _ in todo]
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard")
    futures = [pool.submit(_label_shard, root, column, st, labeler, spec, batch_size,
                           single_template, log, bar, redo=(st.state == DONE))
               for st, log in zip(todo, logs)]
    try:
        return sum(f.result() for f in futures)
    finally:
        # On an error (every server down, a damaged input) shards not started are not started;
        # those running end by themselves (they see the same error, or finish and commit).
        pool.shutdown(wait=True, cancel_futures=True)
        for log in logs:
            errors.merge(log.state_dict())


def _label_shard(root, column, st: ShardState, labeler, spec: ColumnSpec, batch_size,
                 single_template, errors, bar, redo: bool = False) -> int:
    name = st.name
    src = image_shard_path(root, name)
    dst = column_shard_path(root, column, name)
    marker = stats_path(dst)
    keep: Dict[str, Dict] = {}
    base_sums: List[Dict] = []
    labeler_stats: Dict[str, int] = {}     # the labeler's own counts (VLM: abstentions, retries)
    retried = 0
    if redo:
        # Keep every good record; only the error records are labeled again.
        try:
            for key, fields in iter_tar(dst):
                if ERR in fields:
                    retried += 1
                else:
                    keep[key] = fields
            base_sums = [st.marker.get("sums", {})]
            _add_counts(labeler_stats, st.marker.get("labeler_stats"))
        except ShardReadError as exc:      # our own tar damaged: relabel all of it
            print(f"warning: {exc}; relabeling the whole shard {name}", flush=True)
            keep, retried = {}, 0
            labeler_stats.clear()
    # The marker goes first: from here until the new marker the shard is pending, never "done"
    # with a tar that does not match it.
    if os.path.exists(marker):
        os.unlink(marker)
    sums: List[Dict] = []
    t0 = time.time()
    counts = {"corrupt": 0, "label": 0, "err": 0, "truncated": 0}
    # Columns this labeler reads: joined by key, 1:1 with the image shard (their markers were
    # checked when the content hash was computed: ColumnSpec.inputs).
    input_paths = {c: column_shard_path(root, c, name) for c in spec.input_columns}
    input_iters = {c: iter_tar(p) for c, p in input_paths.items()}
    needs_meta = bool(getattr(labeler, "needs_meta", False))
    # A labeler that waits on servers gets batches submitted ahead (depth); others are called
    # batch by batch (depth 0: each batch is labeled and written before the next is read).
    depth = int(getattr(labeler, "pipeline_batches", 1)) if hasattr(labeler, "submit") else 0
    pending: Deque = deque()               # (batch, todo, true, handle or output), oldest first
    with ShardWriter(dst) as w:
        batch: List[_Item] = []

        def flush():
            """Hand the batch to the labeler, then write the batches that are due, in order."""
            items = list(batch)
            batch.clear()
            todo = [i for i, b in enumerate(items)
                    if b.kept is None and (b.img is not None or not labeler.needs_images)]
            true, handle = None, None
            if todo:
                true = np.array([items[i].label for i in todo], dtype=np.int64)
                extra = {}
                if input_paths:
                    extra["inputs"] = [items[i].inputs for i in todo]
                if needs_meta:
                    extra["metas"] = [items[i].meta for i in todo]
                args = ([items[i].img for i in todo] if labeler.needs_images else None,
                        true, [items[i].key for i in todo])
                handle = labeler.submit(*args, **extra) if depth else labeler.label(*args, **extra)
            pending.append((items, todo, true, handle))
            while len(pending) > depth:
                write_batch(*pending.popleft())

        def write_batch(items: List[_Item], todo: List[int], true, handle) -> None:
            records: Dict[int, Dict] = {}
            if todo:
                out = labeler.collect(handle) if depth else handle
                _add_counts(labeler_stats, out.get("stats"))
                extra_fields = out.get("fields") or {}
                errs = out.get("errors")
                ok = [j for j in range(len(todo)) if errs is None or not errs[j]]
                if ok:
                    sums.append(_shard_sums(_take(out, ok), true[ok], single_template))
                for j, i in enumerate(todo):
                    if errs is not None and errs[j]:
                        items[i].err = f"LabelError: {errs[j]}"
                        errors.report("label_error", name, items[i].key, str(errs[j]))
                        counts["label"] += 1
                        continue
                    fields = {CAND: to_indices(out["Y"][j])}
                    for k, f in (("votes", VOTES), ("topi", TOPI), ("topp", TOPP)):
                        if k in out:
                            fields[f] = out[k][j]
                    for member, values in extra_fields.items():
                        fields[member] = values[j]
                    records[i] = fields
            for i, b in enumerate(items):
                if b.kept is not None:
                    w.write(b.key, b.kept)
                elif i in records:
                    w.write(b.key, records[i])
                else:
                    # Keep the column aligned 1:1 with the image shard: a damaged image (or a
                    # sample the labeler failed on) gets an error record instead of labels;
                    # readers skip it together with the image.
                    w.write(b.key, {ERR: b.err})
                    counts["err"] += 1
            bar.update(len(items))

        try:
            try:
                for position, (key, fields) in enumerate(iter_tar(src)):
                    label = int(fields["cls"].decode()) if "cls" in fields else -1
                    img, err, kept = None, "", keep.get(key)
                    inputs = _next_inputs(input_iters, input_paths, src, key, position) \
                        if input_iters else None
                    meta = decode_field("json", fields["json"]) if needs_meta and "json" in fields \
                        else None
                    if labeler.needs_images and kept is None:
                        ext = image_field(fields)
                        try:
                            if ext is None:
                                raise ValueError(f"no image field among {sorted(fields)}")
                            img = decode_image(fields[ext])
                        except Exception as exc:
                            # no object addresses ("<BytesIO at 0x7f..>"): the same input gives the
                            # same bytes, so a rerun or a retry reproduces the shard exactly
                            err = _ADDRESS.sub("", f"{type(exc).__name__}: {exc}")
                            errors.report("corrupt_image", name, key, err)
                            counts["corrupt"] += 1
                    batch.append(_Item(key, img, label, err, kept, inputs, meta))
                    if len(batch) >= batch_size:
                        flush()
            except ShardReadError as exc:
                errors.report("truncated_shard", name, exc.last_key, str(exc))
                counts["truncated"] = 1
            if batch:
                flush()
            while pending:
                write_batch(*pending.popleft())
        except BaseException:
            # The shard is not committed (the writer drops its temporary file): the requests of
            # the batches still pending are not wanted any more.
            cancel = getattr(labeler, "cancel", None)
            for _, todo, _, handle in pending:
                if depth and todo and cancel is not None:
                    cancel(handle)
            raise
    stats = {"format_version": FORMAT_VERSION, "column": column, "kind": spec.kind,
             "content_hash": spec.hash(name), "provenance_hash": spec.provenance_hash,
             "content_inputs": spec.inputs(name), "sums": merge_sums(base_sums + sums),
             "error_records": counts["err"], "corrupt_images": counts["corrupt"],
             "label_errors": counts["label"], "truncated": bool(counts["truncated"]),
             "images_per_s": round(w.count / max(time.time() - t0, 1e-9), 1),
             "provenance": spec.provenance}
    if labeler_stats:
        stats["labeler_stats"] = labeler_stats
    if redo:
        stats["redo_errors"] = {"retried": retried, "still_failing": counts["err"]}
    w.commit(stats)
    _remove_leftovers(dst, t0)
    return w.count


def _next_inputs(iters: Dict, paths: Dict[str, str], src: str, key: str,
                 position: int) -> Dict[str, Optional[Dict]]:
    """The input columns' record of `key` (decoded; None for an error record). A column shard
    out of step with the image shard is a damaged dataset: stop, naming both files."""
    out: Dict[str, Optional[Dict]] = {}
    for col, it in iters.items():
        item = next(it, None)
        if item is None or item[0] != key:
            got = None if item is None else item[0]
            raise KeyMismatchError(f"key mismatch at position {position}: {src} has {key!r}, "
                                   f"input column shard {paths[col]} has {got!r}")
        fields = item[1]
        out[col] = None if ERR in fields else {n: decode_field(n, b) for n, b in fields.items()}
    return out


def _remove_leftovers(dst: str, before: float) -> None:
    """Temporary files of this shard and of its commit marker left by a task that died (older
    than this write): a task killed between the tar's rename and the marker's leaves the
    marker's."""
    for p in glob.glob(glob.escape(dst) + ".tmp-*") + glob.glob(glob.escape(stats_path(dst)) + ".tmp-*"):
        try:
            if os.path.getmtime(p) < before:
                os.unlink(p)
        except OSError:
            pass


__all__ = ["Labeler", "StaleColumnError", "requested_splits", "select_shards", "summarize",
           "write_column"]
