"""Baseline: ALIM (ALIM-Onehot, ALIM-Scale) on PiCO, for noisy partial labels.

    coreg-train --config configs/demo.yaml train.method=alim alim.mode=onehot   # ALIM-Onehot
    coreg-train --config configs/demo.yaml train.method=alim alim.mode=scale    # ALIM-Scale

Xu, Lian, Liu, Liu & Tao, "ALIM: Adjusting Label Importance Mechanism for Noisy Partial Label
Learning", NeurIPS 2023; the authors' code github.com/zeroQiaoba/ALIM (pll_model.py,
train_merge.py, utils/utils_loss.py). PiCO (methods/pico.py) with the candidate set softened:
classes outside S count with weight lambda in
  * the pseudo-labels of the prototypes and of the contrast (classifier scores x (Y + lam (1 - Y))),
  * the target update from the prototype scores (softmax(q . prototypes / 0.07)): the one-hot of
    the weighted argmax (`mode=onehot`, their Case1) or the weighted scores renormalised
    (`mode=scale`, their Case3), moving-averaged as PiCO's;
lambda is 0 until `lambda_start_fraction` of the run, then after each epoch the
`noise_rate`-quantile of the samples' margins (max prototype score in S / max outside S, from
that epoch's steps), capped at 1. The contrast is supervised from the first step, and a MixUp
term (alpha 4, weight 1) mixes each weak view with a second weak view of another sample of the
same stream, with their targets. Targets can leave S, so they are a dense (C,) row per sample,
written by the step with the margin (train/step_writes.py); lambda is computed from the
committed margins of every rank at the next epoch's start, so a resumed run gets the same one.

Defaults are theirs (mode onehot: the argparse default; vMF 0.07; lambda from epoch 80 of 1000,
kept as a fraction; max1 as in all their commands; PiCO's defaults otherwise). ALIM assumes
the noise level known: `alim.noise_rate=-1` (default) takes the column's measured eta, which
needs true labels - an oracle given to this baseline, as in its paper; set it otherwise.
Deviations: MixUp partners come from the same batch (a per-stream permutation), not from a
second independently shuffled batch; backbone, augmentations, optimizer and schedule are the
trainer's, the same for every method here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch

from coreg_dist.config import ConfigError
from coreg_dist.io import read_json
from coreg_dist.methods.base import Batch, StepOutput
from coreg_dist.methods.pico import Pico, PicoConfig
from coreg_dist.methods.registry import register_method
from coreg_dist.rules.pico import (alim_lambda_from_margins, alim_margin, alim_mixup_loss,
                                   alim_pseudo_labels, alim_total_loss, alim_update_targets,
                                   pico_classification_loss, pico_prototype_phase,
                                   pico_prototype_scores)
from coreg_dist.shards.format import column_dir
from coreg_dist.state import FieldSpec


@dataclass
class AlimConfig(PicoConfig):
    mode: str = "onehot"              # onehot (ALIM-Onehot, their Case1) | scale (ALIM-Scale, Case3)
    vmf: float = 0.07                 # temperature of the prototype scores
    noise_rate: float = -1.0          # the noise level; -1: the column's measured eta (an oracle)
    lambda_start_fraction: float = 0.08   # their piror_start 80 of 1000 epochs
    max1: bool = True                 # lambda capped at 1
    mixup_weight: float = 1.0
    mixup_alpha: float = 4.0


@register_method("alim", config=AlimConfig)
class Alim(Pico):
    dense = True
    step_state = ("conf", "margin")

    def __init__(self, cfg, info, device, coll):
        super().__init__(cfg, info, device, coll)
        c = self.c
        if c.mode not in ("onehot", "scale"):
            raise ConfigError(f"config key 'alim.mode': unknown value '{c.mode}' (onehot | scale)")
        self.noise_rate = c.noise_rate if c.noise_rate >= 0 else self._column_eta(cfg)
        self.lam = 0.0
        self.lambda_start = math.ceil(c.lambda_start_fraction * cfg.train.epochs)

    @staticmethod
    def _column_eta(cfg) -> float:
        path = f"{column_dir(cfg.data.root, cfg.train.column)}/column.json"
        try:
            return float(read_json(path)["splits"]["train"]["eta"])
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"config key 'alim.noise_rate' is -1 (the column's measured eta) but "
                              f"{path} has no train eta ({exc}); set alim.noise_rate") from None

    def state_fields(self) -> Dict[str, FieldSpec]:
        return {**super().state_fields(), "margin": FieldSpec(dtype="float32", fill=float("nan"))}

    def begin_epoch(self, epoch: int, ctx) -> Dict:
        self.epoch = epoch
        if epoch >= 1 and epoch - 1 >= self.lambda_start:   # [theirs] after each such epoch
            every = self.committed(ctx, "margin")
            if len(every):
                self.lam = alim_lambda_from_margins(torch.from_numpy(every), self.noise_rate, self.c.max1)
        return {"alim_lambda": self.lam, "alim_noise_rate": self.noise_rate}

    def update(self, batch: Batch) -> StepOutput:
        c, lam = self.c, self.lam
        self.net.train()
        part = batch.parts["x"]
        conf = self.confidence(part)
        xw, logits, q, k = self.encode(batch)
        with torch.no_grad():
            pseudo = alim_pseudo_labels(torch.softmax(logits, 1), part.Y, lam)
            cluster = pico_prototype_scores(q, self.prototypes, temperature=c.vmf)
            margin = alim_margin(cluster, part.Y)
        if pico_prototype_phase(self.epoch, c.prot_start):
            conf = alim_update_targets(conf, cluster, part.Y, lam, self.target_momentum(), mode=c.mode)
        loss_cont, extra = self.contrast(batch, q, k, pseudo, supervised=True)
        loss_cls = pico_classification_loss(logits, conf)
        logs = {"loss/cls": loss_cls.item(), "loss/cont": loss_cont.item()}
        loss_mix = logits.new_zeros(())
        if c.mixup_weight:
            lam_mix = float(batch.rng.shared.beta(c.mixup_alpha, c.mixup_alpha))
            lam_mix = max(lam_mix, 1 - lam_mix)
            perm = self.stream_perm(batch)
            x_mix = lam_mix * xw + (1 - lam_mix) * self.weak(batch, "x")[perm]
            # with the projection head, though unused: under DDP the last forward before the
            # backward must reach every parameter that gets a gradient (the head does, from q)
            logits_mix, _ = self.forward(0, x_mix, with_proj=True)
            loss_mix = alim_mixup_loss(logits_mix, conf, conf[perm], lam_mix)
            logs["loss/mix"] = loss_mix.item()
        loss = alim_total_loss(loss_cls, loss_cont, loss_mix, c.loss_weight, c.mixup_weight)
        logs["loss/total"] = loss.item()
        writes = self.write(conf)
        writes["x"]["margin"] = margin
        return StepOutput(0, loss, logs, extra=extra, writes=writes)

    def state_dict(self) -> Dict:
        return {**super().state_dict(), "lam": self.lam}

    def load_state_dict(self, s: Dict) -> None:
        super().load_state_dict(s)
        self.lam = float(s["lam"])
