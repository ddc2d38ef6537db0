"""Baseline: PiCO+, PiCO made robust to candidate sets that miss the true label.

    coreg-train --config configs/demo.yaml train.method=pico_plus run.out_dir=runs/demo-pico-plus

Wang, Xiao, Li, Feng, Niu, Chen & Zhao, "PiCO+: Contrastive Label Disambiguation for Robust
Partial Label Learning", IEEE TPAMI 2024; the authors' code github.com/hbzju/PiCO
(train_pico_plus.py, model.py class PiCO_PLUS, utils_plus/utils_loss.py). PiCO (methods/pico.py)
plus a split of the samples into reliable and unreliable ones:
  * every step stores each sample's distance to the prototype of its classifier prediction
    inside S (negative cosine); at the start of each epoch from `prot_start` on, the
    `pure_ratio` (0.6) of all samples closest to their prototype are reliable, the others not;
  * reliable samples: PiCO's target (moved toward the prototype-closest class inside S), with
    weight `cls_weight` (2); unreliable ones: a guess from the prototype scores sharpened with
    T = 0.07, over all classes, with weight `ur_weight` (0.1); a MixUp term (Beta(4, 4), the
    batch mixed with a permutation of itself) on those targets, weight 1;
  * pseudo-labels (contrast, queue) inside S for reliable samples, over all classes otherwise;
    the prototypes move with the reliable samples only; the queue keeps each key's flag;
  * contrast: positives = same pseudo-label among reliable anchors and columns; from
    `knn_start` on an unreliable anchor's positives are its 16 nearest neighbours in the
    contrast set, weighted `ur_weight` (reliable: `loss_weight`); plus `ur_weight` x PiCO's
    contrast over every sample. Before `prot_start`: PiCO's warm-up (MoCo loss, uniform targets).
The rules are in coreg_dist/rules/pico.py. Per-sample state: the target row (per candidate: the
update only adds one-hots of classes inside S) and the distance, both written by the step
(train/step_writes.py); the reliable set is a threshold on the committed distances of every
rank (the `int(N * pure_ratio)`-th smallest), so a streamed sample knows its side from its own
row. The classification and contrastive losses run on the global batch (gathered in one
process's order), so the split's per-batch means do not depend on the world size.

Defaults are theirs (pure_ratio 0.6, chosen_neighbors 16, temperature_guess 0.07, ur_weight 0.1,
cls_weight 2; PiCO's queue, momenta, loss weight and 0.95 -> 0.8 target momentum); `prot_start`
1 as PiCO's here (their README: 5 of 800 epochs); knn_start 100 of their 800 epochs, kept as a
fraction (`knn_start_fraction` 0.125). Deviations: the reliable set counts ties at the threshold
in (their argsort keeps an arbitrary few); backbone, augmentations, optimizer and schedule are
the trainer's, the same for every method here (their README: lr 0.01, weight decay 1e-3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch

from coreg_dist.losses import mixup
from coreg_dist.methods._moco import ema_to_key
from coreg_dist.methods.base import Batch, BatchPart, StepOutput
from coreg_dist.methods.pico import Pico, PicoConfig
from coreg_dist.methods.registry import register_method
from coreg_dist.rules.pico import (pico_classification_loss, pico_contrastive_loss,
                                   pico_plus_classification_loss, pico_plus_contrastive_loss,
                                   pico_plus_guess_targets, pico_plus_mixup_targets,
                                   pico_plus_prototype_distance, pico_plus_pseudo_labels,
                                   pico_plus_reliable_threshold, pico_prototype_phase,
                                   pico_total_loss, pico_update_prototypes, pico_update_targets)
from coreg_dist.state import FieldSpec


@dataclass
class PicoPlusConfig(PicoConfig):
    pure_ratio: float = 0.6             # share of the samples kept reliable
    knn_start_fraction: float = 0.125   # their knn_start 100 of 800 epochs
    chosen_neighbors: int = 16          # kNN positives of an unreliable anchor
    temperature_guess: float = 0.07     # sharpening of the unreliable samples' guesses
    ur_weight: float = 0.1              # weight of the unreliable terms and the relaxed contrast
    cls_weight: float = 2.0             # weight of the reliable samples' cross-entropy
    mixup_alpha: float = 4.0


@register_method("pico_plus", config=PicoPlusConfig)
class PicoPlus(Pico):
    step_state = ("conf", "dist")
    attach = ("conf", "dist")

    def __init__(self, cfg, info, device, coll):
        super().__init__(cfg, info, device, coll)
        self.knn_start = math.ceil(self.c.knn_start_fraction * cfg.train.epochs)
        self.threshold = math.inf       # every sample reliable until the first selection

    def state_fields(self) -> Dict[str, FieldSpec]:
        return {**super().state_fields(), "dist": FieldSpec(dtype="float32", fill=float("nan"))}

    def begin_epoch(self, epoch: int, ctx) -> Dict:
        self.epoch = epoch
        out = {}
        if epoch >= 1 and pico_prototype_phase(epoch, self.c.prot_start):   # [theirs] each such epoch
            every = self.committed(ctx, "dist")
            if len(every):
                self.threshold = pico_plus_reliable_threshold(torch.from_numpy(every), self.c.pure_ratio)
                out["pico_plus_reliable_share"] = float((every <= self.threshold).mean())
        if math.isfinite(self.threshold):
            out["pico_plus_threshold"] = self.threshold
        return out

    def reliable(self, part: BatchPart) -> torch.Tensor:
        """(n,) bool: the sample's last committed distance is within the threshold (a sample
        never written yet counts as reliable, as every sample before the first selection)."""
        dist = part.attach["dist"].float().reshape(-1)
        return ~(dist > self.threshold)

    def update(self, batch: Batch) -> StepOutput:
        c = self.c
        self.net.train()
        part = batch.parts["x"]
        conf = self.confidence(part)
        is_rel = self.reliable(part).to(self.device)
        xw, logits, q, k = self.encode(batch)
        with torch.no_grad():
            probs = torch.softmax(logits, 1)
            pseudo = pico_plus_pseudo_labels(probs, part.Y, is_rel)
            logits_prot = q @ self.prototypes.t()              # before this step's update
            dist = pico_plus_prototype_distance(q, self.prototypes, probs, part.Y)
        parts = ["x"]
        logs = {"pico_plus/reliable": float(is_rel.float().mean())}
        if not pico_prototype_phase(self.epoch, c.prot_start):   # PiCO's warm-up
            loss_cont, extra = self.contrast(batch, q, k, pseudo, supervised=False)
            loss_cls = pico_classification_loss(logits, conf)
            loss = pico_total_loss(loss_cls, loss_cont, c.loss_weight)
        else:
            conf = pico_update_targets(conf, torch.softmax(logits_prot, 1), part.Y, self.target_momentum())
            q_all = self.gather_rows(q, batch, parts, grad=True)
            k_all = self.gather_rows(k, batch, parts)
            pseudo_all = self.gather_rows(pseudo, batch, parts)
            rel_all = self.gather_rows(is_rel, batch, parts)
            qf, ql, qrel = self.queue.view()
            loss_cont = pico_plus_contrastive_loss(
                q_all, k_all, qf, pseudo_all, ql, rel_all, qrel, self.epoch,
                knn_start=self.knn_start, chosen_neighbors=c.chosen_neighbors,
                loss_weight=c.loss_weight, ur_weight=c.ur_weight, T=c.temperature)
            extra = {"q": q_all.detach(), "k": k_all, "pseudo": pseudo_all}
            guess = pico_plus_guess_targets(logits_prot, c.temperature_guess)
            x_mix, t_mix, _, _ = mixup(xw, pico_plus_mixup_targets(conf, guess, is_rel), c.mixup_alpha,
                                       rng=batch.rng.shared, perm=self.stream_perm(batch))
            # with the projection head, though unused: under DDP the last forward before the
            # backward must reach every parameter that gets a gradient (the head does, from q)
            logits_mix, _ = self.forward(0, x_mix, with_proj=True)
            loss_cls = pico_plus_classification_loss(
                self.gather_rows(logits, batch, parts, grad=True), self.gather_rows(conf, batch, parts),
                self.gather_rows(guess, batch, parts), rel_all, logits_mix, t_mix,
                cls_weight=c.cls_weight, ur_weight=c.ur_weight)
            loss = loss_cls + loss_cont
        extra["rel"] = self.gather_rows(is_rel, batch, parts)
        logs.update({"loss/cls": loss_cls.item(), "loss/cont": loss_cont.item(), "loss/total": loss.item()})
        writes = self.write(conf)
        writes["x"]["dist"] = dist
        return StepOutput(0, loss, logs, extra=extra, writes=writes)

    @torch.no_grad()
    def after_step(self, batch: Batch, out: StepOutput) -> None:
        e = out.extra
        self.prototypes = pico_update_prototypes(self.prototypes, e["q"], e["pseudo"],
                                                 m=self.c.proto_momentum, mask=e["rel"])
        self.queue.push(e["k"], e["pseudo"], e["rel"])
        ema_to_key(self.engines[0], self.key, self.net, self.c.moco_momentum)

    def state_dict(self) -> Dict:
        return {**super().state_dict(), "threshold": self.threshold}

    def load_state_dict(self, s: Dict) -> None:
        super().load_state_dict(s)
        self.threshold = float(s["threshold"])
