"""Baseline: PRODEN, progressive identification of the true label by per-sample confidences.

    coreg-train --config configs/demo.yaml train.method=proden run.out_dir=runs/demo-proden

Lv, Xu, Feng, Niu, Geng & Sugiyama, "Progressive Identification of True Labels for Partial-Label
Learning", ICML 2020; the authors' code github.com/Lvcrezia77/PRODEN (main.py,
utils/utils_loss.py). Each sample carries a confidence row over its candidate set, uniform at the
start; a step trains on the confidence-weighted cross-entropy and replaces the batch's rows by
the network's softmax restricted to S and renormalised (from the same forward, as their
`partial_loss` does). A sample comes round once per epoch, so the new rows are read from the
next epoch on: the trainer's step writes (train/step_writes.py), stored per candidate.

Same backbone, weak augmentation, optimizer and schedule as every method here (the trainer's
`train.*`), not the authors' MLP/ConvNet settings: the comparison is of the learning rule.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch

from coreg_dist.data.stream import PassSpec, Route
from coreg_dist.methods.base import Batch, Method, StepOutput
from coreg_dist.methods.registry import register_method
from coreg_dist.rules.pll import proden_init, proden_loss, proden_update
from coreg_dist.state import FieldSpec


@register_method("proden")
class Proden(Method):
    num_networks = 1
    step_state = ("conf",)

    def __init__(self, cfg, info, device, coll):
        super().__init__(cfg, info, device, coll)
        self.net = self.make_network(cfg.run.seed)

    def networks(self):
        return [self.net]

    def state_fields(self) -> Dict[str, FieldSpec]:
        # NaN = not yet written: the row starts uniform over S (proden_init)
        return {"conf": FieldSpec(dtype="float32", fill=float("nan"), per_candidate=True)}

    def plan_epoch(self, epoch: int, ctx) -> List[PassSpec]:
        B = self.cfg.train.batch_size
        return [PassSpec("train", 0, steps=max(1, math.ceil(ctx.num_train / B)),
                         routes=(Route("x", B),), attach=("conf",))]

    def update(self, batch: Batch) -> StepOutput:
        self.net.train()
        part = batch.parts["x"]
        conf = part.attach["conf"].float()
        fresh = torch.isnan(conf).any(1)
        conf = torch.where(fresh[:, None], proden_init(part.Y).to(conf), conf)
        logits = self.forward(0, self.weak(batch, "x"))
        loss = proden_loss(logits, conf)
        return StepOutput(0, loss, {"loss/proden": loss.item()},
                          writes={"x": {"conf": proden_update(logits, part.Y)}})
