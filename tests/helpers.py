"""Tiny real datasets for tests: shard format v1 written through the project's own writers."""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from coreg_dist.shards.format import (Manifest, ShardEntry, image_shard_path, shard_name,
                                      write_manifest)
from coreg_dist.shards.writer import ShardWriter


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def class_images(n: int, num_classes: int, size: int = 16, seed: int = 0):
    """Images whose class is visible: a bright bar whose row depends on the class, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    imgs = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    band = max(1, size // num_classes)
    for i, y in enumerate(labels):
        imgs[i, y * band:(y + 1) * band, :] = 230
    return imgs, labels


def make_dataset(root: str, n_train: int = 40, n_test: int = 20, num_classes: int = 4,
                 shard_size: int = 16, size: int = 16, seed: int = 0) -> Manifest:
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        imgs, labels = class_images(n, num_classes, size, seed + (split == "test"))
        entries = []
        for s in range(0, n, shard_size):
            name = shard_name(split, s // shard_size)
            with ShardWriter(image_shard_path(root, name)) as w:
                for i in range(s, min(n, s + shard_size)):
                    w.write(f"{split}_{i:05d}", {"png": png(imgs[i]), "cls": int(labels[i])})
            w.commit({})
            entries.append(ShardEntry(name, w.count))
        splits[split] = entries
    m = Manifest(name="tiny", classes=[f"class{c}" for c in range(num_classes)], splits=splits)
    write_manifest(root, m)
    return m


def make_labeled_dataset(root: str, n_train: int = 48, n_test: int = 24, num_classes: int = 4,
                         shard_size: int = 16, size: int = 16) -> str:
    """make_dataset plus a synthetic candidate column named 'synthetic' (q = eta = 0.2)."""
    from annotate.cli import annotate_synthetic
    from coreg_dist.config import load_config

    make_dataset(root, n_train=n_train, n_test=n_test, num_classes=num_classes,
                 shard_size=shard_size, size=size)
    annotate_synthetic(load_config(None, [f"data.root={root}", f"run.out_dir={root}/ann",
                                          "synthetic.q=0.2", "synthetic.eta=0.2"]))
    return root


def corrupt_images(root: str, shard: str, rows=None) -> None:
    """Replace the image bytes of the given rows (every row if None) of an image shard with bytes
    that are not an image, keeping keys and labels."""
    from coreg_dist.shards.reader import iter_tar

    path = image_shard_path(root, shard)
    samples = list(iter_tar(path))
    with ShardWriter(path) as w:
        for i, (key, fields) in enumerate(samples):
            if rows is None or i in rows:
                fields = dict(fields, png=b"\x89PNG\r\n\x1a\n not an image")
            w.write(key, fields)
