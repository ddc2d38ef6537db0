"""Baseline: one network trained with partial cross-entropy on the candidate sets.

    coreg-train --config configs/demo.yaml train.method=pce run.out_dir=runs/demo-pce

The same backbone, schedule, augmentation and epochs as Co-Reg, none of its machinery:
what candidate sets alone buy.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from coreg_dist.losses import partial_ce
from coreg_dist.methods.base import Batch, Method, Step, register_method, seeded_generator


@register_method("pce")
class PartialCE(Method):
    num_networks = 1

    def __init__(self, cfg, info, device):
        super().__init__(cfg, info, device)
        self.net = self.make_network(cfg.run.seed)
        self.opt = self.make_optimizer(self.net)

    def networks(self):
        return [self.net]

    def plan_epoch(self, epoch: int, n: int) -> List[Step]:
        self.set_lr([self.opt], epoch)
        self.gen = seeded_generator(self.cfg.run.seed, epoch, 1)
        order = np.random.default_rng([self.cfg.run.seed, epoch]).permutation(n)
        b = self.cfg.train.batch_size
        return [Step(0, order[i:i + b]) for i in range(0, n, b)]

    def update(self, batch: Batch) -> Dict[str, float]:
        self.net.train()
        x = self.weak(batch.x, self.gen)
        loss = partial_ce(self.forward(self.net, x), batch.Y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss/pce": loss.item()}

    def state_dict(self) -> Dict:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
