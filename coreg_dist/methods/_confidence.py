"""What the single-network baselines share: one network, one pass a epoch over every sample,
and (for the partial-label methods) a per-sample confidence row read with the batch and
rewritten by the step (train/step_writes.py)."""
from __future__ import annotations

import math
from typing import Dict, List

import numpy as np
import torch

from coreg_dist.data.stream import PassSpec, Route
from coreg_dist.methods.base import BatchPart, Method
from coreg_dist.rules.pll import proden_init
from coreg_dist.state import FieldSpec


class SingleNetwork(Method):
    """One network, one pass over every sample per epoch (batch train.batch_size)."""
    num_networks = 1

    def __init__(self, cfg, info, device, coll):
        super().__init__(cfg, info, device, coll)
        self.net = self.make_network(cfg.run.seed)

    def networks(self):
        return [self.net]


class ConfidenceMethod(SingleNetwork):
    """A per-sample confidence row `conf`, delivered with each sample and rewritten by the step.

    Stored per candidate (`dense=False`: rows are zero outside S by the method's rule) or as a
    (C,) row (`dense=True`, for rules that weigh the non-candidates too: O(C) per sample, said
    in the method's docstring). NaN = never written: the row starts as `initial(part)`."""
    step_state = ("conf",)
    attach = ("conf",)                 # the state fields delivered with each sample
    dense = False

    def state_fields(self) -> Dict[str, FieldSpec]:
        if self.dense:
            return {"conf": FieldSpec(shape=(self.info.num_classes,), dtype="float32", fill=float("nan"))}
        return {"conf": FieldSpec(dtype="float32", fill=float("nan"), per_candidate=True)}

    def plan_epoch(self, epoch: int, ctx) -> List[PassSpec]:
        B = self.cfg.train.batch_size
        return [PassSpec("train", 0, steps=max(1, math.ceil(ctx.num_train / B)),
                         routes=(Route("x", B),), attach=tuple(self.attach))]

    def initial(self, part: BatchPart) -> torch.Tensor:
        """A sample's first confidence row: uniform over S (PRODEN, RC, CR-DPLL, PiCO)."""
        return proden_init(part.Y)

    def confidence(self, part: BatchPart) -> torch.Tensor:
        conf = part.attach["conf"].float()
        fresh = torch.isnan(conf).any(1)
        return torch.where(fresh[:, None], self.initial(part).to(conf), conf)

    def write(self, conf: torch.Tensor) -> Dict[str, Dict[str, torch.Tensor]]:
        return {"x": {"conf": conf}}

    def committed(self, ctx, name: str) -> np.ndarray:
        """Every rank's committed values of a scalar per-sample field (ALIM's margins, PiCO+'s
        distances), the unwritten (NaN) left out: what the authors rank over all N samples.
        O(N) on every rank, once an epoch, as their global ranking needs."""
        spec = {name: ctx.store.fields[name]}
        mine = [ctx.store.read(ctx.version, s, spec).arrays[name] for s in ctx.sweep_shard_names]
        every = np.concatenate([np.concatenate(m) if m else np.zeros(0, np.float32)
                                for m in self.coll.all_gather_object(mine)])
        return every[np.isfinite(every)]
