"""The labelers that write candidate columns: CLIP prompt templates, and synthetic NPLL.

A labeler maps a batch to per-sample fields (see annotate/columns.py); the VLM labeler (LLaVA
served through vLLM's OpenAI-compatible API) is annotate/vlm_labeler.py, with the same interface.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import zlib

import numpy as np

from coreg_dist.labels import derive_candidates, synthetic_npll, top_few

# The parameters each candidate rule reads (the others do not change its output).
RULE_PARAMS = {"union_argmax": (), "topk": ("topk",), "ratio": ("topk", "ratio"),
               "soft": ("soft_threshold",)}


class ClipLabeler:
    """Each prompt template is one annotator; the rule turns their scores into a set."""
    needs_images = True

    def __init__(self, cfg_annotator, class_names: List[str], device: str = "cpu"):
        from annotate.clip_scorer import ClipScorer  # transformers is imported only when used

        self.cfg = cfg_annotator
        self.scorer = ClipScorer(cfg_annotator.model, class_names, list(cfg_annotator.templates),
                                 device=device, logit_scale=cfg_annotator.logit_scale,
                                 batch_size=cfg_annotator.batch_size)

    def label(self, images: Optional[List], true: np.ndarray, keys: List[str]) -> Dict[str, np.ndarray]:
        probs = self.scorer.score(images)                                 # (B, d, C)
        c = self.cfg
        Y = derive_candidates(probs, c.rule, topk=c.topk, ratio=c.ratio,
                              soft_threshold=c.soft_threshold)
        topi, topp = top_few(probs, c.store_topk)
        return {"Y": Y, "probs": probs, "votes": probs.argmax(axis=2).astype(np.int16),
                "topi": topi, "topp": topp}

    def provenance(self) -> Dict:
        c = self.cfg
        return {"annotator": "clip", **self.scorer.provenance(), "templates": list(c.templates),
                "rule": c.rule, "topk": c.topk, "ratio": c.ratio, "soft_threshold": c.soft_threshold,
                "store_topk": c.store_topk}

    def content_provenance(self) -> Dict:
        """What determines the column's bytes (annotate/provenance.py hashes it): the model by its
        weights hash when it is a local checkpoint (its path and name are recorded, not hashed:
        a moved or copied checkpoint gives the same column), else by name and revision; the
        checkpoint's config/tokenizer/processor files; preprocessing; templates; the rule and
        only the parameters it reads; the stored top-K as written (min(store_topk, C))."""
        p = dict(self.provenance())
        p.pop("path", None)
        if p.get("weights_sha256"):
            p.pop("model", None)
        used = RULE_PARAMS.get(p["rule"], ("topk", "ratio", "soft_threshold"))
        for k in ("topk", "ratio", "soft_threshold"):
            if k not in used:
                p.pop(k, None)
        p["store_topk"] = min(int(p["store_topk"]), int(p["num_classes"]))
        return p


class SyntheticLabeler:
    """[P][C] The q / eta flip protocol on the true labels, for controlled studies."""
    needs_images = False
    batch_dependent = True      # seeded per batch: the batch size is part of the content hash

    def __init__(self, cfg_synthetic, num_classes: int):
        self.cfg, self.num_classes = cfg_synthetic, num_classes

    def label(self, images, true: np.ndarray, keys: List[str]) -> Dict[str, np.ndarray]:
        if (true < 0).any():
            bad = keys[int(np.flatnonzero(true < 0)[0])]
            raise ValueError(f"synthetic NPLL needs the true label ('cls' field); sample {bad} has none")
        # Seeded by the batch's first key, so relabeling one shard reproduces it exactly.
        rng = np.random.default_rng([self.cfg.seed, zlib.crc32(keys[0].encode())])
        return {"Y": synthetic_npll(true, self.num_classes, self.cfg.q, self.cfg.eta, rng)}

    def provenance(self) -> Dict:
        return {"annotator": "synthetic", "q": self.cfg.q, "eta": self.cfg.eta, "seed": self.cfg.seed}
