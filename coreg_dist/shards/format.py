"""Shard format v1: names, paths and the dataset manifest. The spec is docs/format.md.

    ROOT/manifest.json                       the dataset: classes, splits, image shards + counts
    ROOT/images/<split>-<NNNNNN>.tar         WebDataset image shards (image bytes as they came, .cls)
    ROOT/images/<split>-<NNNNNN>.stats.json  commit marker of the image shard
    ROOT/columns/<col>/<shard>.tar           column shard: same basename, same keys, same order
    ROOT/columns/<col>/<shard>.stats.json    commit marker of the column shard (written last)
    ROOT/columns/<col>/column.json           provenance + totals, derived from the shard markers

A column is anything per-sample that lives beside the images: an annotator's candidate sets,
votes and scores, merged sets, per-sample training state. Several columns coexist.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from coreg_dist.io import atomic_write_json, read_json

FORMAT_NAME = "coreg-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_DIR = "images"
COLUMN_DIR = "columns"
COLUMN_INFO = "column.json"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
SPLITS = ("train", "test", "annotator")
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")

# Fields of a candidate-label column sample (see docs/format.md).
CAND = "cand.npy"        # int16 (k,)   sorted candidate class indices, k >= 1
VOTES = "votes.npy"      # int16 (d,)   each annotator's choice
TOPI = "topi.npy"        # int16 (d,K)  each annotator's K most probable classes
TOPP = "topp.npy"        # float16 (d,K) their probabilities
SOFT = "soft.npy"        # float16 (C,) annotator-averaged probabilities (optional)


class FormatError(ValueError):
    """A dataset that does not follow the format; the message names the file and field."""


def check_key(key: str, where: str = "") -> str:
    # WebDataset splits a member name at its first dot, so keys must not contain one.
    if not _KEY_RE.match(key):
        raise FormatError(f"invalid sample key {key!r}{' in ' + where if where else ''}: "
                          "use letters, digits, '_' and '-' only")
    return key


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def image_shard_path(root: str, shard: str) -> str:
    return os.path.join(root, IMAGE_DIR, shard + ".tar")


def column_dir(root: str, column: str) -> str:
    return os.path.join(root, COLUMN_DIR, column)


def column_shard_path(root: str, column: str, shard: str) -> str:
    return os.path.join(column_dir(root, column), shard + ".tar")


def stats_path(tar_path: str) -> str:
    """The commit marker beside a shard: `x.tar` -> `x.stats.json`."""
    return tar_path[: -len(".tar")] + ".stats.json" if tar_path.endswith(".tar") else tar_path + ".stats.json"


def is_committed(tar_path: str) -> bool:
    return os.path.isfile(tar_path) and os.path.isfile(stats_path(tar_path))


def require_column_shards(root: str, column: str, shards) -> None:
    """Every shard named needs a committed shard of the column; the error names the first
    missing one and how many more there are."""
    missing = [s for s in shards if not is_committed(column_shard_path(root, column, s))]
    if missing:
        raise FormatError(f"column '{column}' has no committed shard for {missing[0]}"
                          f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: "
                          f"{column_shard_path(root, column, missing[0])} (or its .stats.json) is "
                          "missing; run the annotator for it")


def image_shard_identity(root: str, shard: str) -> Dict:
    """The input image shard, content-derived and cheap: its commit marker's count, key range and
    the tar's sha256 (recorded by ShardWriter at write time; older markers have none), plus the
    tar's size. No mtime: a copy of the dataset keeps its columns valid."""
    tar = image_shard_path(root, shard)
    ident: Dict = {"name": shard}
    marker = stats_path(tar)
    if os.path.isfile(marker):
        try:
            m = read_json(marker)
        except ValueError as exc:
            raise FormatError(f"{marker}: image shard marker is not valid JSON ({exc})") from None
        for k in ("n", "first_key", "last_key", "sha256"):   # sha256: shards written since it exists
            if k in m:
                ident[k] = m[k]
    if not os.path.isfile(tar):
        raise FormatError(f"image shard {shard} is missing: {tar}")
    ident["bytes"] = os.path.getsize(tar)
    return ident


def check_column_current(root: str, column: str, shards) -> None:
    """Refuse a column that was not produced as one piece from these images, before training
    reads it: its committed shards' markers must record one labeler configuration
    (`provenance_hash`: a half-finished overwrite, or two configurations written into one column,
    would otherwise train on a silent mixture), each must have been labeled from the image shard
    that is there now (count, key range, sha256, size), and a derived column (merge, VLM top-k)
    from the input columns' current shards. Markers from before content hashes are not checked.
    Reads only the small JSON markers; the error names the column, the shard and what differs."""
    first = None
    for shard in shards:
        marker = stats_path(column_shard_path(root, column, shard))
        try:
            m = read_json(marker)
        except (OSError, ValueError) as exc:
            raise FormatError(f"{marker}: unreadable column marker ({exc})") from None
        ph, inputs = m.get("provenance_hash"), m.get("content_inputs") or {}
        if not ph:
            continue
        if first is None:
            first = (shard, ph)
        elif ph != first[1]:
            raise FormatError(
                f"column '{column}' mixes two labeler configurations: shard {first[0]} has "
                f"provenance {first[1][:12]}, shard {shard} has {ph[:12]} (an overwrite not finished, "
                f"or another configuration written into the same column); finish it "
                f"(`coreg-annotate status`, annotator.overwrite=true) or write to another column")
        recorded = inputs.get("image_shard")
        if recorded:
            # The image shard's marker fields only: a re-ingest rewrites the marker; a tar damaged
            # after ingest (truncated: other size, same marker) is not another version, and the
            # reader names and skips its unreadable tail.
            now = image_shard_identity(root, shard)
            diff = [k for k in ("n", "first_key", "last_key", "sha256")
                    if k in recorded and recorded.get(k) != now.get(k)]
            if diff:
                raise FormatError(
                    f"column '{column}' shard {shard} was labeled from another version of image "
                    f"shard {image_shard_path(root, shard)} ({', '.join(diff)} differ); relabel it "
                    f"(annotator.overwrite=true)")
        for col, h in (inputs.get("input_columns") or {}).items():
            src = stats_path(column_shard_path(root, col, shard))
            try:
                cur = read_json(src).get("content_hash")
            except (OSError, ValueError):
                cur = None
            if cur != h:
                raise FormatError(
                    f"column '{column}' shard {shard} was derived from input column '{col}' as it "
                    f"was before ({src} now records {str(cur)[:12]}, the derivation used "
                    f"{h[:12]}); rerun the derivation (annotator.overwrite=true)")


@dataclass
class ShardEntry:
    name: str
    n: int


@dataclass
class Manifest:
    name: str
    classes: List[str]
    splits: Dict[str, List[ShardEntry]] = field(default_factory=dict)
    source: Dict = field(default_factory=dict)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shards(self, split: str) -> List[ShardEntry]:
        if split not in self.splits:
            raise FormatError(f"split '{split}' not in the manifest (has: {', '.join(self.splits)})")
        return self.splits[split]

    def count(self, split: str) -> int:
        return sum(s.n for s in self.shards(split))

    def to_json(self) -> Dict:
        d = asdict(self)
        return {"format": d.pop("format"), "version": d.pop("version"), **d}


def write_manifest(root: str, manifest: Manifest) -> str:
    path = os.path.join(root, MANIFEST)
    atomic_write_json(path, manifest.to_json())
    return path


def read_manifest(root: str) -> Manifest:
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise FormatError(f"no dataset at {root}: {path} is missing (run the ingest first)")
    try:
        d = read_json(path)
    except ValueError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from None
    if d.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: field 'format' is {d.get('format')!r}, expected {FORMAT_NAME!r}")
    if d.get("version") != FORMAT_VERSION:
        raise FormatError(f"{path}: field 'version' is {d.get('version')!r}; this reader knows "
                          f"version {FORMAT_VERSION}")
    for k in ("name", "classes", "splits"):
        if k not in d:
            raise FormatError(f"{path}: required field '{k}' is missing")
    splits = {}
    for split, entries in d["splits"].items():
        try:
            splits[split] = [ShardEntry(name=e["name"], n=int(e["n"])) for e in entries]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: field 'splits.{split}' must be a list of {{name, n}}") from None
        for e in splits[split]:
            # Shard names become file names and may reach a shell (data.shard_url="pipe:..."):
            # the same safe alphabet as keys, nothing else.
            if not isinstance(e.name, str) or not _KEY_RE.match(e.name):
                raise FormatError(f"{path}: shard name {e.name!r} in 'splits.{split}' is not "
                                  "letters, digits, '_' and '-'")
    return Manifest(name=d["name"], classes=list(d["classes"]), splits=splits,
                    source=d.get("source", {}))


def read_column_info(root: str, column: str) -> Optional[Dict]:
    path = os.path.join(column_dir(root, column), COLUMN_INFO)
    return read_json(path) if os.path.isfile(path) else None


def list_columns(root: str) -> List[str]:
    base = os.path.join(root, COLUMN_DIR)
    if not os.path.isdir(base):
        return []
    return sorted(c for c in os.listdir(base) if os.path.isdir(os.path.join(base, c)))
