"""Baseline: DivideMix on the single noisy label, as Co-Reg's machinery configured as its authors'.

    coreg-annotate clip --config configs/demo.yaml annotator.rule=topk annotator.topk=1 \
        annotator.column=clip_top1                     # the template-average argmax: one label
    coreg-train --config configs/demo.yaml train.method=dividemix train.column=clip_top1

Li, Socher & Hoi, "DivideMix: Learning with Noisy Labels as Semi-supervised Learning", ICLR
2020; the authors' code github.com/LiJunnan1992/DivideMix (Train_cifar.py). Co-Reg grew out of
it: with one label per sample, Co-Reg's division loss is DivideMix's per-sample cross-entropy,
its labeled refinement (w y + (1 - w) p, sharpened) and unlabeled co-guessing (four views of
two networks, sharpened) are DivideMix's, and so are the GMM, the cross-network split, the
warm-up and the MixMatch loss. So DivideMix is the Co-Reg class with the authors' switches
(`dividemix.*`, every `coreg.*` key): no distribution alignment, no feature-space terms, no
partial-CE term, one global GMM on min-max normalised losses of the un-augmented images
(`divide_view=none`, their eval_train), MixUp (alpha 4) over the very weak views the targets
came from (`label_space_view=weak`), lambda_u 25, and their prior penalty on the mixed logits
(KL(uniform || mean prediction) over the global batch, coreg_dist/rules/pico.py).

Defaults are theirs for CIFAR-10 with symmetric noise (warm-up 10 epochs, no confidence penalty
in warm-up, no loss history: their 5-epoch average is for 90% noise only). Not theirs: the
unsupervised weight ramps with the integer epoch (theirs adds the step's fraction of the epoch),
and backbone, optimizer and schedule are the trainer's, the same for every method here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from coreg_dist.methods.coreg import CoReg, CoRegConfig
from coreg_dist.methods.registry import register_method
from coreg_dist.rules.pico import dividemix_prior_penalty


@dataclass
class DivideMixConfig(CoRegConfig):
    warm_up: int = 10
    warmup_neg_entropy: bool = False      # their conf_penalty: asymmetric noise only
    warmup_view: str = "weak"
    warmup_batch_factor: int = 2          # their warm-up loader: batch_size * 2
    label_space_view: str = "weak"
    divide_view: str = "none"
    distribution_alignment: bool = False
    loss_history: int = 1
    divide_per_class: bool = False
    u_guess: str = "all"
    co_divide: Any = True                 # the authors' switches, not Co-Reg's choice by the sets
    co_pseudo_label: Any = True
    p_refine: str = "all"                 # px = w * label + (1 - w) * the trained network's own
    pce_weight: float = 0.0
    mixup: bool = True
    mixup_alpha: float = 4.0
    lambda_u: float = 25.0
    rampup_epochs: int = 16
    prototypes: bool = False
    contrastive: bool = False
    prior_penalty: bool = True


@register_method("dividemix", config=DivideMixConfig)
class DivideMix(CoReg):
    def regularizer(self, logits: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.c.prior_penalty:
            return None
        # the mean prediction of the global batch: what one device holding it would compute
        return dividemix_prior_penalty(self.coll.all_gather(logits, grad=True))
