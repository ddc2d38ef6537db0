"""Output alignment: one bias per class on a trained classifier's logits, so that its mean
prediction over unlabelled training images matches a class prior.

Why: a classifier learned from an annotator's candidate sets inherits the annotator's class
balance. On the demo (Fashion-MNIST, balanced, CLIP-union sets) Co-Reg predicts T-shirt 1.5 times
as often as it occurs and shirt 0.7 times; partial CE and every ablation do the same. Shifting the
logits until the mean prediction on the training pool is the prior is the prior-shift correction
of Saerens et al. (2002) with the prior given instead of estimated; it is what Co-Reg's
distribution alignment (DA) does to U's co-guesses during training, applied once to the final
predictions. It needs no label: the pool's images (and, for the `candidates` prior, their sets).
Measured in README ("Output alignment").

The fit is a fixed point over every rank's rows: b <- b + log prior - log mean_i softmax(l_i + b),
one all-reduce of K numbers per iteration, the same iterations on every rank.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from coreg_dist.config import ConfigError

PRIORS = ("uniform", "candidates", "none")


def prior_shards(shard_counts: Dict[str, int], samples: int) -> Dict[str, int]:
    """The shards the bias is fitted on: the first, in name order, that hold `samples` images
    (all of them if they hold fewer). A fixed set, so the fit sees the same images at any world
    size; each rank sweeps its part of it."""
    chosen: Dict[str, int] = {}
    for name in sorted(shard_counts):
        if sum(chosen.values()) >= samples:
            break
        chosen[name] = shard_counts[name]
    return chosen


def candidate_mass(Y: torch.Tensor) -> np.ndarray:
    """(K,) each candidate set's unit mass spread evenly over its candidates, summed per class."""
    Y = Y.double()
    return (Y / Y.sum(1, keepdim=True).clamp_min(1)).sum(0).cpu().numpy()


def target_prior(kind: str, mass: Optional[np.ndarray], num_classes: int,
                 temperature: float = 1.0) -> torch.Tensor:
    """A class prior (float64): uniform, or the candidate sets' class balance (`mass`, summed
    `candidate_mass` over the pool) ** temperature, normalised. Co-Reg's DA prior is the same."""
    if kind == "uniform":
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    if kind != "candidates":
        raise ValueError(f"unknown class prior '{kind}' (train.output_prior, coreg.da_prior: "
                         "uniform or candidates)")
    mass = np.asarray(mass, dtype=np.float64)
    if mass.sum() <= 0:
        raise ValueError("the candidates prior: the pool swept holds no candidate set")
    prior = np.maximum(mass, 1e-12) ** temperature     # a class no set names keeps a little mass
    return torch.as_tensor(prior / prior.sum())


def check_config(train) -> None:
    """The `train.output_prior*` keys, before any training."""
    if train.output_prior not in PRIORS:
        raise ConfigError(f"config key 'train.output_prior': unknown value '{train.output_prior}' "
                          f"(one of {', '.join(PRIORS)})")
    if train.output_prior != "none" and train.output_prior_samples < 1:
        raise ConfigError("config key 'train.output_prior_samples' must be >= 1 "
                          f"(got {train.output_prior_samples}); train.output_prior=none turns it off")


@torch.no_grad()
def fit_logit_bias(logits: torch.Tensor, prior: torch.Tensor, coll, max_iter: int = 200,
                   tol: float = 1e-4) -> torch.Tensor:
    """The bias b (K,) with mean softmax(logits + b) = prior over every rank's rows of `logits`
    (n_rank, K; a rank may hold none). Collective: every rank calls it with the same prior."""
    K = prior.numel()
    log_prior = prior.to(torch.float64).log()
    n = coll.sum(int(logits.shape[0]))
    if n == 0:
        raise ValueError("output alignment: no training image was swept to fit the bias on")
    b = torch.zeros(K, dtype=torch.float64)
    for _ in range(max_iter):
        local = (logits.float() + b.to(logits.device, torch.float32)).softmax(1).sum(0)
        mean = coll.sum(local.to(torch.float64).cpu()) / n
        # A class the network never predicts has mean ~0: cap the step so that its bias grows
        # over iterations instead of jumping past the others at once.
        step = (log_prior - mean.clamp_min(1e-30).log()).clamp(-2.0, 2.0)
        b += step
        if float(step.abs().max()) < tol:
            break
    return (b - b.mean()).to(torch.float32)
