"""From shards to tensors: the training pool and the test split, decoded once into memory.

Where a sample goes from image to gradient:
  image shard (PNG bytes) + label column (cand.npy)  --iter_joined-->  uint8 array + multi-hot Y
  --Pool.batch(idx)-->  float tensors on the device  --method.update()-->  augment, losses, step.

Single-process runs hold the pool as uint8 arrays (Fashion-MNIST: 47 MB); every array is
ordered by shard then key, the same order the per-sample state uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from coreg_dist.labels import to_multi_hot
from coreg_dist.shards.format import CAND, Manifest
from coreg_dist.shards.reader import ErrorLog, iter_joined


@dataclass
class Pool:
    images: np.ndarray               # (N, C, H, W) uint8
    true: np.ndarray                 # (N,) int64, -1 where unknown
    Y: Optional[np.ndarray]          # (N, K) bool candidate sets (None for the test split)
    keys: List[str]
    shard_names: List[str] = field(default_factory=list)
    shard_sizes: List[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[2]

    def x(self, idx, device) -> torch.Tensor:
        """Images as float in [0, 1] on the device (the uint8 copy is what crosses to it)."""
        x = torch.from_numpy(self.images[np.asarray(idx)]).to(device, non_blocking=True)
        return x.float().div_(255.0)

    def y(self, idx, device) -> torch.Tensor:
        return torch.from_numpy(self.Y[np.asarray(idx)]).to(device).float()


def _to_array(img, mode: str) -> np.ndarray:
    a = np.asarray(img.convert(mode))
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def load_pool(root: str, manifest: Manifest, split: str, column: Optional[str] = None, *,
              max_samples: int = 0, errors: Optional[ErrorLog] = None, seed: int = 0) -> Pool:
    """Decode a split (joined with a label column) into a Pool.

    Samples with a damaged image or an invalid candidate set are reported with shard and key
    and left out; `max_samples` keeps a seeded random subset (whole shards are still read).
    """
    errors = errors or ErrorLog()
    imgs, true, Ys, keys, shard_of = [], [], [], [], []
    mode = None
    K = manifest.num_classes
    for s in iter_joined(root, split, [column] if column else [], errors=errors, manifest=manifest):
        if mode is None:
            mode = "L" if s["image"].mode in ("L", "1", "I", "I;16", "LA") else "RGB"
        if column:
            try:
                Ys.append(to_multi_hot(s[column][CAND], K, where=f"{s['shard']}/{s['key']}"))
            except (KeyError, ValueError) as exc:
                errors.report("bad_candidates", s["shard"], s["key"], str(exc))
                continue
        a = _to_array(s["image"], mode)
        if imgs and a.shape != imgs[0].shape:
            errors.report("bad_size", s["shard"], s["key"], f"image {a.shape} != {imgs[0].shape}")
            if Ys:
                Ys.pop()
            continue
        imgs.append(a)
        true.append(s["cls"])
        keys.append(s["key"])
        shard_of.append(s["shard"])
    if not imgs:
        raise ValueError(f"split '{split}' of {root} yielded no usable samples "
                         f"(errors: {errors.counts})")
    order = np.arange(len(imgs))
    if max_samples and max_samples < len(imgs):
        order = np.sort(np.random.default_rng(seed).permutation(len(imgs))[:max_samples])
    names, sizes = [], []
    for i in order:
        if not names or names[-1] != shard_of[i]:
            names.append(shard_of[i])
            sizes.append(0)
        sizes[-1] += 1
    return Pool(images=np.stack([imgs[i] for i in order]),
                true=np.asarray([true[i] for i in order], dtype=np.int64),
                Y=np.stack([Ys[i] for i in order]) if column else None,
                keys=[keys[i] for i in order], shard_names=names, shard_sizes=sizes)
