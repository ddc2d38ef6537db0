"""Baseline: KD, a student trained on the annotators' soft labels.

    coreg-train --config configs/demo.yaml train.method=kd run.out_dir=runs/demo-kd

The paper's "KD" row (coreg-method.md, section 3): a compact network distilled from the VLM's
template-averaged probabilities instead of its candidate sets. The teacher distribution of a
sample is the mean over the annotators (CLIP's prompt templates) of their stored top-few
scores (classes an annotator did not store count as 0), renormalised; the column keeps them
(`topi.npy` / `topp.npy`), so no VLM runs again. Loss: Hinton et al.'s distillation,
``T^2 * CE(sharpen(q, T), softmax(z / T))`` (Hinton, Vinyals & Dean, "Distilling the Knowledge
in a Neural Network", 2015); at the default T = 1 it is the cross-entropy with the soft labels.
Same backbone, augmentation, optimizer and schedule as every method here (`train.*`).
"""
from __future__ import annotations

from dataclasses import dataclass

from coreg_dist.losses import sharpen
from coreg_dist.methods._confidence import SingleNetwork
from coreg_dist.methods.base import Batch, StepOutput
from coreg_dist.methods.registry import register_method
from coreg_dist.rules.pll import proden_loss


@dataclass
class KdConfig:
    temperature: float = 1.0          # T: teacher sharpened by 1/T, student logits divided by T


@register_method("kd", config=KdConfig)
class KD(SingleNetwork):
    soft_labels = True

    def update(self, batch: Batch) -> StepOutput:
        T = float(self.cfg.kd.temperature)
        self.net.train()
        part = batch.parts["x"]
        teacher = part.soft if T == 1.0 else sharpen(part.soft, T)
        # the confidence-weighted CE of PRODEN is the cross-entropy with a soft target
        loss = proden_loss(self.forward(0, self.weak(batch, "x")) / T, teacher) * (T * T)
        return StepOutput(0, loss, {"loss/kd": loss.item()})
