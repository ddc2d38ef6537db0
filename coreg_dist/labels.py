"""Candidate label sets: the rules that turn annotator scores into sets, their statistics,
and the synthetic NPLL generator.

Shapes: `probs` is (N, d, C): N images, d annotators (prompt templates), C classes.
A candidate set is a boolean multi-hot row Y_i in {0,1}^C; on disk it is the sorted index list.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

RULES = ("union_argmax", "topk", "ratio", "soft")


def union_argmax(probs: np.ndarray) -> np.ndarray:
    """[P][C] The union over annotators of each one's argmax: one right template suffices."""
    n, d, c = probs.shape
    votes = probs.argmax(axis=2)                                   # (N, d)
    Y = np.zeros((n, c), dtype=bool)
    Y[np.repeat(np.arange(n), d), votes.reshape(-1)] = True
    return Y


def topk_sets(probs: np.ndarray, k: int = 5) -> np.ndarray:
    """[C] The k classes with the highest template-averaged probability."""
    avg = probs.mean(axis=1)
    k = min(k, avg.shape[1])
    top = np.argpartition(-avg, k - 1, axis=1)[:, :k]
    Y = np.zeros(avg.shape, dtype=bool)
    np.put_along_axis(Y, top, True, axis=1)
    return Y


def ratio_sets(probs: np.ndarray, k: int = 5, ratio: float = 0.5) -> np.ndarray:
    """[C] Among the top k of the averaged probabilities, keep j if p_j >= ratio * p_top1."""
    avg = probs.mean(axis=1)
    Y = topk_sets(probs, k)
    return Y & (avg >= ratio * avg.max(axis=1, keepdims=True))


def soft_labels(probs: np.ndarray) -> np.ndarray:
    """[C] The template-averaged probabilities: the 'KD' input."""
    avg = probs.mean(axis=1)
    return avg / avg.sum(axis=1, keepdims=True)


def soft_sets(probs: np.ndarray, threshold: float = 0.05) -> np.ndarray:
    """A set view of the soft labels: classes with averaged probability >= threshold (top-1 always)."""
    avg = soft_labels(probs)
    Y = avg >= threshold
    Y[np.arange(len(avg)), avg.argmax(axis=1)] = True
    return Y


def derive_candidates(probs: np.ndarray, rule: str = "union_argmax", *, topk: int = 5,
                      ratio: float = 0.5, soft_threshold: float = 0.05) -> np.ndarray:
    """Apply one of RULES to (N, d, C) scores; returns (N, C) bool."""
    if rule == "union_argmax":
        return union_argmax(probs)
    if rule == "topk":
        return topk_sets(probs, topk)
    if rule == "ratio":
        return ratio_sets(probs, topk, ratio)
    if rule == "soft":
        return soft_sets(probs, soft_threshold)
    raise ValueError(f"unknown candidate rule '{rule}'; known: {', '.join(RULES)}")


def top_few(probs: np.ndarray, k: int):
    """Keep each annotator's k largest probabilities: (indices int16, values float16), both (N, d, k).

    Stored in the label shards so that every rule can be re-derived without rerunning the VLM;
    with k >= C nothing is lost.
    """
    c = probs.shape[-1]
    k = min(k, c)
    idx = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    val = np.take_along_axis(probs, idx, axis=-1)
    return idx.astype(np.int16), val.astype(np.float16)


def expand_top_few(idx: np.ndarray, val: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse of `top_few`: a dense (..., C) float32 array, zeros where nothing was stored."""
    out = np.zeros(idx.shape[:-1] + (num_classes,), dtype=np.float32)
    np.put_along_axis(out, idx.astype(np.int64), val.astype(np.float32), axis=-1)
    return out


def to_indices(Y_row: np.ndarray) -> np.ndarray:
    return np.flatnonzero(Y_row).astype(np.int16)


def to_multi_hot(indices: Sequence[int], num_classes: int, *, where: str = "") -> np.ndarray:
    """Validate a stored candidate list and expand it. Empty or out-of-range sets are errors."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError(f"empty candidate set{' at ' + where if where else ''}")
    if idx.min() < 0 or idx.max() >= num_classes:
        raise ValueError(f"candidate index out of range [0, {num_classes}) "
                         f"{' at ' + where if where else ''}: {idx.tolist()}")
    Y = np.zeros(num_classes, dtype=bool)
    Y[idx] = True
    return Y


def segment_indices(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The flat indices of segments laid end to end (candidates stored per row, one row after
    another): [s0, s0+1, .., s0+c0-1, s1, .., s1+c1-1, ...]."""
    starts, counts = np.asarray(starts, dtype=np.int64), np.asarray(counts, dtype=np.int64)
    return np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())


def candidate_stats(Y: np.ndarray, true: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Average set size; with true labels also coverage P(true in S) and eta = 1 - coverage."""
    stats = {"n": int(len(Y)), "avg_candidates": float(Y.sum(axis=1).mean()) if len(Y) else 0.0}
    if true is not None and len(Y):
        true = np.asarray(true)
        known = true >= 0
        if known.any():
            cov = float(Y[np.flatnonzero(known), true[known]].mean())
            stats["coverage"] = cov
            stats["eta"] = 1.0 - cov
    return stats


def zero_shot_stats(probs: np.ndarray, true: np.ndarray, single_template: int = 0) -> Dict[str, float]:
    """Zero-shot accuracy of one template (the paper's "a photo of a {}") and of the template average."""
    true = np.asarray(true)
    known = true >= 0
    if not known.any():
        return {}
    p, t = probs[known], true[known]
    return {
        "zero_shot_acc": float((p[:, single_template].argmax(axis=1) == t).mean()),
        "template_avg_acc": float((p.mean(axis=1).argmax(axis=1) == t).mean()),
        "per_template_acc": [float((p[:, j].argmax(axis=1) == t).mean()) for j in range(p.shape[1])],
    }


def synthetic_npll(true: np.ndarray, num_classes: int, q: float, eta: float,
                   rng: np.random.Generator) -> np.ndarray:
    """[P][C] Synthetic noisy partial labels.

    Each wrong label joins S with probability q (the true label is always in first); then with
    probability eta the true label is swapped for a random non-candidate, so the set size stays.
    """
    true = np.asarray(true, dtype=np.int64)
    n = len(true)
    Y = rng.random((n, num_classes)) < q
    Y[np.arange(n), true] = True
    flip = rng.random(n) < eta
    for i in np.flatnonzero(flip):
        outside = np.flatnonzero(~Y[i])
        if outside.size == 0:          # every class already a candidate: nothing to swap in
            continue
        Y[i, true[i]] = False
        Y[i, rng.choice(outside)] = True
    return Y


class CandidatePairs:
    """How often two classes share a candidate set, counted over a stream of multi-hot rows.

    Its summary, `companion_share`, is sum_i max_{j != i} n_ij / sum_i n_i: for a candidate
    class, how often its most frequent companion comes with it (n_i: sets holding i; n_ij: sets
    holding both). It is a label-free reading of partial-label learning's ambiguity degree (the
    largest P(j in S | true y)): near 1 when the sets are habitual groups that always arrive
    together (a top-k of one annotator: the same three look-alikes every time), low when the
    wrong candidates vary from image to image. The first kind cannot be told apart by the sets;
    a network that sharpens its own prediction inside them confirms whichever class it leans to.

    Memory is bounded whatever the class count: pairs go to a table of min(C*C, max_buckets)
    counters at (i*C + j) mod size, exact while C*C fits (C <= 2048 by default); beyond that
    pairs share counters, which can only overcount (an upper estimate of the share). The table
    and the class counts are plain arrays, summed across ranks by the caller's collectives.
    """

    def __init__(self, num_classes: int, max_buckets: int = 1 << 22):
        self.num_classes = int(num_classes)
        self.size = min(self.num_classes ** 2, int(max_buckets))
        self.pairs = np.zeros(self.size)
        self.classes = np.zeros(self.num_classes)
        self.rows = np.zeros(1)               # sets counted (an array: summed like the others)

    def add(self, Y: np.ndarray) -> None:
        """Count the rows of a (n, C) multi-hot array."""
        Y = np.asarray(Y) > 0
        self.classes += Y.sum(axis=0)
        self.rows += Y.any(axis=1).sum()      # an empty row is no set
        rows, cls = np.nonzero(Y)             # row-major: each row's classes in order
        if not len(rows):
            return
        sizes = np.bincount(rows, minlength=len(Y))
        # every ordered pair (i, j), i != j, within a row: each member against the row's members
        starts = np.repeat(np.cumsum(sizes) - sizes, sizes)   # per member: its row's first member
        reps = np.repeat(sizes, sizes)                         # per member: its row's size
        i = np.repeat(cls, reps)
        j = cls[segment_indices(starts, reps)]
        keep = i != j
        codes = (i[keep].astype(np.int64) * self.num_classes + j[keep]) % self.size
        self.pairs += np.bincount(codes, minlength=self.size)

    def all_reduce(self, coll) -> None:
        """Sum the counts over every rank (coll: the collectives object; the identity in one process)."""
        self.pairs, self.classes = coll.sum(self.pairs), coll.sum(self.classes)
        self.rows = coll.sum(self.rows)

    def mean_set_size(self) -> float:
        """Candidates per set, over the sets counted."""
        return float(self.classes.sum() / self.rows[0]) if self.rows[0] > 0 else 0.0

    def companion_share(self, chunk: int = 1024) -> float:
        C, total = self.num_classes, self.classes.sum()
        if total <= 0:
            return 0.0
        best = 0.0
        for start in range(0, C, chunk):
            i = np.arange(start, min(C, start + chunk))[:, None]
            j = np.arange(C)[None, :]
            counts = np.where(i == j, 0.0, self.pairs[(i * C + j) % self.size])
            best += counts.max(axis=1).sum()
        return float(best / total)
