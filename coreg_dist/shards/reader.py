"""Read shards, and join image shards with their column shards by key.

A column shard must hold the same keys in the same order as its image shard; the join checks
every key and fails loudly on the first mismatch (`KeyMismatchError`). Damage that loses
samples but leaves the rest readable is reported and skipped, never silently dropped:
a corrupt image is counted (with shard and key) and skipped, a truncated tar yields what it
holds up to the damage and the error names the shard and the last good key.
"""
from __future__ import annotations

import io
import os
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from webdataset.tariterators import base_plus_ext

from coreg_dist.shards.format import (IMAGE_EXTS, FormatError, Manifest, column_shard_path,
                                      image_shard_path, read_manifest, require_column_shards)
from coreg_dist.shards.tario import TarDamage, iter_members


class KeyMismatchError(FormatError):
    """A column shard whose keys do not line up with its image shard."""


class ShardReadError(FormatError):
    """A tar that cannot be read to its end (truncated or corrupt)."""

    def __init__(self, path: str, last_key: Optional[str], cause: BaseException):
        self.path, self.last_key, self.cause = path, last_key, cause
        where = f"after key {last_key!r}" if last_key else "before the first sample"
        super().__init__(f"{path}: unreadable {where} ({type(cause).__name__}: {cause})")


class ErrorLog:
    """Counts bad samples by kind; prints the first of each kind and then every `every`-th.

    A sample is counted once per kind however often it is met (training reads every shard
    many times); `combine` sums the summaries of several ranks."""

    def __init__(self, every: int = 100, stream=None, keep: int = 200):
        self.every, self.keep = every, keep
        self.stream = stream if stream is not None else sys.stderr
        self.counts: Dict[str, int] = {}
        self.examples: List[Dict[str, str]] = []
        self._seen: set = set()

    def report(self, kind: str, shard: str, key: Optional[str], message: str) -> None:
        ident = (kind, shard, key or "")
        if ident in self._seen:
            return
        self._seen.add(ident)
        n = self.counts.get(kind, 0) + 1
        self.counts[kind] = n
        if len(self.examples) < self.keep:
            self.examples.append({"kind": kind, "shard": shard, "key": key or "", "error": message})
        if n == 1 or n % self.every == 0:
            print(f"[{kind} #{n}] {shard} key={key}: {message}", file=self.stream, flush=True)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> Dict:
        return {"counts": dict(self.counts), "examples": self.examples[:20]}

    def state_dict(self) -> Dict:
        return {"counts": dict(self.counts), "examples": list(self.examples),
                "seen": [list(i) for i in self._seen]}

    def load_state_dict(self, s: Dict) -> None:
        self.counts, self.examples = dict(s["counts"]), list(s["examples"])
        self._seen = {tuple(i) for i in s["seen"]}

    def merge(self, s: Dict) -> None:
        """Add another log's state_dict (a rank of an earlier run), counting each sample once."""
        for ident in s["seen"]:
            ident = tuple(ident)
            if ident not in self._seen:
                self._seen.add(ident)
                self.counts[ident[0]] = self.counts.get(ident[0], 0) + 1
        for e in s["examples"]:
            if len(self.examples) < self.keep and e not in self.examples:
                self.examples.append(e)

    @staticmethod
    def combine(states: List[Dict]) -> Dict:
        """One summary from several ranks' `state_dict()`s: a sample met on two ranks (in
        different passes) counts once; examples likewise, the first 20 kept."""
        seen = set()
        counts: Dict[str, int] = {}
        examples: List[Dict[str, str]] = []
        for s in states:
            for ident in s["seen"]:
                if tuple(ident) not in seen:
                    seen.add(tuple(ident))
                    counts[ident[0]] = counts.get(ident[0], 0) + 1
            for e in s["examples"]:
                ident = (e["kind"], e["shard"], e["key"])
                if not any((x["kind"], x["shard"], x["key"]) == ident for x in examples):
                    examples.append(e)
        return {"counts": counts, "examples": examples[:20]}


def open_shard(url: str):
    """Open a shard for reading: a local path, or any URL webdataset's gopen opens
    (`pipe:cmd`, `http(s)://`, `file:`, ...)."""
    if "://" in url or url.startswith("pipe:"):
        from webdataset.gopen import gopen
        return gopen(url, "rb")
    if not os.path.isfile(url):
        raise FormatError(f"shard not found: {url}")
    return open(url, "rb")


def iter_tar_spans(path: str) -> Iterator[Tuple[str, Dict[str, bytes], int, int]]:
    """Yield (key, {field: bytes}, start, end) in file order: a sample is the run of adjacent
    members whose names share a key (webdataset's `base_plus_ext`), `start`/`end` its byte span.

    `path` is a local file or a URL (see open_shard). Raises ShardReadError (naming the last
    good key) if the tar is truncated or corrupt.
    """
    last_key = None
    url = os.path.basename(path)
    stream = open_shard(path)
    finished = False
    try:
        try:
            key, fields, span = None, {}, (0, 0)
            for name, data, start, end in iter_members(stream, url):
                prefix, suffix = base_plus_ext(name)
                if prefix is None:
                    continue
                suffix = suffix.lower()
                if prefix != key:
                    if key is not None:
                        last_key = key
                        yield key, fields, span[0], span[1]
                    key, fields, span = prefix, {}, (start, end)
                if suffix in fields:
                    raise ValueError(f"{name}: duplicate file name in tar file")
                fields[suffix] = data
                span = (span[0], end)
            if key is not None:
                last_key = key
                yield key, fields, span[0], span[1]
            finished = True
        except (TarDamage, EOFError, OSError, ValueError) as exc:
            raise ShardReadError(path, last_key, exc) from None
    finally:
        try:
            stream.close()
        except Exception as exc:
            # A pipe whose command failed reports it on close; a reader that stopped early
            # (the consumer had enough) may see its writer killed by SIGPIPE: not an error.
            if finished:
                raise ShardReadError(path, last_key, exc) from None


def iter_tar(path: str) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """Yield (key, {field: bytes}) in file order (see iter_tar_spans)."""
    for key, fields, _, _ in iter_tar_spans(path):
        yield key, fields


def read_spans(path: str, spans: Sequence[Tuple[int, int]]) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """The samples at the given byte spans of a local tar, in the order given (seek + read):
    a pass that needs a few samples of a shard reads only those. Raises ShardReadError."""
    url = os.path.basename(path)
    last_key = None
    with open_shard(path) as f:
        for start, end in spans:
            f.seek(int(start))
            data = f.read(int(end) - int(start))
            try:
                if len(data) < end - start:
                    raise TarDamage(f"truncated: span {start}-{end} is past the end ({url})")
                fields, key = {}, None
                for name, value, _, _ in iter_members(io.BytesIO(data), url, archive=False):
                    prefix, suffix = base_plus_ext(name)
                    key = prefix
                    fields[suffix.lower()] = value
            except (TarDamage, ValueError) as exc:
                raise ShardReadError(path, last_key, exc) from None
            last_key = key
            yield key, fields


def decode_field(name: str, data: bytes):
    """npy -> ndarray, cls -> int, json -> object; anything else stays bytes."""
    if name.endswith("npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    if name == "cls":
        return int(data.decode("utf-8").strip())
    if name.endswith("json"):
        import json
        return json.loads(data.decode("utf-8"))
    return data


def image_field(fields: Dict[str, bytes]) -> Optional[str]:
    for ext in IMAGE_EXTS:
        if ext in fields:
            return ext
    return None


def decode_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()                       # force the full decode here, so corruption surfaces now
    return img


def iter_joined(root: str, split: str, columns: Sequence[str] = (), *,
                errors: Optional[ErrorLog] = None, decode_images: bool = True,
                shards: Optional[Sequence[str]] = None,
                manifest: Optional[Manifest] = None) -> Iterator[Dict]:
    """Yield the samples of a split with their columns joined by key.

    Each sample: {"key", "shard", "image" (PIL image, or bytes if not decode_images),
    "cls" (int, -1 if unknown), <column>: {field: value}}.
    """
    manifest = manifest or read_manifest(root)
    errors = errors or ErrorLog()
    names = list(shards) if shards is not None else [s.name for s in manifest.shards(split)]
    for shard in names:
        img_path = image_shard_path(root, shard)
        for col in columns:
            require_column_shards(root, col, [shard])
        col_paths = {col: column_shard_path(root, col, shard) for col in columns}
        yield from _join_shard(shard, img_path, col_paths, errors, decode_images)


def _join_shard(shard: str, img_path: str, col_paths: Dict[str, str], errors: ErrorLog,
                decode_images: bool) -> Iterator[Dict]:
    col_iters = {c: iter_tar(p) for c, p in col_paths.items()}
    images = iter_tar(img_path)
    position = 0
    while True:
        try:
            item = next(images, None)
        except ShardReadError as exc:
            errors.report("truncated_shard", shard, exc.last_key, str(exc))
            return
        col_items = {}
        for col, it in col_iters.items():
            try:
                col_items[col] = next(it, None)
            except ShardReadError as exc:
                errors.report("truncated_shard", shard, exc.last_key, str(exc))
                return
        if item is None:
            extra = [c for c, v in col_items.items() if v is not None]
            if extra:
                raise KeyMismatchError(f"column shard {col_paths[extra[0]]} has more samples than "
                                       f"{img_path} (extra key {col_items[extra[0]][0]!r} at "
                                       f"position {position})")
            return
        key, fields = item
        sample = {"key": key, "shard": shard, "cls": -1}
        for col, citem in col_items.items():
            if citem is None or citem[0] != key:
                got = None if citem is None else citem[0]
                raise KeyMismatchError(f"key mismatch at position {position} of shard {shard}: "
                                       f"{img_path} has {key!r}, {col_paths[col]} has {got!r}")
            sample[col] = {n: decode_field(n, b) for n, b in citem[1].items()}
        position += 1
        if "cls" in fields:
            try:
                sample["cls"] = decode_field("cls", fields["cls"])
            except ValueError as exc:
                errors.report("bad_label", shard, key, f"cls field: {exc}")
        ext = image_field(fields)
        if ext is None:
            errors.report("missing_image", shard, key, f"no image field among {sorted(fields)}")
            continue
        if decode_images:
            try:
                sample["image"] = decode_image(fields[ext])
            except Exception as exc:  # PIL raises many types for damaged bytes
                errors.report("corrupt_image", shard, key, f"{ext}: {type(exc).__name__}: {exc}")
                continue
        else:
            sample["image"] = fields[ext]
        sample["image_ext"] = ext
        yield sample
