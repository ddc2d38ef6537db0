"""Baseline: PiCO, contrastive label disambiguation for partial-label learning.

    coreg-train --config configs/demo.yaml train.method=pico run.out_dir=runs/demo-pico

Wang, Xiao, Li, Feng, Sun & Zhao, "PiCO: Contrastive Label Disambiguation for Partial Label
Learning", ICLR 2022; the authors' code github.com/hbzju/PiCO (model.py, train.py,
utils/utils_loss.py). One network with a projection head and its momentum (key) encoder:
  * classification: cross-entropy with the sample's target row, uniform over S at the start;
  * contrastive: the query (weak view) against its key (strong view, key encoder), the batch and
    a queue of keys; positives share the pseudo-label (the classifier's argmax inside S); before
    `prot_start` unsupervised (own key only);
  * class prototypes: a moving average of the queries of each pseudo-label;
  * from `prot_start` on, a sample's target row moves toward the one-hot of its prototype-closest
    class inside S, with a momentum going from 0.95 to 0.8 over the run (set once per epoch,
    from the previous epoch's value as theirs). Target rows stay inside S: stored per candidate,
    written by the step (train/step_writes.py), read from the next epoch on.
The rules are in coreg_dist/rules/pico.py, the queue and key encoder shared with Co-Reg
(coreg_dist/methods/_moco.py). Queries, keys and pseudo-labels are gathered over ranks in one
process's order, so the contrast set and the prototypes do not depend on the world size.

Defaults are theirs (queue 8192, key momentum 0.999, prototype momentum 0.99, loss weight 0.5,
temperature 0.07, target momentum 0.95 -> 0.8, prot_start 1 as in their README commands; their
argparse default is 80 of 800 epochs). Backbone, augmentations, optimizer and schedule are the
trainer's (`train.*`), the same for every method here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

from coreg_dist.methods._confidence import ConfidenceMethod
from coreg_dist.methods._moco import MoCoQueue, ema_to_key, key_encoder
from coreg_dist.methods.base import Batch, StepOutput
from coreg_dist.methods.registry import register_method
from coreg_dist.rules.pico import (pico_classification_loss, pico_contrastive_loss,
                                   pico_prototype_phase, pico_prototype_scores, pico_pseudo_labels,
                                   pico_target_momentum, pico_total_loss, pico_update_prototypes,
                                   pico_update_targets)


@dataclass
class PicoConfig:
    queue_size: int = 8192
    moco_momentum: float = 0.999      # key encoder EMA
    proto_momentum: float = 0.99
    loss_weight: float = 0.5          # weight of the contrastive loss
    temperature: float = 0.07
    conf_ema_start: float = 0.95      # target momentum at the start of the run ...
    conf_ema_end: float = 0.8         # ... and at its end
    prot_start: int = 1               # epoch from which targets move and the contrast is supervised


@register_method("pico", config=PicoConfig)
class Pico(ConfidenceMethod):
    def __init__(self, cfg, info, device, coll):
        super().__init__(cfg, info, device, coll)
        c = self.c = getattr(cfg, self.name)
        self.key = key_encoder(self.net)
        self.queue = MoCoQueue(c.queue_size, cfg.model.proj_dim, device)
        self.prototypes = torch.zeros(info.num_classes, cfg.model.proj_dim, device=device)

    def modules(self):
        return [self.net, self.key]

    # ------------------------------------------------------------------ pieces ALIM shares
    def encode(self, batch: Batch):
        """(weak view, its logits, its normalised query, the strong view's normalised key)."""
        xw = self.weak(batch, "x")
        logits, z = self.forward(0, xw, with_proj=True)
        with torch.no_grad():
            self.key.train()
            _, zk = self.forward(0, self.strong(batch, "x"), with_proj=True, module=self.key)
        return xw, logits, F.normalize(z, dim=1), F.normalize(zk, dim=1)

    def target_momentum(self) -> float:
        # [theirs] set after each epoch: epoch e trains with the value of e - 1
        return pico_target_momentum(max(0, self.epoch - 1), self.cfg.train.epochs,
                                    self.c.conf_ema_start, self.c.conf_ema_end)

    def stream_perm(self, batch: Batch) -> torch.Tensor:
        """A permutation within each stream's rows: MixUp partners (ALIM, PiCO+) that do not
        depend on the world size."""
        perm, start = [], 0
        for n, g in zip(batch.sizes["x"], batch.rng.gens):
            perm.append(start + torch.randperm(n, generator=g))
            start += n
        return torch.cat(perm).to(self.device)

    def contrast(self, batch: Batch, q, k, pseudo, supervised: bool):
        """The contrastive loss over every rank's queries and keys (one process's order), and
        what after_step needs to update the prototypes and the queue."""
        parts = ["x"]
        q_all = self.gather_rows(q, batch, parts, grad=True)
        k_all = self.gather_rows(k, batch, parts)
        pseudo_all = self.gather_rows(pseudo, batch, parts)
        qf, ql, _ = self.queue.view()
        loss = pico_contrastive_loss(q_all, k_all, qf, pseudo_all, ql, supervised=supervised,
                                     T=self.c.temperature, anchor_idx=self.own_rows(batch, parts))
        return loss, {"q": q_all.detach(), "k": k_all, "pseudo": pseudo_all}

    def update(self, batch: Batch) -> StepOutput:
        c = self.c
        self.net.train()
        part = batch.parts["x"]
        conf = self.confidence(part)
        _, logits, q, k = self.encode(batch)
        with torch.no_grad():
            pseudo = pico_pseudo_labels(torch.softmax(logits, 1), part.Y)
            score_prot = pico_prototype_scores(q, self.prototypes)     # before this step's update
        supervised = pico_prototype_phase(self.epoch, c.prot_start)
        if supervised:   # [their train loop] targets move first; the loss reads the new rows
            conf = pico_update_targets(conf, score_prot, part.Y, self.target_momentum())
        loss_cont, extra = self.contrast(batch, q, k, pseudo, supervised)
        loss_cls = pico_classification_loss(logits, conf)
        loss = pico_total_loss(loss_cls, loss_cont, c.loss_weight)
        return StepOutput(0, loss, {"loss/cls": loss_cls.item(), "loss/cont": loss_cont.item(),
                                    "loss/total": loss.item()}, extra=extra, writes=self.write(conf))

    @torch.no_grad()
    def after_step(self, batch: Batch, out: StepOutput) -> None:
        e = out.extra
        self.prototypes = pico_update_prototypes(self.prototypes, e["q"], e["pseudo"],
                                                 m=self.c.proto_momentum)
        self.queue.push(e["k"], e["pseudo"], torch.ones_like(e["pseudo"], dtype=torch.bool))
        ema_to_key(self.engines[0], self.key, self.net, self.c.moco_momentum)

    def state_dict(self) -> Dict:
        return {"nets": [self.net.state_dict()], "key": self.key.state_dict(),
                "queue": self.queue.state_dict(), "prototypes": self.prototypes}

    def load_state_dict(self, s: Dict) -> None:
        self.net.load_state_dict(s["nets"][0])
        self.key.load_state_dict(s["key"])
        self.queue.load_state_dict(s["queue"])
        self.prototypes = s["prototypes"].to(self.device)
