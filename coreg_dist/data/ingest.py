"""Ingest real images into shard format v1: Fashion-MNIST IDX files, a folder tree (one
subfolder per class), or existing WebDataset image shards without labels (img2dataset output
as it is).

    coreg-data ingest --config configs/demo.yaml data.root=data/fmnist      # Fashion-MNIST
    coreg-data ingest data.source=folder data.source_path=/data/pets data.root=data/pets \
        data.ingest_workers=8                                              # 8 reader processes
    coreg-data ingest data.source=wds data.source_path=/data/laion-dl data.classes='[cat,dog]' \
        data.root=data/laion                                               # an img2dataset folder
    coreg-data ingest ... data.source_path='/data/laion/{00000..00099}.tar'  # braces, globs, pipe:/http
    # SLURM array over the source shards (wds): task i of N takes every N-th source shard; the
    # last task to finish writes manifest.json (or run --finalize once all tasks are done)
    coreg-data ingest --config my.yaml --task-index 3 --num-tasks 16
    coreg-data ingest --config my.yaml --finalize

Keys come from the source, never from a position (docs/format.md "Keys"): Fashion-MNIST
`fmnist_<part>_<index in the IDX file>`, a folder tree `<file stem>-<sha256(relative path)[:16]>`,
WebDataset the source `__key__`.

Splits. Fashion-MNIST: as always, a permutation seeded by `run.seed` reserves the annotator
split, the training pool is the rest, the test split is the source's own. A folder tree: each
image's split follows from a hash of (seed, key) against bounds fixed by the first ingest (the
`test_size`/`annotator_split`/`train_pool` counts of that listing), so the split of an image
never changes when others are added. A WebDataset source: everything is the training pool.

Every image is decoded once here (PIL `load`, in the worker processes); an image that does not
decode, an unreadable or empty file, a sample without an image, a truncated source tar is left
out (`data.keep_broken=true` keeps undecodable bytes), named by its source path (a folder's
relative path; `<source shard>:<key>.<ext>` for WebDataset) with the reason, counted, and
listed in manifest.json `source.errors`. A class folder without an image stops the ingest
(`data.allow_empty_classes=true`: a warning, and `source.empty_classes` in the manifest).

Incremental: rerun the same command after the source grew. Shards already written are kept
byte for byte (their label columns stay done); new images go into new shards; manifest.json is
re-derived from the shard markers. Removed source files are reported and their samples kept.
Other ingest parameters (seed, split sizes, shard size, class list, ...) are refused.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import struct
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from coreg_dist.data.ingest_jobs import (FolderShardJob, PixelShardJob, WdsShardJob, folder_key,
                                         png_bytes, run_jobs, sanitize)
from coreg_dist.io import file_lock, read_json
from coreg_dist.shards.format import (IMAGE_DIR, IMAGE_EXTS, SPLITS, FormatError, Manifest,
                                      ShardEntry, image_shard_path, is_committed, read_manifest,
                                      shard_name, stats_path, write_manifest, MANIFEST)
from coreg_dist.shards.reader import ErrorLog

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
FOLDER_KEYS = "relpath-sha256-16"     # recorded in the params: a change of key rule is a new dataset
WDS_KEYS = "source-key"
WDS_SHARD_KEYS = "source-shard-key"
LOCK_FILE = ".ingest.lock"
MAX_ERROR_EXAMPLES = 1000             # in manifest.json; every shard's marker lists all of its own
SHOW = 5                              # names printed per kind of problem

__all__ = ["FASHION_MNIST_CLASSES", "folder_key", "ingest", "png_bytes", "read_idx"]


# ---------------------------------------------------------------------------- IDX (Fashion-MNIST)
def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the MNIST family's format."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FormatError(f"IDX file not found: {path}") from None
    except (OSError, EOFError) as exc:
        raise FormatError(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise FormatError(f"{path}: not an IDX file (bad magic number)")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(data[2])
    if dtype is None:
        raise FormatError(f"{path}: unknown IDX data type 0x{data[2]:02x}")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise FormatError(f"{path}: IDX header says {dims} ({int(np.prod(dims))} values), "
                          f"file holds {body.size}")
    return body.reshape(dims)


def _find_idx(folder: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    raise FormatError(f"{folder}: no {stem}[.gz] (install the Debian package dataset-fashion-mnist, "
                      "or set data.source_path to a folder with the IDX files)")


def _ingest_fashion_mnist(cfg, params: Dict, workers: int) -> Manifest:
    """Unchanged since the first format: the same keys, splits, shard bytes and manifest params."""
    d = cfg.data
    t0 = time.time()
    errors = ErrorLog()
    rng = np.random.default_rng(cfg.run.seed)
    parts = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find_idx(d.source_path, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(d.source_path, f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise FormatError(f"{d.source_path}: {prefix} has {len(images)} images but "
                              f"{len(labels)} labels")
        parts[part] = (images, labels)
    n_pool, n_test = len(parts["train"][0]), len(parts["test"][0])
    test = np.arange(n_test)
    if d.test_size:
        test = np.sort(rng.permutation(n_test)[:d.test_size])
    order = rng.permutation(n_pool)
    if annotator_split(d) >= n_pool:
        raise FormatError(f"data.annotator_split={annotator_split(d)} leaves no training pool "
                          f"({n_pool} images)")
    reserved = np.sort(order[:annotator_split(d)])
    rest = order[annotator_split(d):]
    if d.train_pool:
        rest = rest[:d.train_pool]
    splits = {"train": ("train", np.sort(rest)), "test": ("test", test),
              "annotator": ("train", reserved)}
    entries: Dict[str, List[ShardEntry]] = {}
    jobs = []
    for split, (part, idx) in splits.items():
        if not len(idx):
            continue
        images, labels = parts[part]
        entries[split] = []
        for s in range(0, len(idx), d.shard_size):
            chunk = idx[s:s + d.shard_size]
            name = shard_name(split, s // d.shard_size)
            entries[split].append(ShardEntry(name, len(chunk)))
            path = image_shard_path(d.root, name)
            if is_committed(path):           # resumable: a committed shard is kept as it is
                continue
            jobs.append(PixelShardJob(path, split, [f"fmnist_{part}_{i:06d}" for i in chunk],
                                      images[chunk], [int(labels[i]) for i in chunk]))
    total = sum(len(j.keys) for j in jobs)
    run_jobs(jobs, workers, total=total, desc="ingest fashion-mnist")
    name = d.name or "fashion-mnist"
    manifest = Manifest(name=name, classes=list(FASHION_MNIST_CLASSES), splits=entries,
                        source={"params": params, "errors": errors.summary(),
                                "seconds": round(time.time() - t0, 1)})
    write_manifest(d.root, manifest)
    print(f"ingested {name} into {d.root}: "
          + ", ".join(f"{s} {len(v[1])}" for s, v in splits.items())
          + f" in {time.time() - t0:.1f}s" + (f"; {errors.total} bad samples" if errors.total else ""))
    return manifest


# ---------------------------------------------------------------------------- shared: markers, lock
def _marker_files(root: str) -> List[str]:
    return sorted(glob.glob(os.path.join(root, IMAGE_DIR, "*.stats.json")))


def read_image_markers(root: str, keep_paths: bool = False) -> List[Dict]:
    """The commit markers of every committed image shard under ROOT/images, sorted by name,
    each with `_name` (the shard) added. A marker without its tar is not committed (ignored).

    The long per-sample lists are not kept: `keys` becomes `_key_hashes` (8 bytes a key, for
    the uniqueness check), `paths` is dropped unless `keep_paths` (a folder's re-ingest needs
    them; its listing is as long)."""
    out = []
    for marker in _marker_files(root):
        name = os.path.basename(marker)[: -len(".stats.json")]
        if not os.path.isfile(image_shard_path(root, name)):
            continue
        m = _read_marker(marker)
        keys = m.pop("keys", None) or []
        m["_key_hashes"] = np.fromiter((_key_hash(k) for k in keys), dtype=np.uint64, count=len(keys))
        if not keep_paths:
            m.pop("paths", None)
        m["_name"] = name
        out.append(m)
    return out


def _read_marker(path: str) -> Dict:
    try:
        return read_json(path)
    except ValueError as exc:
        raise FormatError(f"{path}: image shard marker is not valid JSON ({exc}); delete it and "
                          "its .tar to have the shard written again") from None


def ingest_lock(root: str):
    """An exclusive flock on ROOT/images/.ingest.lock while the manifest is derived and written,
    so that of several array tasks the last to take it has seen every committed shard
    (`coreg-data ingest --finalize` re-derives it where the filesystem has no locks)."""
    return file_lock(os.path.join(root, IMAGE_DIR, LOCK_FILE))


def _param_diff(old: Optional[Dict], new: Dict) -> str:
    if not isinstance(old, dict):
        return "no recorded parameters"
    keys = sorted(set(old) | set(new), key=lambda k: (k not in new, str(k)))
    return ", ".join(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
                     for k in keys if old.get(k, "<absent>") != new.get(k, "<absent>"))


def _check_markers(root: str, markers: List[Dict], params: Dict) -> None:
    """Shards written with other ingest parameters (or by another kind of ingest) are refused:
    mixing them would give a dataset that no single configuration describes."""
    for m in markers:
        if m.get("ingest_params") != params:
            raise FormatError(f"{stats_path(image_shard_path(root, m['_name']))} was written with other "
                              f"ingest parameters ({_param_diff(m.get('ingest_params'), params)}); "
                              "choose another data.root or delete it")


def _error_summary(records: List[Dict]) -> Dict:
    counts: Dict[str, int] = {}
    for r in records:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    # size and mtime are the markers' retry bookkeeping, not news for a reader of the manifest
    examples = [{k: v for k, v in r.items() if k not in ("bytes", "mtime_ns")}
                for r in records[:MAX_ERROR_EXAMPLES]]
    return {"counts": counts, "total": len(records), "examples": examples,
            "listed_in": "images/<shard>.stats.json: broken (all of them)"}


def _write_if_changed(root: str, manifest: Manifest) -> bool:
    """manifest.json is derived from the markers (no timestamps): rewritten only if different."""
    path = os.path.join(root, MANIFEST)
    if os.path.isfile(path):
        try:
            if read_json(path) == json.loads(json.dumps(manifest.to_json())):
                return False
        except ValueError:
            pass
    write_manifest(root, manifest)
    return True


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def find_duplicate_keys(root: str, markers: List[Dict]) -> Optional[Tuple[str, str, str]]:
    """(key, shard, other shard) of the first key held twice, or None. 8 bytes per key in memory
    (the markers' 64-bit key hashes, sorted); a hash held twice is confirmed on the key strings
    of the two shards only."""
    parts = [m["_key_hashes"] for m in markers]
    if not parts or not sum(len(p) for p in parts):
        return None
    hashes = np.concatenate(parts)
    owner = np.repeat(np.arange(len(markers)), [len(p) for p in parts])
    order = np.argsort(hashes, kind="stable")
    sorted_h = hashes[order]
    for j in np.nonzero(sorted_h[1:] == sorted_h[:-1])[0]:
        a, b, h = int(owner[order[j]]), int(owner[order[j + 1]]), int(sorted_h[j])

        def keys_of(m: Dict) -> List[str]:
            path = stats_path(image_shard_path(root, m["_name"]))
            return [k for k in _read_marker(path).get("keys", []) if _key_hash(k) == h]
        ka, kb = keys_of(markers[a]), keys_of(markers[b])
        if a == b:
            if len(set(ka)) < len(ka):
                return ka[0], markers[a]["_name"], markers[b]["_name"]
        elif set(ka) & set(kb):
            return sorted(set(ka) & set(kb))[0], markers[a]["_name"], markers[b]["_name"]
    return None


def _names(items: Sequence[str], n: int = SHOW) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _print_errors(summary: Dict) -> None:
    if not summary["total"]:
        return
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(summary["counts"].items()))
    print(f"{summary['total']} source problems ({kinds}), listed in manifest.json source.errors:")
    for r in summary["examples"][:SHOW]:
        kept = " (kept: data.keep_broken=true)" if r.get("kept") else ""
        last = (f", last good key {r['last_good_key']!r}" if r.get("last_good_key") is not None
                else ", nothing readable" if "last_good_key" in r else "")
        print(f"  {r['kind']}: {r['path']}: {r['reason']}{last}{kept}")
    if summary["total"] > SHOW:
        print(f"  ... and {summary['total'] - SHOW} more")


def _report_run(root: str, results: List[Dict], seconds: float, seen: int) -> None:
    written = sum(r["n"] for r in results)
    rate = seen / seconds if seconds > 0 else 0.0
    print(f"wrote {len(results)} shard(s) with {written} images into {root} in {seconds:.1f}s "
          f"({rate:.0f} images/s read and verified)")


# ---------------------------------------------------------------------------- folder tree
@dataclass
class FolderListing:
    classes: List[str]                     # the class folders, sorted
    files: List[Tuple[str, str, str]]      # (relative path, class name, caption relative path or "")
    ignored: int                           # files that are neither images nor captions


def list_folder(root: str) -> FolderListing:
    """Paths only (no file is opened): one subfolder per class, image files by extension anywhere
    below it; `x.txt` beside `x.jpg` is its caption. Names starting with '.' are skipped (macOS
    `._x.jpg` resource forks, `.DS_Store`, editor files)."""
    if not os.path.isdir(root):
        raise FormatError(f"image folder not found: {root}")
    classes = sorted(d for d in os.listdir(root)
                     if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise FormatError(f"{root}: no class subfolders (one subfolder per class expected)")
    files: List[Tuple[str, str, str]] = []
    ignored = 0
    for cname in classes:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cname)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            names = sorted(f for f in filenames if not f.startswith("."))
            texts = {os.path.splitext(f)[0]: f for f in names if f.lower().endswith(".txt")}
            captions_used = set()
            for fname in names:
                stem, ext = os.path.splitext(fname)
                if ext.lower().lstrip(".") not in IMAGE_EXTS:
                    continue
                rel = os.path.relpath(os.path.join(dirpath, fname), root).replace(os.sep, "/")
                cap = ""
                if stem in texts:
                    cap = os.path.relpath(os.path.join(dirpath, texts[stem]), root).replace(os.sep, "/")
                    captions_used.add(texts[stem])
                files.append((rel, cname, cap))
            ignored += sum(1 for f in names if os.path.splitext(f)[1].lower().lstrip(".")
                           not in IMAGE_EXTS and f not in captions_used)
    files.sort(key=lambda f: f[0])
    return FolderListing(classes, files, ignored)


def split_rank(seed: int, key: str) -> int:
    """A sample's place in the split order: 64 bits of sha256("<seed>:<key>")."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()[:8], "big")


def split_bounds(ranks: Sequence[int], n_test: int, n_annotator: int, train_pool: int) -> Dict:
    """Exclusive upper rank bounds of test, annotator and train (None: unbounded), so that the
    listing's n_test lowest ranks are the test split, the next n_annotator the annotator split,
    the next train_pool (or all the rest) the training pool."""
    r = sorted(ranks)

    def at(i: int) -> Optional[int]:
        return r[i] if i < len(r) else None
    return {"test": at(n_test), "annotator": at(n_test + n_annotator),
            "train": at(n_test + n_annotator + train_pool) if train_pool else None}


def assign_split(rank: int, bounds: Dict) -> Optional[str]:
    for split in ("test", "annotator", "train"):
        b = bounds[split]
        if b is None or rank < b:
            return split
    return None                       # beyond data.train_pool: left out


def _bounds_to_json(bounds: Dict) -> Dict:
    return {k: (None if v is None else f"{v:016x}") for k, v in bounds.items()}


def _bounds_from_json(bounds: Dict) -> Dict:
    return {k: (None if v is None else int(v, 16)) for k, v in bounds.items()}


def _ingest_folder(cfg, params: Dict, workers: int, manifest: Optional[Manifest]) -> Manifest:
    d = cfg.data
    t0 = time.time()
    listing = list_folder(d.source_path)
    markers = read_image_markers(d.root, keep_paths=True)
    _check_markers(d.root, markers, params)

    # the class list is fixed by the first ingest: a new class folder is a new dataset
    recorded = manifest.classes if manifest is not None else None
    if recorded is None and markers:
        recorded = markers[0].get("classes")
    classes = list(recorded) if recorded is not None else listing.classes
    new_classes = [c for c in listing.classes if c not in classes]
    if new_classes:
        raise FormatError(f"{d.source_path}: class folder(s) {_names(new_classes)} are not among the "
                          f"{len(classes)} classes ingested into {d.root}: a new class changes the "
                          "class indices of every label column; ingest into another data.root. "
                          "Nothing was written.")
    gone_classes = [c for c in classes if c not in listing.classes]
    index = {c: i for i, c in enumerate(classes)}

    # what the committed shards already hold
    ingested: Dict[str, str] = {}            # relative path -> shard
    broken_before: Dict[str, Dict] = {}      # relative path -> broken record
    next_index = {s: 0 for s in SPLITS}
    per_class = [0] * len(classes)
    for m in markers:
        split, num = m.get("split"), m["_name"].rsplit("-", 1)[-1]
        if split in next_index and num.isdigit():
            next_index[split] = max(next_index[split], int(num) + 1)
        for p in m.get("paths", []):
            ingested[p] = m["_name"]
        for r in m.get("broken", []):
            broken_before[r["path"]] = r
        for i, c in enumerate(m.get("per_class", [])):
            per_class[i] += c

    # split bounds: recorded by the first ingest (manifest, or any shard of a first ingest that
    # stopped early); otherwise from this listing, exact counts as configured
    bounds_json = (manifest.source.get("split_bounds") if manifest is not None else None) or \
        (markers[0].get("split_bounds") if markers else None)
    keys = {rel: folder_key(rel) for rel, _, _ in listing.files}
    if bounds_json is None:
        n = len(listing.files)
        if n == 0:
            raise FormatError(f"{d.source_path}: no image files ({', '.join(IMAGE_EXTS)}) under the "
                              "class folders")
        n_test = d.test_size or max(1, n // 10)
        if n_test + annotator_split(d) >= n:
            raise FormatError(f"data.test_size={n_test} and data.annotator_split={annotator_split(d)} "
                              f"leave no training pool ({n} images under {d.source_path})")
        bounds = split_bounds([split_rank(cfg.run.seed, k) for k in keys.values()], n_test,
                              annotator_split(d), d.train_pool)
        bounds_json = _bounds_to_json(bounds)
    bounds = _bounds_from_json(bounds_json)

    # the new files: not in a shard yet, or recorded broken and changed since
    listed = set()
    new: Dict[str, List[Tuple[str, int, str]]] = {s: [] for s in SPLITS}
    left_out = retried = 0
    new_per_class = [0] * len(classes)
    for rel, cname, cap in listing.files:
        listed.add(rel)
        if rel in ingested:
            continue
        if rel in broken_before:
            r = broken_before[rel]
            try:
                st = os.stat(os.path.join(d.source_path, rel))
                same = (st.st_size, st.st_mtime_ns) == (r.get("bytes"), r.get("mtime_ns"))
            except OSError:
                same = r["kind"] == "unreadable_file"
            if same:
                continue
            retried += 1
        split = assign_split(split_rank(cfg.run.seed, keys[rel]), bounds)
        if split is None:
            left_out += 1
            continue
        new[split].append((rel, index[cname], cap))
        new_per_class[index[cname]] += 1
    removed = sorted(p for p in ingested if p not in listed)

    empty = [c for i, c in enumerate(classes) if per_class[i] + new_per_class[i] == 0]
    if empty and not d.allow_empty_classes:
        raise FormatError(_empty_message(d.source_path, empty, "has no image files")
                          + " Nothing was written.")

    marker = {"ingest_params": params, "split_bounds": bounds_json, "classes": classes}
    jobs = []
    for split in SPLITS:
        files = new[split]
        for s in range(0, len(files), d.shard_size):
            name = shard_name(split, next_index[split] + s // d.shard_size)
            jobs.append(FolderShardJob(image_shard_path(d.root, name), split, d.source_path,
                                       files[s:s + d.shard_size], len(classes), marker,
                                       d.keep_broken))
    total = sum(len(j.files) for j in jobs)
    print(f"{d.source_path}: {len(listing.files)} images listed in {len(classes)} class folders, "
          f"{len(ingested)} already ingested, {total} to read"
          + (f" ({retried} changed since they failed)" if retried else "")
          + (f", {len(removed)} removed from the source (their samples are kept)" if removed else ""))
    results, seconds, seen = run_jobs(jobs, workers, total=total, desc="ingest")
    if jobs:
        _report_run(d.root, results, seconds, seen)

    with ingest_lock(d.root):
        markers = read_image_markers(d.root, keep_paths=True)
        entries = _entries(markers)
        ingested_now = {p for m in markers for p in m.get("paths", [])}
        errors, seen_paths = [], set()
        for m in reversed(markers):          # a file that failed twice: its latest record
            for r in m.get("broken", []):
                if r["path"] in seen_paths or (r["path"] in ingested_now and not r.get("kept")):
                    continue
                seen_paths.add(r["path"])
                errors.append(r)
        errors.reverse()
        counts = [0] * len(classes)
        for m in markers:
            for i, c in enumerate(m.get("per_class", [])):
                counts[i] += c
        empty = [c for i, c in enumerate(classes) if counts[i] == 0]
        dup = find_duplicate_keys(d.root, markers)
        if dup:
            raise FormatError(f"key {dup[0]!r} is in shards {dup[1]} and {dup[2]} of {d.root}: "
                              "two source files gave the same key (docs/format.md, Keys)")
        source = {"params": params, "split_bounds": bounds_json,
                  "errors": _error_summary(errors),
                  "per_class": dict(zip(classes, counts)),
                  "empty_classes": empty,
                  "removed": {"count": len(removed), "examples": removed[:MAX_ERROR_EXAMPLES],
                              "note": "in the shards, no longer in the source: kept"},
                  "ignored_files": listing.ignored,
                  "left_out_by_train_pool": left_out}
        if gone_classes:
            source["class_folders_missing"] = gone_classes
        name = d.name or os.path.basename(os.path.normpath(d.source_path))
        out = Manifest(name=name, classes=classes, splits=entries, source=source)
        if empty and not d.allow_empty_classes:
            raise FormatError(_empty_message(d.source_path, empty, "has no decodable image")
                              + " The shards written are kept; manifest.json was not written. "
                              "Add images to the folder and rerun (only the new ones are read).")
        changed = _write_if_changed(d.root, out)
    _summary(d.root, out, changed, removed, empty, listing.ignored, left_out, time.time() - t0)
    return out


def _empty_message(root: str, empty: List[str], what: str) -> str:
    return (f"class folder(s) {_names([repr(c) for c in empty])} under {root} {what}: a class "
            "without examples breaks few-shot labels and per-class evaluation. Add images, remove "
            "the folder, or set data.allow_empty_classes=true to keep the class with a warning.")


def _entries(markers: List[Dict]) -> Dict[str, List[ShardEntry]]:
    """The manifest's splits from the committed markers: shards sorted by name, empty ones (every
    image of the chunk broken, or an unreadable source tar) left out."""
    entries: Dict[str, List[ShardEntry]] = {}
    for split in SPLITS:
        got = [ShardEntry(m["_name"], int(m["n"])) for m in markers
               if m.get("split") == split and int(m.get("n", 0)) > 0]
        if got:
            entries[split] = got
    return entries


def _summary(root: str, m: Manifest, changed: bool, removed: Sequence[str], empty: Sequence[str],
             ignored: int, left_out: int, seconds: float, unit: str = "file",
             changed_sources: Sequence[str] = ()) -> None:
    """What an ingest did, for both source kinds: `unit` names what `removed` lists (folder
    files, WebDataset source shards)."""
    counts = ", ".join(f"{s} {m.count(s)}" for s in m.splits)
    state = "manifest.json written" if changed else "manifest.json up to date"
    print(f"{m.name} at {root}: {counts} ({len(m.classes)} classes); {state} ({seconds:.1f}s)")
    _print_errors(m.source["errors"])
    if empty:
        print(f"warning: class(es) without an image, kept (data.allow_empty_classes=true): "
              f"{_names(list(empty))}", file=sys.stderr)
    if removed:
        print(f"warning: {len(removed)} ingested {unit}(s) are no longer in the source; their "
              f"samples are kept: {_names(list(removed))}", file=sys.stderr)
    if changed_sources:
        print(f"warning: {len(changed_sources)} source shard(s) changed size since they were "
              f"ingested (kept as ingested): {_names(list(changed_sources))}", file=sys.stderr)
    if ignored:
        print(f"note: {ignored} file(s) without an image extension were ignored")
    if left_out:
        print(f"note: {left_out} image(s) left out by data.train_pool")


# ---------------------------------------------------------------------------- WebDataset shards
@dataclass
class WdsSource:
    url: str                 # what open_shard opens
    rel: str                 # relative to the pattern's fixed folder (reported, recorded)
    suffix: str              # output shard `train-<suffix>`
    bytes: Optional[int]     # size of a local file (a change is reported)
    expected: Optional[int]  # images, from img2dataset's <stem>_stats.json "successes"


def _is_url(s: str) -> bool:
    return "://" in s or s.startswith("pipe:")


def list_wds(pattern: str) -> List[WdsSource]:
    """The source shards: a folder (its *.tar: img2dataset's .parquet and _stats.json are not
    shards), a glob, a brace range `{00000..00099}`, a `::`-separated list, or URLs
    (`pipe:...`, `http(s)://...`).
    Output names come from the source's own names, never from their order: `00042.tar` ->
    `train-000042`, `part/a.tar` -> `train-part_a`; a grown source keeps the old names."""
    # webdataset's own shard-list syntax: braces, `::`-separated lists, $WDS_* variables
    from webdataset.shardlists import expand_urls
    if _is_url(pattern):
        urls = expand_urls(pattern)
        rels = [re.split(r"[/\s]", u.rstrip())[-1] for u in urls]
        found = list(zip(urls, rels, [None] * len(urls)))
    else:
        # names are taken relative to the pattern's fixed folder (of its first part), never to
        # the folder the matches happen to share: a grown source keeps its shard names
        prefix = re.split(r"[*?\[{$]", pattern.split("::")[0], maxsplit=1)[0]
        if os.path.isdir(pattern):
            base, paths = pattern, sorted(glob.glob(os.path.join(pattern, "*.tar")))
        else:
            base = prefix if prefix.endswith("/") else os.path.dirname(prefix)
            paths = []
            for p in expand_urls(pattern):
                paths += sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else [p]
        found = []
        for p in paths:
            if not os.path.isfile(p):
                raise FormatError(f"WebDataset source shard not found: {p} (from data.source_path="
                                  f"{pattern})")
            found.append((p, os.path.relpath(p, base or ".").replace(os.sep, "/"), os.path.getsize(p)))
    if not found:
        raise FormatError(f"no WebDataset shards match data.source_path={pattern}")
    out, by_suffix = [], {}
    for url, rel, size in found:
        stem = rel[:-4] if rel.endswith(".tar") else rel
        suffix = f"{int(stem):06d}" if stem.isdigit() else sanitize(stem.replace("/", "_"))
        if suffix in by_suffix:
            raise FormatError(f"source shards {by_suffix[suffix]} and {rel} would both be written to "
                              f"train-{suffix}: rename one of them")
        by_suffix[suffix] = rel
        expected = None
        if size is not None:
            stats = os.path.join(os.path.dirname(url), os.path.basename(stem) + "_stats.json")
            if os.path.isfile(stats):
                try:
                    expected = int(read_json(stats).get("successes"))
                except (ValueError, TypeError):
                    expected = None
        out.append(WdsSource(url, rel, suffix, size, expected))
    return out


def _check_wds_markers(root: str, markers: List[Dict], params: Dict, classes: List[str]) -> None:
    _check_markers(root, markers, params)
    for m in markers:
        if m.get("classes") != classes:
            raise FormatError(f"{stats_path(image_shard_path(root, m['_name']))} was written with "
                              f"classes {m.get('classes')}, data.classes is {classes}; choose "
                              "another data.root")


def _ingest_wds(cfg, params: Dict, workers: int, manifest: Optional[Manifest],
                task_index: int, num_tasks: int, finalize_only: bool) -> Optional[Manifest]:
    d = cfg.data
    t0 = time.time()
    classes = list(d.classes)
    if manifest is not None and manifest.classes != classes:
        raise FormatError(f"{d.root}/{MANIFEST} has classes {manifest.classes}, data.classes is "
                          f"{classes}: the class indices of every label column would change; "
                          "choose another data.root")
    sources = list_wds(d.source_path)
    marker = {"ingest_params": params, "classes": classes}
    if not finalize_only:
        # each task reads the markers of its own shards only; the last one checks them all
        mine = sources[task_index::num_tasks]
        jobs, todo = [], []
        for s in mine:
            path = image_shard_path(d.root, f"train-{s.suffix}")
            if is_committed(path):
                old = _read_marker(stats_path(path))
                old["_name"] = f"train-{s.suffix}"
                _check_wds_markers(d.root, [old], params, classes)
                if not old.get("source_error"):
                    continue              # done; a source shard that could not be read is retried
            prefix = s.suffix if d.wds_shard_in_key else ""
            jobs.append(WdsShardJob(path, s.url, s.rel, s.bytes, prefix, marker, d.keep_broken))
            todo.append(s)
        # img2dataset's <shard>_stats.json says how many images each tar holds: a bar with an end
        total = sum(s.expected for s in todo) if all(s.expected is not None for s in todo) else None
        where = f" (task {task_index} of {num_tasks})" if num_tasks > 1 else ""
        print(f"{d.source_path}: {len(sources)} source shard(s); {len(mine)} for this task{where}, "
              f"{len(jobs)} to ingest")
        results, seconds, seen = run_jobs(jobs, workers, total=total, desc="ingest")
        if jobs:
            _report_run(d.root, results, seconds, seen)

    with ingest_lock(d.root):
        # a stat per source shard first: the markers are read only once every shard is there
        missing = [s.rel for s in sources
                   if not is_committed(image_shard_path(d.root, f"train-{s.suffix}"))]
        if missing:
            msg = (f"{len(missing)} of {len(sources)} source shard(s) not ingested yet "
                   f"({_names(missing)})")
            if finalize_only:
                raise FormatError(f"{msg}: run the remaining array tasks (or the ingest without "
                                  "--task-index) first")
            print(f"{msg}: other tasks' work; the last task to finish writes manifest.json "
                  "(or run `coreg-data ingest ... --finalize` when all are done)")
            return None
        markers = read_image_markers(d.root)
        _check_wds_markers(d.root, markers, params, classes)
        by_rel = {s.rel: s for s in sources}
        removed = sorted(m["source"]["shard"] for m in markers
                         if m.get("source", {}).get("shard") not in by_rel)
        changed_src = sorted(m["source"]["shard"] for m in markers
                             if m.get("source", {}).get("shard") in by_rel
                             and by_rel[m["source"]["shard"]].bytes not in (None, m["source"].get("bytes")))
        errors = [r for m in markers for r in m.get("broken", [])]
        dup = find_duplicate_keys(d.root, markers)
        if dup:
            raise FormatError(f"key {dup[0]!r} is in shards {dup[1]} and {dup[2]} of {d.root} (source "
                              f"keys repeat across source shards): ingest into a new data.root with "
                              "data.wds_shard_in_key=true (keys become <shard>_<__key__>)")
        source = {"params": params, "errors": _error_summary(errors),
                  "source_shards": len(sources),
                  "removed": {"count": len(removed), "examples": removed[:MAX_ERROR_EXAMPLES],
                              "note": "source shards gone from the source: their samples are kept"},
                  "changed": {"count": len(changed_src), "examples": changed_src[:MAX_ERROR_EXAMPLES],
                              "note": "source shards whose size changed since ingest: kept as "
                                      "ingested; delete images/train-<shard>.* to re-ingest one"}}
        out = Manifest(name=d.name or "wds-import", classes=classes, splits=_entries(markers),
                       source=source)
        if not out.splits:
            _print_errors(source["errors"])
            raise FormatError(f"no image could be ingested from data.source_path={d.source_path} "
                              "(the problems are listed above); manifest.json was not written")
        changed = _write_if_changed(d.root, out)
    _summary(d.root, out, changed, removed, [], 0, 0, time.time() - t0, unit="source shard",
             changed_sources=changed_src)
    return out


# ---------------------------------------------------------------------------- entry point
def annotator_split(d) -> int:
    """data.annotator_split, with -1 (the default) resolved: 1000, or 0 for a wds source."""
    if d.annotator_split >= 0:
        return int(d.annotator_split)
    return 0 if d.source == "wds" else 1000


def ingest_params(cfg) -> Dict:
    """What determines the dataset's content. Fashion-MNIST: the keys it always had, so existing
    datasets stay valid. Workers, task split and allow_empty_classes change no shard: not here."""
    d = cfg.data
    if d.source == "fashion_mnist":
        return {"source": d.source, "source_path": d.source_path, "seed": cfg.run.seed,
                "annotator_split": annotator_split(d), "train_pool": d.train_pool,
                "test_size": d.test_size, "shard_size": d.shard_size}
    if d.source == "folder":
        return {"source": d.source, "source_path": d.source_path, "seed": cfg.run.seed,
                "annotator_split": annotator_split(d), "train_pool": d.train_pool,
                "test_size": d.test_size, "shard_size": d.shard_size, "keys": FOLDER_KEYS,
                "keep_broken": d.keep_broken}
    if d.source == "wds":
        # no seed: a wds source has no split to draw, and run.seed may change between trainings
        return {"source": d.source, "source_path": d.source_path,
                "keys": WDS_SHARD_KEYS if d.wds_shard_in_key else WDS_KEYS,
                "keep_broken": d.keep_broken}
    raise FormatError(f"data.source: unknown source '{d.source}' (fashion_mnist | folder | wds)")


def ingest(cfg, task_index: int = 0, num_tasks: int = 1,
           finalize_only: bool = False) -> Optional[Manifest]:
    """Build (or grow) the dataset described by `cfg.data` under `cfg.data.root`. Idempotent.

    Returns the manifest, or None for an array task that finished before the others."""
    d = cfg.data
    params = ingest_params(cfg)
    workers = max(0, int(d.ingest_workers))
    if (num_tasks > 1 or finalize_only) and d.source != "wds":
        raise FormatError(f"array tasks (--task-index/--num-tasks, --finalize) split a wds source by "
                          f"source shard; for data.source={d.source} use data.ingest_workers=N")
    if not 0 <= task_index < num_tasks:
        raise FormatError(f"task index {task_index} is not in [0, {num_tasks})")
    if d.source == "wds":
        if not d.classes:
            raise FormatError("data.classes must list the class names for an unlabeled wds source")
        if annotator_split(d):
            raise FormatError("data.annotator_split must be 0 for an unlabeled wds source "
                              "(the embedded annotator needs labeled images)")
        if d.test_size or d.train_pool:
            raise FormatError("data.test_size and data.train_pool must be 0 for an unlabeled wds "
                              "source: it has no labels to evaluate on, and the training subset is "
                              "chosen at training time (train.max_train_samples, by key hash)")
    manifest = None
    if os.path.isfile(os.path.join(d.root, MANIFEST)):
        manifest = read_manifest(d.root)
        old = manifest.source.get("params")
        if old != params:
            raise FormatError(f"{d.root}/{MANIFEST} was written with other ingest parameters "
                              f"({_param_diff(old, params)}); choose another data.root or delete it")
        if d.source == "fashion_mnist":
            print(f"dataset already ingested at {d.root} "
                  f"({', '.join(f'{k}: {manifest.count(k)}' for k in manifest.splits)})")
            return manifest
    if d.source == "fashion_mnist":
        return _ingest_fashion_mnist(cfg, params, workers)
    if d.source == "folder":
        return _ingest_folder(cfg, params, workers, manifest)
    return _ingest_wds(cfg, params, workers, manifest, task_index, num_tasks, finalize_only)
