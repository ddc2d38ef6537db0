"""Baseline: LWS, the leveraged weighted loss for partial-label learning.

    coreg-train --config configs/demo.yaml train.method=lws run.out_dir=runs/demo-lws

Wen, Cui, Hang, Liu, Wang & Lin, "Leveraged Weighted Loss for Partial Label Learning", ICML
2021; the authors' code github.com/hongwei-wen/LW-loss-for-partial-label (utils/utils_loss.py
`lws_loss`, utils/utils_algo.py `confidence_update_lw`). Candidates are pushed up and
non-candidates down through sigmoid losses, each weighted by a per-sample weight; after the
optimizer step a fresh forward of the same batch (no gradient, the network still in train mode,
as theirs) renormalises the softmax separately over S and over the rest into the new weights.
The weights cover every class, so this state is a dense (C,) row per sample: O(C), unlike the
per-candidate state of the other methods (at 21k classes, 84 kB a sample).

Defaults: lw_weight (beta) = 1 and lw_weight0 = 1, the values of every CIFAR-10 run in their
README (their argparse default lw_weight = 0 switches the non-candidate term off). Backbone,
augmentation, optimizer and schedule are the trainer's (`train.*`), the same for every method.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from coreg_dist.methods._confidence import ConfidenceMethod
from coreg_dist.methods.base import Batch, BatchPart, StepOutput
from coreg_dist.methods.registry import register_method
from coreg_dist.rules.pll import lws_init, lws_loss, lws_update


@dataclass
class LwsConfig:
    lw_weight: float = 1.0            # beta: weight of the non-candidate term
    lw_weight0: float = 1.0           # weight of the candidate term


@register_method("lws", config=LwsConfig)
class Lws(ConfidenceMethod):
    dense = True

    def initial(self, part: BatchPart) -> torch.Tensor:
        return lws_init(part.Y)

    def update(self, batch: Batch) -> StepOutput:
        c = self.cfg.lws
        self.net.train()
        part = batch.parts["x"]
        view = self.weak(batch, "x")
        total, l1, l2 = lws_loss(self.forward(0, view), part.Y, self.confidence(part),
                                 lw_weight=c.lw_weight, lw_weight0=c.lw_weight0)
        return StepOutput(0, total, {"loss/lws": total.item(), "loss/lws_cand": l1.item(),
                                     "loss/lws_noncand": l2.item()}, extra={"view": view})

    @torch.no_grad()
    def after_step(self, batch: Batch, out: StepOutput) -> None:
        # [their main loop] the weights come from the network after this step's update
        out.writes = self.write(lws_update(self.forward(0, out.extra["view"]), batch.parts["x"].Y))
