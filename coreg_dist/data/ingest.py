"""Ingest real images into shard format v1: Fashion-MNIST IDX files, a folder tree
(one subfolder per class), or existing WebDataset image shards without labels.

    coreg-data ingest --config configs/demo.yaml data.root=data/fmnist

Splits are deterministic given `run.seed`: a fixed permutation of the source's training
images gives the reserved annotator split first and the training pool after it; the test
split is the source's own test set (Fashion-MNIST) or a held-out part of the images.
Images are stored as they came (folder/wds sources) or PNG-encoded (IDX pixels).
"""
from __future__ import annotations

import glob
import gzip
import io
import os
import re
import struct
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
from PIL import Image

from coreg_dist.shards.format import (IMAGE_EXTS, FormatError, Manifest, ShardEntry,
                                      image_shard_path, is_committed, read_manifest, shard_name,
                                      write_manifest, MANIFEST)
from coreg_dist.shards.reader import image_field, iter_tar, ShardReadError, ErrorLog
from coreg_dist.shards.writer import ShardWriter
from coreg_dist.progress import progress

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]


@dataclass
class Item:
    """One source image: a stable key, how to get its bytes, its extension and (maybe) its label."""
    key: str
    load: Callable[[], bytes]
    ext: str
    label: int = -1
    meta: Optional[Dict] = None


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


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def fashion_mnist_items(folder: str):
    """Items of the IDX train and test files, keyed by their position in the source file."""
    out = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise FormatError(f"{folder}: {prefix} has {len(images)} images but {len(labels)} labels")
        out[part] = [Item(f"fmnist_{part}_{i:06d}", (lambda px=images[i]: png_bytes(px)), "png",
                          int(labels[i])) for i in range(len(images))]
    return FASHION_MNIST_CLASSES, out


# ---------------------------------------------------------------------------- folder tree
def folder_items(root: str):
    """One subfolder per class (sorted names = class indices); files with image extensions."""
    if not os.path.isdir(root):
        raise FormatError(f"image folder not found: {root}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise FormatError(f"{root}: no class subfolders")
    items = []
    for ci, cname in enumerate(classes):
        for path in sorted(glob.glob(os.path.join(root, cname, "**", "*"), recursive=True)):
            ext = os.path.splitext(path)[1].lower().lstrip(".")
            if not os.path.isfile(path) or ext not in IMAGE_EXTS:
                continue
            rel = os.path.relpath(path, root)
            items.append(Item(f"img_{len(items):08d}", (lambda p=path: open(p, "rb").read()),
                              "jpg" if ext == "jpeg" else ext, ci, {"path": rel}))
    if not items:
        raise FormatError(f"{root}: no image files ({', '.join(IMAGE_EXTS)}) under the class folders")
    return classes, items


# ---------------------------------------------------------------------------- WebDataset images
def wds_items(pattern: str, errors: ErrorLog):
    """Images from existing WebDataset shards (img2dataset style); labels are not read."""
    paths = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else (
        sorted(glob.glob(os.path.join(pattern, "*.tar"))) if os.path.isdir(pattern) else [pattern])
    if not paths:
        raise FormatError(f"no WebDataset shards match {pattern}")
    items = []
    for path in paths:
        try:
            for key, fields in iter_tar(path):
                ext = image_field(fields)
                if ext is None:
                    errors.report("missing_image", os.path.basename(path), key, "no image field")
                    continue
                safe = re.sub(r"[^A-Za-z0-9_\-]", "_", key)
                data = fields[ext]
                items.append(Item(f"wds_{len(items):08d}_{safe}"[:120], (lambda d=data: d), ext, -1,
                                  {"source": os.path.basename(path), "key": key}))
        except ShardReadError as exc:
            errors.report("truncated_shard", os.path.basename(path), exc.last_key, str(exc))
    return items


# ---------------------------------------------------------------------------- writing
def write_split(root: str, split: str, items: Sequence[Item], shard_size: int,
                errors: ErrorLog) -> List[ShardEntry]:
    """Write a split's shards; a shard with its commit marker is kept as it is (resumable)."""
    entries = []
    n_shards = (len(items) + shard_size - 1) // shard_size
    bar = progress(total=len(items), desc=f"ingest {split}", unit="img")
    for s in range(n_shards):
        name = shard_name(split, s)
        path = image_shard_path(root, name)
        chunk = items[s * shard_size:(s + 1) * shard_size]
        if is_committed(path):
            entries.append(ShardEntry(name, len(chunk)))
            bar.update(len(chunk))
            continue
        with ShardWriter(path) as w:
            for it in chunk:
                fields = {it.ext: it.load()}
                if it.label >= 0:
                    fields["cls"] = it.label
                if it.meta:
                    fields["json"] = it.meta
                w.write(it.key, fields)
                bar.update(1)
        labels = [it.label for it in chunk if it.label >= 0]
        w.commit({"split": split, "labeled": len(labels)})
        entries.append(ShardEntry(name, w.count))
    bar.close()
    return entries


def ingest(cfg) -> Manifest:
    """Build the dataset described by `cfg.data` under `cfg.data.root`. Idempotent."""
    d = cfg.data
    params = {"source": d.source, "source_path": d.source_path, "seed": cfg.run.seed,
              "annotator_split": d.annotator_split, "train_pool": d.train_pool,
              "test_size": d.test_size, "shard_size": d.shard_size}
    if os.path.isfile(os.path.join(d.root, MANIFEST)):
        m = read_manifest(d.root)
        if m.source.get("params") == params:
            print(f"dataset already ingested at {d.root} ({', '.join(f'{k}: {m.count(k)}' for k in m.splits)})")
            return m
        raise FormatError(f"{d.root}/{MANIFEST} was written with other ingest parameters "
                          f"({m.source.get('params')}); choose another data.root or delete it")
    t0 = time.time()
    errors = ErrorLog()
    rng = np.random.default_rng(cfg.run.seed)
    if d.source == "fashion_mnist":
        classes, parts = fashion_mnist_items(d.source_path)
        pool, test = parts["train"], parts["test"]
        name = d.name or "fashion-mnist"
        if d.test_size:
            test = [test[i] for i in np.sort(rng.permutation(len(test))[:d.test_size])]
    elif d.source == "folder":
        classes, pool = folder_items(d.source_path)
        name = d.name or os.path.basename(os.path.normpath(d.source_path))
        order = rng.permutation(len(pool))
        n_test = d.test_size or max(1, len(pool) // 10)
        test = [pool[i] for i in np.sort(order[:n_test])]
        pool = [pool[i] for i in np.sort(order[n_test:])]
    elif d.source == "wds":
        if not d.classes:
            raise FormatError("data.classes must list the class names for an unlabeled wds source")
        classes = list(d.classes)
        pool = wds_items(d.source_path, errors)
        name = d.name or "wds-import"
        test = []
        if d.annotator_split:
            raise FormatError("data.annotator_split must be 0 for an unlabeled wds source "
                              "(the embedded annotator needs labeled images)")
    else:
        raise FormatError(f"data.source: unknown source '{d.source}' (fashion_mnist | folder | wds)")
    order = rng.permutation(len(pool))
    if d.annotator_split >= len(pool):
        raise FormatError(f"data.annotator_split={d.annotator_split} leaves no training pool "
                          f"({len(pool)} images)")
    reserved = [pool[i] for i in np.sort(order[:d.annotator_split])]
    rest = order[d.annotator_split:]
    if d.train_pool:
        rest = rest[:d.train_pool]
    train = [pool[i] for i in np.sort(rest)]
    splits = {"train": train, "test": test, "annotator": reserved}
    entries = {s: write_split(d.root, s, items, d.shard_size, errors)
               for s, items in splits.items() if items}
    manifest = Manifest(name=name, classes=list(classes), splits=entries,
                        source={"params": params, "errors": errors.summary(),
                                "seconds": round(time.time() - t0, 1)})
    write_manifest(d.root, manifest)
    print(f"ingested {name} into {d.root}: " + ", ".join(f"{s} {len(v)}" for s, v in splits.items())
          + f" in {time.time() - t0:.1f}s" + (f"; {errors.total} bad samples" if errors.total else ""))
    return manifest
