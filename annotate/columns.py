"""Write a label column beside the image shards, shard by shard, resumably.

Every labeler (CLIP templates, the synthetic NPLL generator, later LLaVA through vLLM) plugs
in here: it turns a batch of images (and, for evaluation only, their true labels) into
per-sample fields. This module owns what must be the same for all of them: the key order
(1:1 with the image shard), the skip of committed shards, the per-shard stats marker written
last, the totals in column.json, and the reporting of damaged input.
"""
from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Protocol, Sequence

import numpy as np

from coreg_dist.io import atomic_write_json, read_json
from coreg_dist.labels import to_indices
from coreg_dist.progress import progress
from coreg_dist.shards.format import (CAND, COLUMN_INFO, FORMAT_VERSION, TOPI, TOPP, VOTES,
                                      Manifest, column_dir, column_shard_path, image_shard_path,
                                      is_committed, stats_path)
from coreg_dist.shards.reader import ErrorLog, ShardReadError, decode_image, image_field, iter_tar
from coreg_dist.shards.writer import ShardWriter


class Labeler(Protocol):
    needs_images: bool

    def label(self, images: Optional[List], true: np.ndarray, keys: List[str]) -> Dict[str, np.ndarray]:
        """Return at least "Y" (B, C) bool; optionally "probs" (B, d, C), "votes" (B, d),
        "topi"/"topp" (B, d, K). Only Y, votes, topi, topp are stored."""

    def provenance(self) -> Dict:
        ...


# Sums that add up across shards (and, later, across array tasks).
_SUM_KEYS = ("n", "n_labeled", "sum_candidates", "covered", "zero_shot_correct",
             "template_avg_correct")


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
    return s


def summarize(sums: Sequence[Dict]) -> Dict:
    """Totals over shards -> the annotation statistics (fractions in [0, 1])."""
    tot = {k: sum(s.get(k, 0) for s in sums) for k in _SUM_KEYS}
    per_t = [s["per_template_correct"] for s in sums if "per_template_correct" in s]
    out = {"n_images": tot["n"], "n_labeled": tot["n_labeled"],
           "avg_candidates": tot["sum_candidates"] / max(tot["n"], 1)}
    if tot["n_labeled"]:
        out["coverage"] = tot["covered"] / tot["n_labeled"]
        out["eta"] = 1.0 - out["coverage"]
        if per_t:
            out["zero_shot_acc"] = tot["zero_shot_correct"] / tot["n_labeled"]
            out["template_avg_acc"] = tot["template_avg_correct"] / tot["n_labeled"]
            out["per_template_acc"] = (np.sum(per_t, axis=0) / tot["n_labeled"]).round(5).tolist()
    return out


def select_shards(names: Sequence[str], task_index: int, num_tasks: int) -> List[str]:
    """A deterministic share of the shards for one array task: every num_tasks-th."""
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} out of range for {num_tasks} tasks")
    return [n for i, n in enumerate(names) if i % num_tasks == task_index]


def write_column(root: str, manifest: Manifest, column: str, splits: Sequence[str],
                 labeler: Labeler, *, batch_size: int = 256, single_template: int = 0,
                 overwrite: bool = False, task_index: int = 0, num_tasks: int = 1,
                 errors: Optional[ErrorLog] = None) -> Dict:
    """Label every shard of `splits` (this task's share); returns per-split statistics."""
    errors = errors or ErrorLog()
    provenance = labeler.provenance()
    result = {}
    for split in splits:
        entries = manifest.shards(split)
        mine = select_shards([e.name for e in entries], task_index, num_tasks)
        todo = [n for n in mine if overwrite or not is_committed(column_shard_path(root, column, n))]
        total = sum(e.n for e in entries if e.name in todo)
        bar = progress(total=total, desc=f"{column} {split}", unit="img")
        t0, done = time.time(), 0
        for name in todo:
            done += _label_shard(root, column, name, labeler, batch_size, single_template,
                                 provenance, errors, bar)
        bar.close()
        if todo:
            dt = time.time() - t0
            print(f"{column} {split}: labeled {done} images in {len(todo)} shards, "
                  f"{done / max(dt, 1e-9):.0f} img/s ({len(mine) - len(todo)} shards already done)")
        result[split] = split_stats(root, column, [e.name for e in entries])
    _write_column_info(root, manifest, column, provenance, result)
    return result


def split_stats(root: str, column: str, shard_names: Sequence[str]) -> Dict:
    sums, missing = [], []
    for n in shard_names:
        p = column_shard_path(root, column, n)
        if is_committed(p):
            sums.append(read_json(stats_path(p))["sums"])
        else:
            missing.append(n)
    out = summarize(sums)
    out["shards_done"], out["shards_missing"] = len(sums), len(missing)
    return out


def _label_shard(root, column, name, labeler, batch_size, single_template, provenance, errors, bar):
    src = image_shard_path(root, name)
    dst = column_shard_path(root, column, name)
    sums, t0 = [], time.time()
    corrupt = truncated = 0
    with ShardWriter(dst) as w:
        batch: List = []

        def flush():
            keys = [b[0] for b in batch]
            good = [i for i, b in enumerate(batch) if b[1] is not None or not labeler.needs_images]
            true = np.array([b[2] for b in batch], dtype=np.int64)
            if good:
                out = labeler.label([batch[i][1] for i in good] if labeler.needs_images else None,
                                    true[good], [keys[i] for i in good])
                sums.append(_shard_sums(out, true[good], single_template))
            pos = {i: j for j, i in enumerate(good)}
            for i, key in enumerate(keys):
                if i not in pos:
                    # Keep the column aligned 1:1 with the image shard: a damaged image gets an
                    # error record instead of labels; readers skip it together with the image.
                    w.write(key, {"err.txt": batch[i][3]})
                    continue
                j = pos[i]
                fields = {CAND: to_indices(out["Y"][j])}
                for k, f in (("votes", VOTES), ("topi", TOPI), ("topp", TOPP)):
                    if k in out:
                        fields[f] = out[k][j]
                w.write(key, fields)
            bar.update(len(batch))
            batch.clear()

        try:
            for key, fields in iter_tar(src):
                label = int(fields["cls"].decode()) if "cls" in fields else -1
                img, err = None, ""
                if labeler.needs_images:
                    ext = image_field(fields)
                    try:
                        if ext is None:
                            raise ValueError(f"no image field among {sorted(fields)}")
                        img = decode_image(fields[ext])
                    except Exception as exc:
                        err = f"{type(exc).__name__}: {exc}"
                        errors.report("corrupt_image", name, key, err)
                        corrupt += 1
                batch.append((key, img, label, err))
                if len(batch) >= batch_size:
                    flush()
        except ShardReadError as exc:
            errors.report("truncated_shard", name, exc.last_key, str(exc))
            truncated = 1
        if batch:
            flush()
    w.commit({"format_version": FORMAT_VERSION, "column": column,
              "sums": _merge_sums(sums), "corrupt_images": corrupt, "truncated": bool(truncated),
              "images_per_s": round(w.count / max(time.time() - t0, 1e-9), 1),
              "provenance": provenance})
    return w.count


def _merge_sums(sums: List[Dict]) -> Dict:
    out = {k: sum(s.get(k, 0) for s in sums) for k in _SUM_KEYS}
    per_t = [s["per_template_correct"] for s in sums if "per_template_correct" in s]
    if per_t:
        out["per_template_correct"] = np.sum(per_t, axis=0).astype(int).tolist()
    return out


def _write_column_info(root, manifest, column, provenance, result):
    path = os.path.join(column_dir(root, column), COLUMN_INFO)
    old = read_json(path) if os.path.isfile(path) else {}
    splits = {**old.get("splits", {}), **result}     # a later call may label another split
    complete = all(r["shards_missing"] == 0 for r in splits.values())
    info = {"column": column, "format_version": FORMAT_VERSION, "kind": "candidates",
            "num_classes": manifest.num_classes, "complete": complete,
            "provenance": provenance, "splits": splits}
    atomic_write_json(path, info)
