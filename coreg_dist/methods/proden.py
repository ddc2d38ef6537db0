"""Baseline: PRODEN, progressive identification of the true label by per-sample confidences.

    coreg-train --config configs/demo.yaml train.method=proden run.out_dir=runs/demo-proden

Lv, Xu, Feng, Niu, Geng & Sugiyama, "Progressive Identification of True Labels for Partial-Label
Learning", ICML 2020; the authors' code github.com/Lvcrezia77/PRODEN (main.py,
utils/utils_loss.py). Each sample carries a confidence row over its candidate set, uniform at the
start; a step trains on the confidence-weighted cross-entropy and replaces the batch's rows by
the network's softmax restricted to S and renormalised (from the same forward, as their
`partial_loss` does). A sample comes round about once per epoch, so the new rows are read from
the next epoch on: the trainer's step writes (train/step_writes.py), stored per candidate.

Same backbone, weak augmentation, optimizer and schedule as every method here (the trainer's
`train.*`), not the authors' MLP/ConvNet settings: the comparison is of the learning rule.
"""
from __future__ import annotations

from coreg_dist.methods._confidence import ConfidenceMethod
from coreg_dist.methods.base import Batch, StepOutput
from coreg_dist.methods.registry import register_method
from coreg_dist.rules.pll import proden_loss, proden_update


@register_method("proden")
class Proden(ConfidenceMethod):
    def update(self, batch: Batch) -> StepOutput:
        self.net.train()
        part = batch.parts["x"]
        logits = self.forward(0, self.weak(batch, "x"))
        loss = proden_loss(logits, self.confidence(part))
        return StepOutput(0, loss, {"loss/proden": loss.item()},
                          writes=self.write(proden_update(logits, part.Y)))
