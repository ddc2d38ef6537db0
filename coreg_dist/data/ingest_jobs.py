"""The work units of an ingest: one job writes one image shard, start to finish.

A job reads its source images (IDX pixels, files of a folder tree, one source WebDataset tar),
decode-verifies each image, writes the shard under a temporary name, renames it and writes its
commit marker last (`coreg_dist.shards.writer.ShardWriter`). A job holds one sample's bytes at
a time, so memory does not grow with the source; jobs are independent, so they run in worker
processes (`run_jobs(..., workers=N)`) or in-process (`workers=0`) with byte-identical shards.

What a job could not ingest is named in its marker (`broken`: source path and reason; a
truncated source tar: `truncated` with the last good key), never as an object repr.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
from PIL import Image

from coreg_dist.shards.format import FormatError, stats_path
from coreg_dist.shards.reader import ShardReadError, image_field, iter_tar
from coreg_dist.shards.writer import ShardWriter
from coreg_dist.progress import progress
from coreg_dist.runtime import worker_context

_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")
# PIL names the stream it failed on: "cannot identify image file <_io.BytesIO object at 0x7f..>".
_OBJECT_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")
STEM_CHARS = 48          # a folder key keeps this much of the file name: readable, bounded


# ---------------------------------------------------------------------------- keys
def sanitize(text: str) -> str:
    """Letters, digits, '_' and '-' only (WebDataset splits member names at the first dot)."""
    return _KEY_CHARS.sub("_", text)


def short_hash(text: str, n: int) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def folder_key(rel_path: str) -> str:
    """Key of a folder-tree image: its sanitized file stem and 16 hex digits of the sha256 of its
    relative path (POSIX separators). Depends on that path only, never on which other files exist;
    the hash keeps `a/x.jpg`, `b/x.jpg` and `x.png` apart."""
    stem = os.path.splitext(os.path.basename(rel_path))[0]
    return f"{sanitize(stem)[:STEM_CHARS] or 'img'}-{short_hash(rel_path, 16)}"


def wds_key(source_key: str, prefix: str = "") -> str:
    """Key of an imported WebDataset sample: its `__key__`; a key that had to be sanitized gets
    8 hex digits of the original's sha256 (so `a.b` and `a_b` stay apart); `prefix` (the output
    shard's suffix, data.wds_shard_in_key) for sources whose keys repeat across shards."""
    safe = sanitize(source_key)
    if safe != source_key or not safe:
        safe = f"{safe or 'k'}-{short_hash(source_key, 8)}"
    return f"{prefix}_{safe}" if prefix else safe


# ---------------------------------------------------------------------------- encoding, verification
def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return buf.getvalue()



def clean_reason(exc: BaseException, where: str) -> str:
    """`Type: message` with object reprs replaced by the source path."""
    msg = _OBJECT_REPR.sub(repr(where), str(exc)) or "no message"
    return f"{type(exc).__name__}: {msg}"


def check_image(data: bytes, where: str) -> Optional[Tuple[str, str]]:
    """None if PIL fully decodes the bytes, else (kind, reason). `load()`, not `verify()`: verify
    reads no pixel data and passes a truncated JPEG."""
    if not data:
        return "empty_file", "empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for damaged bytes
        return "corrupt_image", clean_reason(exc, where)
    return None


# ---------------------------------------------------------------------------- progress
_counter = None          # a shared multiprocessing.Value in worker processes


def _init_worker(counter) -> None:
    global _counter
    _counter = counter


class _Ticker:
    """Counts images for the parent's progress bar: directly in-process, through a shared
    counter (updated every `every` images, to keep the lock cold) in a worker process."""

    def __init__(self, update: Optional[Callable[[int], None]], every: int = 32):
        self.update, self.every, self.pending = update, every, 0

    def __call__(self, n: int = 1) -> None:
        self.pending += n
        if self.pending >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        if self.update is not None:
            self.update(self.pending)
        elif _counter is not None:
            with _counter.get_lock():
                _counter.value += self.pending
        self.pending = 0


# ---------------------------------------------------------------------------- jobs
@dataclass
class PixelShardJob:
    """Fashion-MNIST: IDX pixels, PNG-encoded. The marker holds exactly what it always did."""
    path: str
    split: str
    keys: List[str]
    pixels: np.ndarray            # (n, H, W) uint8
    labels: List[int]

    def run(self, tick: _Ticker) -> Dict:
        with ShardWriter(self.path) as w:
            for key, px, label in zip(self.keys, self.pixels, self.labels):
                fields = {"png": png_bytes(px)}
                if label >= 0:
                    fields["cls"] = int(label)
                w.write(key, fields)
                tick()
        w.commit({"split": self.split, "labeled": sum(1 for v in self.labels if v >= 0)})
        return {"shard": os.path.basename(self.path), "n": w.count, "broken": []}


@dataclass
class FolderShardJob:
    """Files of a folder tree, in the order given: (relative path, class index, caption path or '')."""
    path: str
    split: str
    root: str
    files: List[Tuple[str, int, str]]
    num_classes: int
    marker: Dict = field(default_factory=dict)   # recorded as is (ingest params, split bounds)
    keep_broken: bool = False

    def run(self, tick: _Ticker) -> Dict:
        broken: List[Dict] = []
        paths: List[str] = []
        per_class = [0] * self.num_classes
        with ShardWriter(self.path) as w:
            for rel, label, caption_rel in self.files:
                full = os.path.join(self.root, rel)
                ext = os.path.splitext(rel)[1].lower().lstrip(".")
                ext = "jpg" if ext == "jpeg" else ext
                tick()
                try:
                    st = os.stat(full)
                    with open(full, "rb") as f:
                        data = f.read()
                except OSError as exc:
                    broken.append({"kind": "unreadable_file", "path": rel,
                                   "reason": clean_reason(exc, rel)})
                    continue
                bad = check_image(data, rel)
                if bad is not None:
                    # size and mtime: a re-ingest retries a broken file only once it has changed
                    broken.append({"kind": bad[0], "path": rel, "reason": bad[1],
                                   "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                                   "kept": self.keep_broken})
                    if not self.keep_broken:
                        continue
                fields: Dict = {ext: data, "cls": label, "json": {"path": rel}}
                if caption_rel:
                    try:
                        with open(os.path.join(self.root, caption_rel), "rb") as f:
                            fields["txt"] = f.read()
                    except OSError as exc:
                        broken.append({"kind": "unreadable_caption", "path": caption_rel,
                                       "reason": clean_reason(exc, caption_rel)})
                w.write(folder_key(rel), fields)
                paths.append(rel)
                per_class[label] += 1
        tick.flush()
        w.commit({"split": self.split, "labeled": w.count, **self.marker, "keys": list(w.keys),
                  "paths": paths, "per_class": per_class, "broken": broken})
        return {"shard": os.path.basename(self.path), "n": w.count, "broken": broken}


@dataclass
class WdsShardJob:
    """One source WebDataset tar -> one image shard (train split), streamed sample by sample."""
    path: str
    source_url: str               # what open_shard opens: a local path or a URL
    source_rel: str               # its name relative to the source folder (recorded, reported)
    source_bytes: Optional[int]
    key_prefix: str = ""
    marker: Dict = field(default_factory=dict)
    keep_broken: bool = False

    def run(self, tick: _Ticker) -> Dict:
        broken: List[Dict] = []
        extra: Dict = {}
        # a source shard that could not be read is retried over its old (empty) shard: the old
        # marker goes first, so no reader ever pairs it with the new tar
        if os.path.exists(stats_path(self.path)):
            os.unlink(stats_path(self.path))
        with ShardWriter(self.path) as w:
            last_key: Optional[str] = None
            try:
                for src_key, fields in iter_tar(self.source_url):
                    tick()
                    where = f"{self.source_rel}:{src_key}"
                    ext = image_field(fields)
                    if ext is None:
                        has = ", ".join(sorted(fields)) or "nothing"
                        broken.append({"kind": "missing_image", "path": where,
                                       "source_shard": self.source_rel, "key": src_key,
                                       "reason": f"no image member (has: {has})"})
                        last_key = src_key
                        continue
                    where = f"{where}.{ext}"
                    bad = check_image(fields[ext], where)
                    if bad is not None:
                        broken.append({"kind": bad[0], "path": where, "source_shard": self.source_rel,
                                       "key": src_key, "reason": bad[1], "kept": self.keep_broken})
                        if not self.keep_broken:
                            last_key = src_key
                            continue
                    w.write(wds_key(src_key, self.key_prefix),
                            _wds_fields(ext, fields, self.source_rel, src_key))
                    last_key = src_key
            except ShardReadError as exc:
                kind = "truncated_shard" if last_key is not None else "unreadable_shard"
                reason = clean_reason(exc.cause, self.source_rel)
                rec = {"kind": kind, "path": self.source_rel, "source_shard": self.source_rel,
                       "last_good_key": last_key, "reason": reason}
                broken.append(rec)
                extra["truncated" if kind == "truncated_shard" else "source_error"] = rec
            except FormatError as exc:     # not found (open_shard)
                rec = {"kind": "unreadable_shard", "path": self.source_rel,
                       "source_shard": self.source_rel, "last_good_key": None, "reason": str(exc)}
                broken.append(rec)
                extra["source_error"] = rec
        tick.flush()
        w.commit({"split": "train", "labeled": 0, **self.marker,
                  "source": {"shard": self.source_rel, "bytes": self.source_bytes},
                  "keys": list(w.keys), "broken": broken, **extra})
        return {"shard": os.path.basename(self.path), "n": w.count, "broken": broken}


def _wds_fields(ext: str, fields: Dict[str, bytes], source_rel: str, src_key: str) -> Dict:
    """The sample as stored: the image as it came, the caption (`txt`) as it came, and our json:
    where it came from plus the source json (img2dataset: url, caption, width, height, status,
    ...) under `src`, or its text under `src_text` if it is not valid JSON."""
    import json
    meta: Dict = {"source": source_rel, "key": src_key}
    if "json" in fields:
        try:
            meta["src"] = json.loads(fields["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            meta["src_text"] = fields["json"].decode("utf-8", errors="replace")
    out: Dict = {ext: fields[ext], "json": meta}
    if "txt" in fields:
        out["txt"] = fields["txt"]
    return out


def _run_job(job) -> Dict:
    """Entry point in a worker process."""
    tick = _Ticker(None)
    return job.run(tick)


# ---------------------------------------------------------------------------- the runner
def run_jobs(jobs: Iterable, workers: int, total: Optional[int] = None,
             desc: str = "ingest") -> Tuple[List[Dict], float, int]:
    """Run every job; returns (job results in completion order, seconds, images seen).

    `workers=0`: in this process, in order. Otherwise a pool of `workers` processes, fed at
    most 2 jobs per worker ahead, so a long job list is never all queued at once. A failing job
    (disk full, ...) stops the run with its error; the shards already committed stay valid and a
    rerun skips them. The progress bar shows images/s."""
    t0 = time.time()
    bar = progress(total=total, desc=desc, unit="img")
    results: List[Dict] = []
    seen = 0
    try:
        if workers <= 0:
            def update(n: int) -> None:
                nonlocal seen
                seen += n
                bar.update(n)
            for job in jobs:
                tick = _Ticker(update)
                results.append(job.run(tick))
                tick.flush()
            return results, time.time() - t0, seen
        # a spawned worker would re-import webdataset and with it torch (1-2 s each): the fork
        # server imports this module once and forks the workers from there
        ctx = worker_context(__name__)
        counter = ctx.Value("q", 0)
        it = iter(jobs)
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(counter,)) as pool:
            pending = set()

            def refill() -> None:
                while len(pending) < 2 * workers:
                    job = next(it, None)
                    if job is None:
                        return
                    pending.add(pool.submit(_run_job, job))
            refill()
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    now = counter.value
                    bar.update(now - seen)
                    seen = now
                    for f in done:
                        results.append(f.result())
                    refill()
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
        bar.update(counter.value - seen)
        seen = counter.value
        return results, time.time() - t0, seen
    finally:
        bar.close()
        sys.stderr.flush()
