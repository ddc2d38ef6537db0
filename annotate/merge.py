"""Combine label columns into one (`coreg-annotate merge`): union, vote or intersection.

    coreg-annotate merge --config configs/demo.yaml merge.inputs=[clip,llava] merge.rule=union \
        merge.column=clip_or_llava
    coreg-annotate merge merge.inputs=[clip,llava] merge.rule=intersection merge.fallback=union \
        merge.column=clip_and_llava                       # both agree; if they never do: either
    coreg-annotate merge merge.inputs=[clip,llava] merge.rule=vote merge.min_votes=3 merge.column=v3
    coreg-annotate merge merge.inputs=[clip] merge.rule=vote merge.vote_fraction=0.25 \
        merge.column=clip_q25                             # re-threshold one column's votes
    coreg-annotate status --labeler merge                 # the merge.* config names the column
    coreg-train --config configs/demo.yaml train.column=clip_or_llava

Per sample, over the input columns that have a record for it (an input's error record is left
out; a sample whose every input is an error record gets an error record):

  union         the classes of any input's candidate set
  intersection  the classes in every input's candidate set
  vote          each annotator's vote counts once: a column's per-annotator `votes` (CLIP: one
                per prompt template) where it has them, else its `cand` set as one annotator's
                vote for each of its classes. A class is a candidate with at least
                merge.min_votes votes, or (merge.vote_fraction > 0 instead) at least that fraction
                of the sample's annotators (27 CLIP templates + 3 VLM prompts = 30).

When the rule leaves a sample with no class (nothing in common, no class with enough votes),
merge.fallback decides: union (the union of the inputs, the default: a learner needs a
non-empty set), first (the first input in merge.inputs order that has a record), or error (an
error record, which training skips). The merged column stores `cand` only.

Each output shard's content hash includes the input shards' hashes: relabeling an input makes
the merged shard stale (refused; annotator.overwrite=true redoes it). Statistics (images, avg
|S|, coverage and eta where true labels exist) are in the markers and column.json as for every
column; each marker's `labeler_stats` counts its shard's fallbacks (`fallbacks`,
`fallback_errors`) and error records (`all_inputs_failed`, `some_inputs_failed`: merged from
fewer inputs); the command prints them summed per split beside the inputs' statistics and
writes them to RUN/merge_stats.json.
"""
from __future__ import annotations

import time
from typing import Dict, List

import numpy as np

from coreg_dist.config import ConfigError
from coreg_dist.shards.format import CAND, VOTES, FormatError

RULES = ("union", "intersection", "vote")
FALLBACKS = ("union", "first", "error")


class MergeLabeler:
    """A labeler over input columns (annotate/columns.py joins them by key); no images read."""
    needs_images = False

    def __init__(self, cfg, num_classes: int):
        inputs = [str(c) for c in cfg.inputs]
        if not inputs:
            raise ConfigError("config key 'merge.inputs' is required: the columns to merge, "
                              "e.g. merge.inputs=[clip,llava]")
        if len(set(inputs)) != len(inputs):
            raise ConfigError(f"config key 'merge.inputs' names a column twice: {inputs}")
        if cfg.column in inputs:
            raise ConfigError(f"config key 'merge.column' ({cfg.column!r}) is one of the inputs: "
                              "write the merge into a new column")
        if cfg.rule not in RULES:
            raise ConfigError(f"config key 'merge.rule' is {cfg.rule!r}: one of {' | '.join(RULES)}")
        if cfg.fallback not in FALLBACKS:
            raise ConfigError(f"config key 'merge.fallback' is {cfg.fallback!r}: one of "
                              f"{' | '.join(FALLBACKS)}")
        if cfg.rule == "vote":
            if not 0.0 <= cfg.vote_fraction <= 1.0:
                raise ConfigError(f"config key 'merge.vote_fraction' is {cfg.vote_fraction}: a "
                                  "fraction in (0, 1], or 0 to use merge.min_votes")
            if cfg.vote_fraction == 0 and cfg.min_votes < 1:
                raise ConfigError(f"config key 'merge.min_votes' is {cfg.min_votes}: at least 1")
        self.num_classes = int(num_classes)
        # plain values: an omegaconf attribute read per sample costs tens of microseconds
        self.rule, self.fallback = str(cfg.rule), str(cfg.fallback)
        self.min_votes, self.vote_fraction = int(cfg.min_votes), float(cfg.vote_fraction)
        self.input_columns = tuple(inputs)
        self.counts = {"samples": 0, "merged": 0, "fallbacks": 0, "fallback_errors": 0,
                       "all_inputs_failed": 0, "some_inputs_failed": 0}

    # ------------------------------------------------------------------ the rules
    def _sets(self, records: List, key: str) -> List[np.ndarray]:
        out = []
        for col, rec in records:
            if CAND not in rec:
                raise FormatError(f"input column '{col}', sample {key}: no {CAND} (fields "
                                  f"{sorted(rec)}); merge reads candidate columns only")
            c = np.asarray(rec[CAND], dtype=np.int64).reshape(-1)
            if c.size == 0 or c.min() < 0 or c.max() >= self.num_classes:
                raise FormatError(f"input column '{col}', sample {key}: candidate set {c.tolist()} "
                                  f"is empty or outside [0, {self.num_classes}); relabel that column")
            out.append(c)
        return out

    def _vote(self, records: List, sets: List[np.ndarray]) -> np.ndarray:
        votes = np.zeros(self.num_classes, dtype=np.int64)
        annotators = 0
        for (col, rec), cand in zip(records, sets):
            v = rec.get(VOTES)
            if v is not None and np.size(v):
                v = np.asarray(v, dtype=np.int64).reshape(-1)
                v = v[v >= 0]              # -1: an annotator that abstained counts nowhere
                if v.size and v.max() >= self.num_classes:
                    raise FormatError(f"input column '{col}': votes {v.tolist()} outside "
                                      f"[0, {self.num_classes}); relabel that column")
                np.add.at(votes, v, 1)
                annotators += int(v.size)
            else:                      # no per-annotator votes: the set is one annotator's
                votes[cand] += 1
                annotators += 1
        if annotators == 0:            # every annotator abstained: no class has a vote
            return np.zeros(0, dtype=np.int64)
        frac = self.vote_fraction
        need = frac * annotators - 1e-9 if frac > 0 else self.min_votes
        return np.flatnonzero(votes >= need)

    def merge_one(self, records: List, key: str):
        """(classes, fallback used, error message) for one sample's available input records."""
        sets = self._sets(records, key)
        rule = self.rule
        if rule == "union":
            return np.unique(np.concatenate(sets)), False, ""
        if rule == "intersection":
            out = sets[0]
            for s in sets[1:]:
                out = np.intersect1d(out, s)
            why = "empty intersection of " + ", ".join(c for c, _ in records)
        else:
            out = self._vote(records, sets)
            why = ("no class reached " + (f"{self.vote_fraction:g} of the votes"
                                          if self.vote_fraction > 0 else f"{self.min_votes} votes"))
        if out.size:
            return out, False, ""
        if self.fallback == "union":
            return np.unique(np.concatenate(sets)), True, ""
        if self.fallback == "first":
            return np.unique(sets[0]), True, ""
        return out, True, f"{why} (merge.fallback=error)"

    # ------------------------------------------------------------------ the labeler interface
    def label(self, images, true: np.ndarray, keys: List[str], inputs=None, **_) -> Dict:
        B = len(keys)
        Y = np.zeros((B, self.num_classes), dtype=bool)
        errors = [""] * B
        before = dict(self.counts)
        for i, key in enumerate(keys):
            self.counts["samples"] += 1
            recs = [(c, inputs[i][c]) for c in self.input_columns if inputs[i].get(c) is not None]
            if not recs:
                self.counts["all_inputs_failed"] += 1
                errors[i] = "every input column has an error record (" + ", ".join(self.input_columns) + ")"
                continue
            if len(recs) < len(self.input_columns):
                self.counts["some_inputs_failed"] += 1
            classes, fell_back, err = self.merge_one(recs, key)
            if fell_back:
                self.counts["fallbacks"] += 1
            if err:
                self.counts["fallback_errors"] += 1
                errors[i] = err
                continue
            self.counts["merged"] += 1
            Y[i, classes] = True
        # per-shard counts in the marker (labeler_stats), summed per split in the report
        return {"Y": Y, "errors": errors,
                "stats": {k: self.counts[k] - before[k] for k in self.counts if k != "samples"}}

    def provenance(self) -> Dict:
        return self.content_provenance()

    def content_provenance(self) -> Dict:
        """The rule and only the parameters it reads; the inputs' content enters each shard's hash
        through their shard hashes (ColumnSpec)."""
        p = {"annotator": "merge", "inputs": list(self.input_columns), "rule": self.rule}
        if self.rule != "union":
            p["fallback"] = self.fallback
        if self.rule == "vote":
            if self.vote_fraction > 0:
                p["vote_fraction"] = self.vote_fraction
            else:
                p["min_votes"] = self.min_votes
        return p


# ---------------------------------------------------------------------- the command
def merge_columns(cfg, task_index: int = 0, num_tasks: int = 1) -> Dict:
    """`coreg-annotate merge`: write merge.column from merge.inputs."""
    from annotate.cli import _annotation_report
    from annotate.columns import requested_splits, select_shards, write_column
    from coreg_dist.shards.format import read_column_info, read_manifest, require_column_shards
    from coreg_dist.shards.reader import ErrorLog

    c = cfg.merge
    manifest = read_manifest(cfg.data.root)
    splits = requested_splits(cfg.data.root, manifest, c.splits, "merge.splits")
    labeler = MergeLabeler(c, manifest.num_classes)
    for split in splits:   # every input shard this task reads, committed: checked before writing
        mine = select_shards([e.name for e in manifest.shards(split)], task_index, num_tasks)
        for col in labeler.input_columns:
            require_column_shards(cfg.data.root, col, mine)
    t0 = time.time()
    errors = ErrorLog()
    stats = write_column(cfg.data.root, manifest, c.column, splits, labeler, batch_size=1024,
                         overwrite=cfg.annotator.overwrite, redo_errors=cfg.annotator.redo_errors,
                         task_index=task_index, num_tasks=num_tasks, errors=errors)
    add_labeler_stats(cfg.data.root, manifest, c.column, stats)
    inputs = {col: (read_column_info(cfg.data.root, col) or {}).get("splits", {})
              for col in labeler.input_columns}
    report = _annotation_report(cfg, stats, errors, time.time() - t0, name="merge_stats.json",
                                extra={"merge": {**labeler.content_provenance(), **labeler.counts},
                                       "column": c.column, "inputs": inputs},
                                task=(task_index, num_tasks))
    print_comparison(c.column, stats, inputs)
    for split, s in stats.items():
        ls = s.get("labeler_stats", {})
        print(f"{split}: {ls.get('fallbacks', 0)} of the column's {s.get('n_images', 0)} merged "
              f"samples took merge.fallback={c.fallback}"
              + (f", {ls['fallback_errors']} became error records" if ls.get("fallback_errors") else "")
              + " (summed from the shard markers)")
    n = labeler.counts
    if n["samples"]:
        print(f"merge ({c.rule}) labeled {n['samples']} samples in this run: {n['fallbacks']} "
              f"fell back to merge.fallback={c.fallback}"
              + (f" ({n['fallback_errors']} error records)" if n["fallback_errors"] else "")
              + f", {n['all_inputs_failed']} error records (every input an error record), "
              f"{n['some_inputs_failed']} merged from fewer inputs (some inputs error records)")
    else:
        print(f"merge: every shard of '{c.column}' already done (nothing labeled in this run)")
    return report


def add_labeler_stats(root: str, manifest, column: str, stats: Dict) -> None:
    """stats[split]["labeler_stats"]: the labelers' own counts (merge: fallbacks; import: samples
    without a row) summed over the split's committed shard markers, where column.json does not
    carry them already."""
    from annotate.provenance import DONE, column_states

    states = column_states(root, manifest, column, list(stats), None)
    for split, sts in states.items():
        total: Dict[str, int] = {}
        for st in sts:
            if st.state == DONE:
                for k, v in (st.marker.get("labeler_stats") or {}).items():
                    total[k] = total.get(k, 0) + int(v)
        stats[split].setdefault("labeler_stats", total)


def print_comparison(column: str, stats: Dict, inputs: Dict[str, Dict]) -> None:
    """The merged column beside its inputs, per split (the inputs' figures from their column.json)."""
    cols = [("n_images", "images", "{:d}"), ("avg_candidates", "avg |S|", "{:.3f}"),
            ("coverage", "coverage", "{:.2%}"), ("eta", "eta", "{:.2%}"),
            ("error_records", "error records", "{:d}")]
    print("| split | column | " + " | ".join(h for _, h, _ in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for split, s in stats.items():
        rows = [(col, inputs[col].get(split, {})) for col in inputs] + [(f"**{column}**", s)]
        for name, r in rows:
            print(f"| {split} | {name} | "
                  + " | ".join(f.format(r[k]) if k in r else "-" for k, _, f in cols) + " |")
    print()


__all__ = ["FALLBACKS", "MergeLabeler", "RULES", "add_labeler_stats", "merge_columns",
           "print_comparison"]
