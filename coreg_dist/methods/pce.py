"""Baseline: one network trained with partial cross-entropy on the candidate sets.

    coreg-train --config configs/demo.yaml train.method=pce run.out_dir=runs/demo-pce

The same backbone, schedule, augmentation and epochs as Co-Reg, none of its machinery:
what candidate sets alone buy. The smallest example of the method interface (base.py).
"""
from __future__ import annotations

from coreg_dist.losses import partial_ce
from coreg_dist.methods._confidence import SingleNetwork
from coreg_dist.methods.base import Batch, StepOutput
from coreg_dist.methods.registry import register_method


@register_method("pce")
class PartialCE(SingleNetwork):
    def update(self, batch: Batch) -> StepOutput:
        self.net.train()
        part = batch.parts["x"]
        loss = partial_ce(self.forward(0, self.weak(batch, "x")), part.Y)
        return StepOutput(0, loss, {"loss/pce": loss.item()})
