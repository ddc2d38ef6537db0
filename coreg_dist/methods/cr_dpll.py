"""Baseline: CR-DPLL (PLCR), consistency regularisation for deep partial-label learning.

    coreg-train --config configs/demo.yaml train.method=cr_dpll run.out_dir=runs/demo-cr-dpll

Wu, Wang & Zhang, "Revisiting Consistency Regularization for Deep Partial Label Learning", ICML
2022; the authors' code github.com/wu-dd/PLCR (main.py). Three views of each sample (one weak,
two strong), a forward each; a supervised term pushes the weak view's non-candidate
probabilities down, and a consistency term pulls every view toward the sample's target row,
with a weight that ramps linearly to `lam` over the first `ramp_fraction` of the run. The
target row (uniform over S at the start) becomes the geometric mean of the three views'
softmaxes restricted to S, from this step's forward; it is read from the next epoch on (per
candidate, train/step_writes.py).

Defaults are theirs: lam 1, ramped over 100 epochs of their 200, kept as a fraction of the run
(0.5) so that shorter schedules ramp the same way. Views: the trainer's weak and strong
augmentations (theirs: flip + crop; + Cutout + AutoAugment); backbone, optimizer and schedule
are the trainer's, the same for every method.
"""
from __future__ import annotations

from dataclasses import dataclass

from coreg_dist.methods._confidence import ConfidenceMethod
from coreg_dist.methods.base import Batch, StepOutput
from coreg_dist.methods.registry import register_method
from coreg_dist.rules.pll import cr_dpll_lambda, cr_dpll_loss, cr_dpll_update


@dataclass
class CrDpllConfig:
    lam: float = 1.0                  # weight of the consistency term once ramped up
    ramp_fraction: float = 0.5        # share of train.epochs the linear ramp takes (theirs: 100 of 200)


@register_method("cr_dpll", config=CrDpllConfig)
class CrDpll(ConfidenceMethod):
    def update(self, batch: Batch) -> StepOutput:
        c = self.cfg.cr_dpll
        self.net.train()
        part = batch.parts["x"]
        views = [self.weak(batch, "x"), self.strong(batch, "x"), self.strong(batch, "x")]
        logits = [self.forward(0, v) for v in views]            # [their main.py] a forward each
        lam = cr_dpll_lambda(self.epoch, c.lam, max(1e-9, c.ramp_fraction * self.cfg.train.epochs))
        total, sup, cons = cr_dpll_loss(logits, part.Y, self.confidence(part), lam)
        return StepOutput(0, total, {"loss/cr_dpll": total.item(), "loss/sup": sup.item(),
                                     "loss/cons": cons.item(), "lam": lam},
                          writes=self.write(cr_dpll_update(logits, part.Y)))

