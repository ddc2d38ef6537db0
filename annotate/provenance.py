"""What produced a column shard, and the state of a column derived from its shards' markers.

Every column shard's commit marker (`<shard>.stats.json`) records a **content hash**: sha256 of
the canonical JSON (sorted keys, no whitespace) of everything that determines the shard's bytes:

    {"hash_version": 1, "format_version": 1, "kind": "candidates",
     "classes": {"n": C, "sha256": ...},     # the class names, in index order
     "labeler": {...},                       # labeler.content_provenance() (or provenance())
     "image_shard": {"name", "n", "first_key", "last_key", "bytes"},   # the input shard
     "input_columns": {"<col>": "<hash>"},   # only for labelers that read another column
     "batch_size": 256}                      # only for labelers whose output depends on it

The marker keeps these inputs too (`content_inputs`), so a mismatch can name what changed.
A rerun skips a shard whose hash matches, refuses one whose hash differs (stale) unless
`annotator.overwrite=true`, and (re)writes one without a valid marker (pending / failed).

Column totals are never accumulated by read-modify-write: `column_states` reads every marker and
`column_info` sums the matching ones; column.json is that sum, rewritten atomically (under a
lock where the filesystem has one) at the end of every task, so it is idempotent and the last
task to finish leaves it complete.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from coreg_dist.io import atomic_write_json, file_lock, read_json
from coreg_dist.shards.format import (COLUMN_INFO, FORMAT_VERSION, FormatError, Manifest, column_dir,
                                      column_shard_path, image_shard_identity,
                                      stats_path)

HASH_VERSION = 1
LOCK_FILE = ".column.lock"
# Provenance keys that only say where something was found, never what it computes: a legacy
# marker (written before content hashes) is adopted when everything else it recorded matches.
INFORMATIONAL_KEYS = ("path",)


class StaleColumnError(FormatError):
    """A column holds shards that another labeler configuration (or other input) produced."""


def canonical_json(obj) -> str:
    """Stable text for hashing: sorted keys, no whitespace, ASCII, non-JSON values as str."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def sha256_json(obj) -> str:
    return hashlib.sha256(canonical_json(obj).encode("ascii")).hexdigest()


def content_provenance(labeler) -> Dict:
    """The part of a labeler's provenance that determines what it writes (hashed)."""
    fn = getattr(labeler, "content_provenance", None)
    return dict(fn() if fn is not None else labeler.provenance())


class ColumnSpec:
    """What a labeler configuration would write into `column`: the expected content hash of
    every shard, computed lazily and cached."""

    def __init__(self, root: str, manifest: Manifest, column: str, labeler, *, batch_size: int = 256,
                 kind: str = "candidates"):
        self.root, self.manifest, self.column, self.kind = root, manifest, column, kind
        self.provenance = labeler.provenance()
        self.labeler_content = content_provenance(labeler)
        self.provenance_hash = sha256_json(self.labeler_content)
        self.input_columns = tuple(getattr(labeler, "input_columns", ()) or ())
        self.batch_size = int(batch_size) if getattr(labeler, "batch_dependent", False) else None
        # the class names by count and hash (a marker per shard need not repeat 1,000 names)
        self.classes = {"n": manifest.num_classes, "sha256": sha256_json(list(manifest.classes))}
        self._inputs: Dict[str, Dict] = {}

    def inputs(self, shard: str) -> Dict:
        if shard not in self._inputs:
            d = {"hash_version": HASH_VERSION, "format_version": FORMAT_VERSION, "kind": self.kind,
                 "classes": self.classes, "labeler": self.labeler_content,
                 "image_shard": image_shard_identity(self.root, shard)}
            if self.input_columns:
                d["input_columns"] = {c: _input_column_hash(self.root, c, shard)
                                      for c in self.input_columns}
            if self.batch_size is not None:
                d["batch_size"] = self.batch_size
            self._inputs[shard] = d
        return self._inputs[shard]

    def hash(self, shard: str) -> str:
        return sha256_json(self.inputs(shard))


def _input_column_hash(root: str, column: str, shard: str) -> str:
    tar = column_shard_path(root, column, shard)
    marker = stats_path(tar)
    if not (os.path.isfile(tar) and os.path.isfile(marker)):
        raise FormatError(f"input column '{column}' has no committed shard {shard} ({marker}); "
                          "annotate that column first")
    h = read_json(marker).get("content_hash")
    if not h:
        raise FormatError(f"input column '{column}', shard {shard}: its marker {marker} has no "
                          "content_hash (written before provenance hashing); rerun that column's "
                          "annotation once to record it")
    return h


def diff_inputs(old: Optional[Dict], new: Dict) -> List[str]:
    """Dotted names of what differs, one level into nested dicts, with short old/new values."""
    if not isinstance(old, dict):
        return ["(no recorded inputs)"]
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if canonical_json(a) == canonical_json(b):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for kk in sorted(set(a) | set(b)):
                aa, bb = a.get(kk, "<absent>"), b.get(kk, "<absent>")
                if canonical_json(aa) != canonical_json(bb):
                    out.append(f"{k}.{kk} (was {_short(aa)}, now {_short(bb)})")
        else:
            out.append(f"{k} (was {_short(a)}, now {_short(b)})")
    return out


def _short(v, n: int = 60) -> str:
    s = canonical_json(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def legacy_differences(recorded: Optional[Dict], current: Dict) -> List[str]:
    """A marker written before content hashes: the keys of its recorded provenance (except the
    informational ones) that differ from the current labeler's provenance."""
    if not isinstance(recorded, dict):
        return ["provenance (not recorded)"]
    return [f"provenance.{k} (was {_short(v)}, now {_short(current.get(k, '<absent>'))})"
            for k, v in sorted(recorded.items())
            if k not in INFORMATIONAL_KEYS and canonical_json(v) != canonical_json(current.get(k))]


# ------------------------------------------------------------------ shard states
DONE, PENDING, STALE, FAILED = "done", "pending", "stale", "failed"
STATES = (DONE, PENDING, STALE, FAILED)


@dataclass
class ShardState:
    name: str
    split: str
    state: str                       # done | pending | stale | failed
    reason: str = ""
    marker: Optional[Dict] = None
    legacy: bool = False             # done, but the marker has no content hash (adopted)
    tmp_files: List[str] = field(default_factory=list)

    @property
    def error_records(self) -> int:
        m = self.marker or {}
        return int(m.get("error_records", m.get("corrupt_images", 0)) or 0)

    @property
    def has_errors(self) -> bool:
        return self.error_records > 0 or bool((self.marker or {}).get("truncated"))


def classify(root: str, column: str, shard: str, split: str, spec: Optional[ColumnSpec]) -> ShardState:
    """The state of one column shard against what `spec` would write (spec None: hashes are not
    checked, every committed shard counts as done)."""
    tar = column_shard_path(root, column, shard)
    marker_path = stats_path(tar)
    tmp = sorted(glob.glob(glob.escape(tar) + ".tmp-*"))
    has_tar, has_marker = os.path.isfile(tar), os.path.isfile(marker_path)
    st = ShardState(shard, split, PENDING, tmp_files=tmp)
    if not has_marker:
        if tmp:
            st.state, st.reason = FAILED, ("temporary file without a commit marker (a task died "
                                           "while writing it, or one is writing it now)")
        elif has_tar:
            st.reason = "tar without a commit marker (interrupted before the commit)"
        else:
            st.reason = "not written yet"
        return st
    try:
        marker = read_json(marker_path)
        if not isinstance(marker, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        st.state, st.reason = FAILED, f"unreadable commit marker {marker_path} ({exc})"
        return st
    st.marker = marker
    if not has_tar:
        st.state, st.reason = FAILED, f"commit marker without its tar ({tar} is missing)"
        return st
    if spec is None:
        st.state, st.legacy = DONE, "content_hash" not in marker
        return st
    if "content_hash" in marker:
        if marker["content_hash"] == spec.hash(shard):
            st.state = DONE
        else:
            st.state = STALE
            diff = diff_inputs(marker.get("content_inputs"), spec.inputs(shard))
            st.reason = "content hash differs: " + "; ".join(diff or ["(inputs equal, hash recipe changed)"])
        return st
    # Legacy marker (before content hashes): adopted when everything it recorded still holds.
    diff = legacy_differences(marker.get("provenance"), spec.provenance)
    img = spec.inputs(shard)["image_shard"]
    if not marker.get("truncated"):
        for k in ("n", "first_key", "last_key"):
            if k in img and marker.get(k) != img[k]:
                diff.append(f"image_shard.{k} (was {_short(marker.get(k))}, now {_short(img[k])})")
    if diff:
        st.state = STALE
        st.reason = ("written before provenance hashing (no content_hash in its marker) and "
                     "differs: " + "; ".join(diff))
    else:
        st.state, st.legacy = DONE, True
        st.reason = "written before provenance hashing; its recorded provenance matches"
    return st


def splits_in_scope(root: str, manifest: Manifest, column: str, requested: Sequence[str]) -> List[str]:
    """The requested splits plus every other manifest split that already has something written."""
    out = [s for s in requested if s in manifest.splits]
    for split, entries in manifest.splits.items():
        if split in out:
            continue
        for e in entries:
            tar = column_shard_path(root, column, e.name)
            if os.path.exists(tar) or os.path.exists(stats_path(tar)) or glob.glob(glob.escape(tar) + ".tmp-*"):
                out.append(split)
                break
    return out


def column_states(root: str, manifest: Manifest, column: str, splits: Sequence[str],
                  spec: Optional[ColumnSpec]) -> Dict[str, List[ShardState]]:
    return {split: [classify(root, column, e.name, split, spec) for e in manifest.shards(split)]
            for split in splits}


# ------------------------------------------------------------------ totals from markers
_SUM_KEYS = ("n", "n_labeled", "sum_candidates", "covered", "zero_shot_correct",
             "template_avg_correct")


def merge_sums(sums: Sequence[Dict]) -> Dict:
    """Add shard sums (counts that add up across shards and array tasks)."""
    out = {k: sum(int(s.get(k, 0)) for s in sums) for k in _SUM_KEYS}
    per_t = [s["per_template_correct"] for s in sums if s.get("per_template_correct") is not None]
    if per_t:
        if len({len(p) for p in per_t}) > 1:
            raise FormatError("per_template_correct of different lengths in one column")
        out["per_template_correct"] = [int(sum(v)) for v in zip(*per_t)]
    return out


def summarize(sums: Sequence[Dict]) -> Dict:
    """Totals over shards -> the annotation statistics (fractions in [0, 1])."""
    tot = merge_sums(sums) if sums else {k: 0 for k in _SUM_KEYS}
    out = {"n_images": tot["n"], "n_labeled": tot["n_labeled"],
           "avg_candidates": tot["sum_candidates"] / max(tot["n"], 1)}
    if tot["n_labeled"]:
        out["coverage"] = tot["covered"] / tot["n_labeled"]
        out["eta"] = 1.0 - out["coverage"]
        if "per_template_correct" in tot:
            out["zero_shot_acc"] = tot["zero_shot_correct"] / tot["n_labeled"]
            out["template_avg_acc"] = tot["template_avg_correct"] / tot["n_labeled"]
            out["per_template_acc"] = [round(c / tot["n_labeled"], 5) for c in tot["per_template_correct"]]
    return out


def split_summary(states: Sequence[ShardState]) -> Dict:
    """Statistics summed from the done shards' markers, and the shard counts per state."""
    done = [s for s in states if s.state == DONE]
    out = summarize([s.marker.get("sums", {}) for s in done])
    counts = {k: sum(1 for s in states if s.state == k) for k in STATES}
    out.update({"shards": len(states), "shards_done": counts[DONE],
                "shards_missing": counts[PENDING] + counts[FAILED], "shards_pending": counts[PENDING],
                "shards_failed": counts[FAILED], "shards_stale": counts[STALE],
                "shards_legacy": sum(1 for s in done if s.legacy),
                "error_records": sum(s.error_records for s in done),
                "shards_with_errors": sum(1 for s in done if s.has_errors)})
    # The labeler's own counts (VLM abstentions and retries, import matches, merge fallbacks).
    extra: Dict[str, float] = {}
    for s in done:
        for k, v in (s.marker.get("labeler_stats") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                extra[k] = extra.get(k, 0) + v
    if extra:
        out["labeler_stats"] = dict(sorted(extra.items()))
    return out


def column_info(spec: ColumnSpec, states: Dict[str, List[ShardState]]) -> Dict:
    """column.json, derived from the markers only (no timestamps: the same markers give the
    same file)."""
    splits = {split: split_summary(st) for split, st in states.items()}
    complete = bool(splits) and all(s["shards_done"] == s["shards"] for s in splits.values())
    return {"column": spec.column, "format_version": FORMAT_VERSION, "kind": spec.kind,
            "num_classes": spec.manifest.num_classes, "complete": complete,
            "derived_from": "shard markers", "provenance_hash": spec.provenance_hash,
            "provenance": spec.provenance, "splits": splits}


def column_lock(root: str, column: str):
    """An exclusive lock on the column folder (ROOT/columns/<column>/.column.lock)."""
    return file_lock(os.path.join(column_dir(root, column), LOCK_FILE))


def refresh_column_info(spec: ColumnSpec, splits: Sequence[str]) -> Dict:
    """Re-derive column.json from every marker and write it atomically, under the column lock:
    the last task to take the lock has seen every marker committed before it."""
    with column_lock(spec.root, spec.column):
        states = column_states(spec.root, spec.manifest, spec.column, splits, spec)
        info = column_info(spec, states)
        atomic_write_json(os.path.join(column_dir(spec.root, spec.column), COLUMN_INFO), info)
    return info


def stale_message(column: str, stale: Sequence[ShardState], root: str) -> str:
    first = stale[0]
    more = stale[1:]
    names = ", ".join(s.name for s in more[:5]) + (f", ... ({len(more)} in all)" if len(more) > 5 else "")
    return (f"column '{column}': shard {first.name} ({column_shard_path(root, column, first.name)}) "
            f"was written by another configuration or from other input: {first.reason}"
            + (f"; {len(more)} more shard(s) too: {names}" if more else "")
            + ". Nothing was written. Write to a new column (the command's column key: "
            "annotator.column, synthetic.column, vlm.column, label_import.column or "
            "merge.column), or set annotator.overwrite=true to relabel the stale shards.")


__all__ = ["ColumnSpec", "ShardState", "StaleColumnError", "canonical_json", "classify",
           "column_info", "column_lock", "column_states", "content_provenance", "diff_inputs",
           "image_shard_identity", "merge_sums", "refresh_column_info", "sha256_json",
           "split_summary", "splits_in_scope", "stale_message", "summarize"]
