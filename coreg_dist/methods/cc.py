"""Baseline: CC, the classifier-consistent partial-label loss.

    coreg-train --config configs/demo.yaml train.method=cc run.out_dir=runs/demo-cc

Feng, Lv, Han, Xu, Niu, Geng, An & Sugiyama, "Provably Consistent Partial-Label Learning",
NeurIPS 2020; the authors' code (RCCC: utils/utils_loss.py `cc_loss`): the mean over samples of
-log of the probability mass on the candidate set. It differs from `pce` (Co-Reg's partial CE)
only in the authors' details (no eps inside the log; a set holding every class counts, with
loss 0): coreg_dist/rules/pll.py `cc_loss`. No per-sample state.
"""
from __future__ import annotations

from coreg_dist.methods._confidence import SingleNetwork
from coreg_dist.methods.base import Batch, StepOutput
from coreg_dist.methods.registry import register_method
from coreg_dist.rules.pll import cc_loss


@register_method("cc")
class CC(SingleNetwork):
    def update(self, batch: Batch) -> StepOutput:
        self.net.train()
        loss = cc_loss(self.forward(0, self.weak(batch, "x")), batch.parts["x"].Y)
        return StepOutput(0, loss, {"loss/cc": loss.item()})
