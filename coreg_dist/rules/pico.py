"""Rules of PiCO, PiCO+, ALIM and DivideMix (pure functions on tensors).

Sources (read for this module; every function cites the file it follows):

* PiCO  - H. Wang, R. Xiao, Y. Li, L. Feng, G. Niu, G. Chen, J. Zhao, "PiCO: Contrastive
  Label Disambiguation for Partial Label Learning", ICLR 2022.
  Code: github.com/hbzju/PiCO (model.py, utils/utils_loss.py, train.py).
* PiCO+ - H. Wang et al., "PiCO+: Contrastive Label Disambiguation for Robust Partial Label
  Learning", IEEE TPAMI 2024. Code: the same repository, github.com/hbzju/PiCO
  (model.py class PiCO_PLUS, train_pico_plus.py, utils_plus/utils_loss.py).
* ALIM  - M. Xu, Z. Lian, L. Feng, B. Liu, J. Tao, "ALIM: Adjusting Label Importance
  Mechanism for Noisy Partial Label Learning", NeurIPS 2023.
  Code: github.com/zeroQiaoba/ALIM (pll_model.py, utils/utils_loss.py, train_merge.py).
* DivideMix - J. Li, R. Socher, S. C. H. Hoi, "DivideMix: Learning with Noisy Labels as
  Semi-supervised Learning", ICLR 2020. Code: github.com/LiJunnan1992/DivideMix
  (Train_cifar.py: SemiLoss, linear_rampup, the prior penalty in train()).

Conventions (as in coreg_dist/losses.py): ``Y`` (B, C) multi-hot candidate mask (nonzero =
candidate), ``conf`` (B, C) per-sample target rows, ``logits`` (B, C) raw scores, ``probs``
rows on the simplex. Functions never modify their inputs; a rule that updates per-sample
state returns the new rows. Where the paper and the code differ the code is followed and
the comment says so.

Per-sample state: PiCO / PiCO+ targets stay zero outside S (their update only ever adds
one-hots of classes inside S), so they can be stored per candidate set. ALIM's targets can
put mass outside S (that is the point of lam > 0), so they need a dense (C,) row.

Empty candidate rows (S = {}): target updates leave such rows unchanged (a sample without
candidates has no target to move towards; ``pico_initial_targets`` makes it uniform over
all classes, as every rule module here does); pseudo-labels (which every sample needs for the
prototypes / contrastive mask) treat an empty S as "no constraint", i.e. the argmax over
all classes. The authors' code divides by |S| = 0 (NaN) at initialisation, and its argmax
of an all-zero row gives class 0; both are artefacts this module avoids on purpose.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from coreg_dist.losses import (label_space_loss, linear_rampup, noisy_supcon_loss,
                               update_prototypes, weigh_outside)
from coreg_dist.rules.pll import proden_init, proden_loss

Tensor = torch.Tensor

__all__ = [
    # PiCO
    "pico_initial_targets", "pico_classification_loss", "pico_pseudo_labels",
    "pico_prototype_scores", "pico_update_prototypes", "pico_target_momentum",
    "pico_update_targets", "pico_prototype_phase", "pico_moco_loss", "pico_contrastive_loss",
    "pico_total_loss",
    # PiCO+
    "pico_plus_pseudo_labels", "pico_plus_prototype_distance", "pico_plus_select_reliable",
    "pico_plus_reliable_threshold",
    "pico_plus_supcon_loss", "pico_plus_contrastive_masks", "pico_plus_contrastive_loss",
    "pico_plus_guess_targets", "pico_plus_mixup_targets", "pico_plus_classification_loss",
    # ALIM
    "alim_targets", "alim_update_targets", "alim_pseudo_labels", "alim_margin",
    "alim_lambda_from_margins", "alim_lambda", "alim_mixup_loss", "alim_total_loss",
    # DivideMix
    "dividemix_semi_loss", "dividemix_prior_penalty",
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def _check_2d(fn: str, **tensors: Tensor) -> None:
    """Raise ValueError unless every tensor is 2-D and all share one (B, C) shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if any(len(s) != 2 for s in shapes.values()) or len(set(shapes.values())) != 1:
        desc = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise ValueError(f"{fn}: expected tensors of one (B, C) shape, got {desc}")


def _check_rows(fn: str, n: int, **vectors: Tensor) -> None:
    """Raise ValueError unless every vector has n entries along dim 0."""
    for name, v in vectors.items():
        if v.shape[0] != n:
            raise ValueError(f"{fn}: {name} has {v.shape[0]} rows, expected {n}")


def _check_momentum(fn: str, momentum: float) -> None:
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{fn}: momentum must lie in [0, 1], got {momentum}")


def _candidates(Y: Tensor, like: Tensor) -> Tensor:
    """Y as 0/1 floats with the dtype/device of ``like``."""
    return (Y != 0).to(dtype=like.dtype, device=like.device)


def _nonempty(Y: Tensor) -> Tensor:
    """(B,) bool: the candidate set of the row is not empty."""
    return (Y != 0).any(dim=1)


def _constraint(Y: Tensor, like: Tensor) -> Tensor:
    """Candidate mask used for pseudo-labels: an empty S means no constraint (all ones)."""
    Yf = _candidates(Y, like)
    return torch.where(_nonempty(Y).to(like.device).unsqueeze(1), Yf, torch.ones_like(Yf))


def _soft_ce_rows(logits: Tensor, targets: Tensor) -> Tensor:
    """(B,) ``-sum_j t_ij log softmax(logits_i)_j`` (targets detached, as in the authors' ce_loss)."""
    return -(F.log_softmax(logits, dim=1) * targets.detach().to(logits.dtype)).sum(dim=1)


def _mean_or_zero(values: Tensor, keep: Optional[Tensor] = None) -> Tensor:
    """Mean of ``values[keep]``; a zero attached to the graph when nothing is kept
    (the authors' ``tensor[empty].mean()`` would be NaN)."""
    if keep is not None:
        values = values[keep.to(values.device)]
    if values.numel() == 0:
        return values.sum() * 0.0
    return values.mean()


# ---------------------------------------------------------------------------
# PiCO (Wang et al., ICLR 2022; github.com/hbzju/PiCO)
# ---------------------------------------------------------------------------

# PiCO starts from the same rows as PRODEN (uniform over S; train.py 'uniform targets') and
# trains on the same confidence-weighted CE (utils/utils_loss.py ``partial_loss.forward``: the
# mean over the batch of -sum_j conf_ij log softmax_ij): one function each, in rules/pll.py.
pico_initial_targets = proden_init
pico_classification_loss = proden_loss


def pico_pseudo_labels(probs: Tensor, Y: Tensor) -> Tensor:
    """Classifier pseudo-label inside S: ``argmax_j softmax(logits_i)_j * Y_ij``.

    hbzju/PiCO model.py ``PiCO.forward`` (``pseudo_labels_b``): these labels drive the
    prototype update and the contrastive mask. Accepts probabilities (argmax is the same
    for logits only when S is full, so pass probabilities). Empty S: argmax over all
    classes (see module docstring). Returns (B,) long.
    """
    _check_2d("pico_pseudo_labels", probs=probs, Y=Y)
    return (probs * _constraint(Y, probs)).argmax(dim=1)


def pico_prototype_scores(q: Tensor, prototypes: Tensor, temperature: float = 1.0) -> Tensor:
    """Prototype-based class scores ``softmax(q P^T / temperature)`` (B, C).

    hbzju/PiCO model.py: ``score_prot = softmax(q @ prototypes.T)`` - no temperature in
    PiCO / PiCO+ (default 1.0); ALIM (pll_model.py, ``cluster_out``) divides by
    ``args.vMF = 0.07``. ``q`` (B, D) are the L2-normalised query embeddings, ``prototypes``
    (C, D) the prototypes *before* this step's update (the authors clone them first).
    The restriction to S happens in :func:`pico_update_targets`, not here. No gradient
    flows into the prototypes (they are detached, as in the code).
    """
    if q.dim() != 2 or prototypes.dim() != 2 or q.shape[1] != prototypes.shape[1]:
        raise ValueError(f"pico_prototype_scores: q {tuple(q.shape)} and prototypes "
                         f"{tuple(prototypes.shape)} must be (B, D) and (C, D)")
    logits = q @ prototypes.detach().to(q.dtype).t()
    return torch.softmax(logits / float(temperature), dim=1)


def pico_update_prototypes(prototypes: Tensor, q: Tensor, pseudo_labels: Tensor,
                           m: float = 0.99, mask: Optional[Tensor] = None) -> Tensor:
    """Moving-average prototype update ``o_c <- normalize(m o_c + (1 - m) q_i)`` per sample.

    hbzju/PiCO model.py ``PiCO.forward``: for every (gathered) query in order,
    ``prototypes[label] = m * prototypes[label] + (1 - m) * feat``, then all rows are
    L2-normalised; ``proto_m`` = 0.99 (train.py). ``pseudo_labels`` are those of
    :func:`pico_pseudo_labels` (PiCO), of :func:`pico_plus_pseudo_labels` with ``mask`` =
    reliable samples (PiCO+, which updates only with reliable samples), or of
    :func:`alim_pseudo_labels` (ALIM).

    This is exactly ``coreg_dist.losses.update_prototypes`` (which evaluates the same
    sequential loop in closed form), so it is reused: the only difference - the authors
    normalise every row, ``update_prototypes`` only the touched ones - is void because
    prototype rows are always unit (or zero, at the start), and normalising those is the
    identity. Returns a new (C, D) tensor; the input is not modified.
    """
    if q.dim() != 2 or prototypes.dim() != 2 or q.shape[1] != prototypes.shape[1]:
        raise ValueError(f"pico_update_prototypes: q {tuple(q.shape)} and prototypes "
                         f"{tuple(prototypes.shape)} must be (B, D) and (C, D)")
    _check_rows("pico_update_prototypes", q.shape[0], pseudo_labels=pseudo_labels)
    return update_prototypes(prototypes, q, pseudo_labels, m=m, mask=mask)


def pico_target_momentum(epoch: float, epochs: int, start: float = 0.95,
                         end: float = 0.8) -> float:
    """Target moving-average coefficient phi: ``start + epoch / epochs * (end - start)``.

    hbzju/PiCO utils/utils_loss.py ``partial_loss.set_conf_ema_m`` with
    ``conf_ema_range = '0.95,0.8'`` (train.py). Timing in the code: ``set_conf_ema_m(epoch)``
    is called *after* training epoch ``epoch``, so epoch e trains with the value for
    ``e - 1`` (and epoch 0 with the constructor's 0.99, which is unused because the update
    only starts at ``prot_start`` >= 1). The caller passes ``epoch - 1`` to reproduce that.
    """
    if epochs <= 0:
        raise ValueError(f"pico_target_momentum: epochs must be positive, got {epochs}")
    return float(start + float(epoch) / float(epochs) * (end - start))


def pico_update_targets(conf: Tensor, score_prot: Tensor, Y: Tensor, momentum: float) -> Tensor:
    """PiCO prototype-based label disambiguation (returns the new target rows).

    ``z_i = onehot(argmax_j score_prot_ij * Y_ij)``; ``conf_i <- m conf_i + (1 - m) z_i``.
    Wang et al., ICLR 2022, Eq. (pseudo-target updating); hbzju/PiCO utils/utils_loss.py
    ``partial_loss.confidence_update`` (also PiCO+: utils_plus/utils_loss.py, identical).
    ``score_prot`` from :func:`pico_prototype_scores`; ``momentum`` from
    :func:`pico_target_momentum`. Applied from ``prot_start`` on (:func:`pico_prototype_phase`).

    Rows stay zero outside S (z_i lies in S; conf starts inside S). Empty-S rows are returned
    unchanged. Ties follow torch.argmax (first maximal class). Returns (B, C), dtype of conf.
    """
    _check_2d("pico_update_targets", conf=conf, score_prot=score_prot, Y=Y)
    _check_momentum("pico_update_targets", momentum)
    Yf = _candidates(Y, score_prot)
    z = F.one_hot((score_prot * Yf).argmax(dim=1), conf.shape[1]).to(conf.dtype)
    new = float(momentum) * conf + (1.0 - float(momentum)) * z
    return torch.where(_nonempty(Y).to(conf.device).unsqueeze(1), new, conf)


def pico_prototype_phase(epoch: int, prot_start: int = 80) -> bool:
    """Whether the prototype-based phase is on: ``epoch >= prot_start``.

    hbzju/PiCO train.py (``start_upd_prot = epoch >= args.prot_start``; default 80, the
    README commands use 1 for CIFAR and 100 for CUB-200). Before it PiCO trains on the
    uniform targets with the unsupervised MoCo loss; from it on the targets are updated
    and the contrastive loss is supervised by the pseudo-labels.
    """
    return int(epoch) >= int(prot_start)


def pico_moco_loss(q: Tensor, k: Tensor, queue_feats: Optional[Tensor], T: float = 0.07) -> Tensor:
    """Unsupervised MoCo (InfoNCE) loss of PiCO's warm-up: ``CE([q.k, q.queue] / T, 0)``.

    hbzju/PiCO utils/utils_loss.py ``SupConLoss.forward`` with ``mask=None``: one positive
    (the own key) against the queue only - unlike the supervised branch, the other
    queries/keys of the batch are not in the denominator, so this is not a case of
    ``noisy_supcon_loss``. Features are L2-normalised here (the authors' are already unit
    vectors, except the random initial queue, which they normalise along the wrong dim;
    the caller should pass only filled queue slots). Scalar.
    """
    if q.shape != k.shape or q.dim() != 2:
        raise ValueError(f"pico_moco_loss: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, D)")
    qn = F.normalize(q, dim=1)
    kn = F.normalize(k.to(q.dtype), dim=1)
    l_pos = (qn * kn).sum(dim=1, keepdim=True)
    if queue_feats is None or queue_feats.shape[0] == 0:
        l_neg = q.new_zeros((q.shape[0], 0))
    else:
        l_neg = qn @ F.normalize(queue_feats.to(device=q.device, dtype=q.dtype), dim=1).t()
    logits = torch.cat([l_pos, l_neg], dim=1) / float(T)
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def pico_contrastive_loss(q: Tensor, k: Tensor, queue_feats: Optional[Tensor],
                          pseudo_labels: Tensor, queue_labels: Optional[Tensor],
                          supervised: bool = True, T: float = 0.07,
                          anchor_idx: Optional[Tensor] = None) -> Tensor:
    """PiCO contrastive loss on the contrast set ``[q (B), k (B), queue (Q)]``.

    ``supervised=True`` (epochs >= prot_start): SupCon with positives = same pseudo-label
    (own key included, self excluded) and every other column a negative - hbzju/PiCO
    train.py ``mask = eq(pseudo[:B], pseudo.T)`` + utils/utils_loss.py ``SupConLoss`` (T =
    base_T = 0.07, so the T/base_T factor is 1). That is the plain (``noisy=False``) case
    of ``coreg_dist.losses.noisy_supcon_loss``, which is reused (all samples flagged P).
    Numerical detail: the authors add 1e-12 inside the log of the denominator; here the
    log-sum-exp is exact (differs only when the denominator is ~1e-12 after the max shift).
    ``supervised=False`` (warm-up): :func:`pico_moco_loss`.

    ``pseudo_labels`` (B,) of the queries (:func:`pico_pseudo_labels`; keys share them),
    ``queue_labels`` (Q,) stored with the queue. Pass only filled queue slots: the authors
    start from random float labels, which never match; truncated to int they could.
    Weight it with ``loss_weight`` (:func:`pico_total_loss`). ``anchor_idx`` (distributed
    runs: q, k gathered from every rank): the anchors are only these rows (this rank's); the
    unsupervised branch contrasts each anchor with its own key and the queue only. Scalar.
    """
    if not supervised:
        if anchor_idx is not None:
            q, k = q[anchor_idx], k[anchor_idx]
        return pico_moco_loss(q, k, queue_feats, T=T)
    _check_rows("pico_contrastive_loss", q.shape[0], pseudo_labels=pseudo_labels)
    is_p_q = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
    queue_is_p = None
    if queue_feats is not None and queue_labels is not None:
        _check_rows("pico_contrastive_loss", queue_feats.shape[0], queue_labels=queue_labels)
        queue_is_p = torch.ones(queue_feats.shape[0], dtype=torch.bool, device=q.device)
    return noisy_supcon_loss(q, k, queue_feats, pseudo_labels, is_p_q, queue_labels, queue_is_p,
                             T=T, noisy=False, anchor_idx=anchor_idx)


def pico_total_loss(loss_cls: Tensor, loss_cont: Tensor, loss_weight: float = 0.5) -> Tensor:
    """PiCO objective ``loss_cls + loss_weight * loss_cont`` (train.py; ``loss_weight`` 0.5).

    Also PiCO+'s warm-up objective (train_pico_plus.py, epochs < prot_start)."""
    return loss_cls + float(loss_weight) * loss_cont


# ---------------------------------------------------------------------------
# PiCO+ (Wang et al., TPAMI 2024; github.com/hbzju/PiCO, train_pico_plus.py)
# ---------------------------------------------------------------------------

def pico_plus_pseudo_labels(probs: Tensor, Y: Tensor, is_rel: Tensor) -> Tensor:
    """PiCO+ pseudo-labels: inside S for reliable samples, over all classes otherwise.

    hbzju/PiCO model.py ``PiCO_PLUS.forward``: ``batch_weight * argmax(p * Y) +
    (1 - batch_weight) * argmax(p)`` ("for noisy data, we enable a full set pseudo-label
    selection"). Used for the queue labels / contrastive mask; the prototypes are updated
    with the reliable samples only (``pico_update_prototypes(..., mask=is_rel)``).
    Returns (B,) long.
    """
    _check_2d("pico_plus_pseudo_labels", probs=probs, Y=Y)
    _check_rows("pico_plus_pseudo_labels", probs.shape[0], is_rel=is_rel)
    within = pico_pseudo_labels(probs, Y)
    anywhere = probs.argmax(dim=1)
    return torch.where((is_rel != 0).to(probs.device).reshape(-1), within, anywhere)


def pico_plus_prototype_distance(q: Tensor, prototypes: Tensor, probs: Tensor, Y: Tensor) -> Tensor:
    """Distance of each sample to the prototype of its classifier prediction inside S.

    ``d_i = -q_i . o_{c_i}`` with ``c_i = argmax_j p_ij Y_ij`` (negative cosine: ``q`` and
    the prototypes are unit vectors). hbzju/PiCO model.py ``PiCO_PLUS.forward``
    (``distance_prot``; prototypes *before* this step's update). The trainer stores d_i per
    sample every step (train_pico_plus.py ``sel_stats['dist'][index]``) and selects the
    reliable set from it at the start of the next epoch (:func:`pico_plus_select_reliable`).
    Empty S: the prediction over all classes. Returns (B,), no gradient.
    """
    _check_2d("pico_plus_prototype_distance", probs=probs, Y=Y)
    if q.dim() != 2 or prototypes.dim() != 2 or q.shape[1] != prototypes.shape[1] \
            or q.shape[0] != probs.shape[0] or prototypes.shape[0] != probs.shape[1]:
        raise ValueError(f"pico_plus_prototype_distance: q {tuple(q.shape)}, prototypes "
                         f"{tuple(prototypes.shape)}, probs {tuple(probs.shape)} must be "
                         f"(B, D), (C, D), (B, C)")
    cls = pico_pseudo_labels(probs.detach(), Y)
    protos = prototypes.detach().to(device=q.device, dtype=q.dtype)[cls]
    return -(q.detach() * protos).sum(dim=1)


def pico_plus_select_reliable(distances: Tensor, pure_ratio: float = 0.6) -> Tensor:
    """Distance-based clean-sample selection: the ``int(N * pure_ratio)`` closest samples.

    hbzju/PiCO train_pico_plus.py ``reliable_set_selection``: a *global* ranking of the
    stored distances of all N training samples (argsort ascending), no per-class quota and
    no extra "label in S" test (the prototype is always the one of a class in S, see
    :func:`pico_plus_prototype_distance`); ``pure_ratio`` = 0.6. Called at the start of
    every epoch >= prot_start; before that every sample is reliable. The TPAMI paper's
    description may differ in detail; this follows the code. Ties: stable order.
    Returns (N,) bool.
    """
    if distances.dim() != 1:
        raise ValueError(f"pico_plus_select_reliable: distances must be (N,), got {tuple(distances.shape)}")
    if not 0.0 <= float(pure_ratio) <= 1.0:
        raise ValueError(f"pico_plus_select_reliable: pure_ratio must lie in [0, 1], got {pure_ratio}")
    n = distances.shape[0]
    chosen = int(n * float(pure_ratio))
    order = torch.argsort(distances, stable=True)
    is_rel = torch.zeros(n, dtype=torch.bool, device=distances.device)
    is_rel[order[:chosen]] = True
    return is_rel


def pico_plus_reliable_threshold(distances: Tensor, pure_ratio: float = 0.6) -> float:
    """The selection of :func:`pico_plus_select_reliable` as a threshold on the distance.

    A streamed sample is reliable iff its stored distance is ``<=`` the ``int(N *
    pure_ratio)``-th smallest of all N stored distances: the same set as the authors' global
    argsort when the distances are distinct (ties at the threshold all count as reliable,
    where argsort would keep an arbitrary few). ``-inf`` when no sample is chosen. A float.
    """
    if distances.dim() != 1:
        raise ValueError(f"pico_plus_reliable_threshold: distances must be (N,), got {tuple(distances.shape)}")
    if not 0.0 <= float(pure_ratio) <= 1.0:
        raise ValueError(f"pico_plus_reliable_threshold: pure_ratio must lie in [0, 1], got {pure_ratio}")
    chosen = int(distances.shape[0] * float(pure_ratio))
    if chosen == 0:
        return float("-inf")
    return float(torch.sort(distances).values[chosen - 1])


def pico_plus_supcon_loss(features: Tensor, pos_mask: Tensor, batch_size: int,
                          weights: Optional[Tensor] = None, T: float = 0.07) -> Tensor:
    """SupCon with an explicit positive mask and optional per-anchor weights.

    hbzju/PiCO utils_plus/utils_loss.py ``SupConLoss.forward`` (mask branch): anchors are
    the first ``batch_size`` rows of ``features`` (N, D) = [q; k; queue]; the denominator is
    every column except the anchor itself (nothing is ignored - unlike the P/U rule of
    ``noisy_supcon_loss``, which is why PiCO+'s loss cannot reuse it);
    ``loss_i = -mean_{j in pos_i} log softmax_j``; result ``mean_i(w_i loss_i)`` with the
    mean over *all* anchors (``(loss * weights).mean()``), T/base_T = 1. Features are
    L2-normalised here (the authors' already are). A row without positives adds 0 (cannot
    happen in PiCO+: the own key is always positive). Scalar.
    """
    B = int(batch_size)
    if features.dim() != 2 or pos_mask.shape != (B, features.shape[0]):
        raise ValueError(f"pico_plus_supcon_loss: features {tuple(features.shape)} and pos_mask "
                         f"{tuple(pos_mask.shape)} must be (N, D) and (batch_size={B}, N)")
    feats = F.normalize(features, dim=1)
    logits = feats[:B] @ feats.t() / float(T)
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = torch.ones_like(logits, dtype=torch.bool)
    not_self[torch.arange(B, device=logits.device), torch.arange(B, device=logits.device)] = False
    log_prob = logits - torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1,
                                        keepdim=True)
    pos = (pos_mask != 0).to(logits.device) & not_self
    posf = pos.to(logits.dtype)
    per_anchor = -(posf * log_prob).sum(dim=1) / posf.sum(dim=1).clamp_min(1.0)
    if weights is not None:
        _check_rows("pico_plus_supcon_loss", B, weights=weights)
        per_anchor = per_anchor * weights.detach().to(per_anchor.dtype).reshape(-1)
    return per_anchor.mean()


def pico_plus_contrastive_masks(features: Tensor, labels_all: Tensor, is_rel_all: Tensor,
                                batch_size: int, use_knn: bool,
                                chosen_neighbors: int = 16) -> Tuple[Tensor, Tensor]:
    """PiCO+ positive masks over the contrast set ``[q (B), k (B), queue (Q)]``.

    hbzju/PiCO train_pico_plus.py ``train`` (epochs >= prot_start):

    * ``mask_all``: same pseudo-label (PiCO's mask, used by the low-weight 'relaxed' term);
    * ``mask``: ``mask_all`` kept only where the anchor row *and* the column are reliable;
      if ``use_knn`` (epoch >= knn_start), the rows of unreliable anchors are replaced by
      their ``chosen_neighbors`` nearest columns by cosine (top-k of ``q_i . F_j``, the
      anchor itself included, as in the code); finally the own key (column B + i) and the
      self column are set positive (the self column is excluded by the loss anyway).

    ``labels_all`` / ``is_rel_all`` (N,) follow the contrast-set layout (keys repeat the
    queries' values; the queue keeps the values stored at enqueue time). Returns
    ``(mask_all, mask)``, float (B, N).
    """
    B = int(batch_size)
    N = features.shape[0]
    if features.dim() != 2 or labels_all.shape[0] != N or is_rel_all.shape[0] != N or N < 2 * B:
        raise ValueError(f"pico_plus_contrastive_masks: features {tuple(features.shape)}, "
                         f"labels_all {tuple(labels_all.shape)}, is_rel_all "
                         f"{tuple(is_rel_all.shape)} must be (N, D), (N,), (N,) with N >= 2B")
    dev = features.device
    labels = labels_all.to(dev).reshape(-1)
    rel = (is_rel_all != 0).to(dev).reshape(-1)
    mask_all = (labels[:B].view(-1, 1) == labels.view(1, -1)).to(features.dtype)
    mask = mask_all * rel[:B].view(-1, 1).to(features.dtype) * rel.view(1, -1).to(features.dtype)
    if use_knn:
        feats = F.normalize(features.detach(), dim=1)
        k = min(int(chosen_neighbors), N)
        knn_idx = torch.topk(feats[:B] @ feats.t(), k=k, dim=1, largest=True).indices
        mask_knn = torch.zeros_like(mask).scatter(1, knn_idx, 1.0)
        mask = torch.where(rel[:B].view(-1, 1), mask, mask_knn)
    eye = torch.eye(B, dtype=mask.dtype, device=dev)
    mask[:, B:2 * B] = torch.clamp(mask[:, B:2 * B] + eye, max=1.0)
    mask[:, :B] = torch.clamp(mask[:, :B] + eye, max=1.0)
    return mask_all, mask


def pico_plus_contrastive_loss(q: Tensor, k: Tensor, queue_feats: Optional[Tensor],
                               pseudo_labels: Tensor, queue_labels: Optional[Tensor],
                               is_rel: Tensor, queue_rel: Optional[Tensor], epoch: int,
                               knn_start: int = 100, chosen_neighbors: int = 16,
                               loss_weight: float = 0.5, ur_weight: float = 0.1,
                               T: float = 0.07) -> Tensor:
    """PiCO+ contrastive loss (epochs >= prot_start; before that use :func:`pico_contrastive_loss`
    with ``supervised=False`` and :func:`pico_total_loss`).

    hbzju/PiCO train_pico_plus.py ``train``:
    ``loss_cont = L(mask, w) + ur_weight * L(mask_all)`` with the masks of
    :func:`pico_plus_contrastive_masks` and :func:`pico_plus_supcon_loss`; from
    ``knn_start`` on, ``w_i = loss_weight`` for reliable anchors and ``ur_weight`` for the
    kNN-supervised unreliable ones; before ``knn_start`` the first term is unweighted (so
    ``loss_weight`` does not scale it there - as in the code). Defaults: knn_start 100,
    chosen_neighbors 16 (README: 5 for CIFAR-100), loss_weight 0.5, ur_weight 0.1, T 0.07.
    The result enters the total loss with weight 1. Scalar.
    """
    B = q.shape[0]
    _check_rows("pico_plus_contrastive_loss", B, k=k, pseudo_labels=pseudo_labels, is_rel=is_rel)
    dev = q.device
    if queue_feats is None or queue_feats.shape[0] == 0:
        queue_feats = q.new_zeros((0, q.shape[1]))
        queue_labels = pseudo_labels.new_zeros((0,))
        queue_rel = is_rel.new_zeros((0,))
    elif queue_labels is None or queue_rel is None:
        raise ValueError("pico_plus_contrastive_loss: a queue needs queue_labels and queue_rel")
    else:
        _check_rows("pico_plus_contrastive_loss", queue_feats.shape[0], queue_labels=queue_labels,
                    queue_rel=queue_rel)
    features = torch.cat([q, k.to(q.dtype), queue_feats.to(device=dev, dtype=q.dtype)], dim=0)
    labels_all = torch.cat([pseudo_labels.to(dev).reshape(-1)] * 2 + [queue_labels.to(dev).reshape(-1)])
    rel_q = (is_rel != 0).to(dev).reshape(-1)
    rel_all = torch.cat([rel_q, rel_q, (queue_rel != 0).to(dev).reshape(-1)])
    use_knn = int(epoch) >= int(knn_start)
    mask_all, mask = pico_plus_contrastive_masks(features, labels_all, rel_all, B, use_knn,
                                                 chosen_neighbors)
    loss_all = pico_plus_supcon_loss(features, mask_all, B, T=T)
    weights = None
    if use_knn:
        relf = rel_q.to(q.dtype)
        weights = float(loss_weight) * relf + float(ur_weight) * (1.0 - relf)
    loss_rel_knn = pico_plus_supcon_loss(features, mask, B, weights=weights, T=T)
    return loss_rel_knn + float(ur_weight) * loss_all


def pico_plus_guess_targets(logits_prot: Tensor, temperature_guess: float = 0.07) -> Tensor:
    """Guessed targets of unreliable samples: prototype scores sharpened with T = 0.07.

    hbzju/PiCO train_pico_plus.py: ``score_prot ** (1 / T)`` renormalised, i.e.
    ``coreg_dist.losses.sharpen(softmax(logits_prot), T)``. Because ``score_prot`` is a
    softmax this equals ``softmax(logits_prot / T)``, computed that way so that 1/T = 14.3
    powers cannot underflow to 0/0 with many classes. ``logits_prot = q @ prototypes.T``
    (no temperature, as in :func:`pico_prototype_scores`). Returns (B, C), no gradient.
    """
    if logits_prot.dim() != 2:
        raise ValueError(f"pico_plus_guess_targets: logits_prot must be (B, C), got {tuple(logits_prot.shape)}")
    return torch.softmax(logits_prot.detach() / float(temperature_guess), dim=1)


def pico_plus_mixup_targets(conf: Tensor, guess_targets: Tensor, is_rel: Tensor) -> Tensor:
    """Targets fed to PiCO+'s MixUp: ``conf`` for reliable rows, the guess for the others.

    hbzju/PiCO train_pico_plus.py (``pseudo_label[~is_rel] = targets_guess[~is_rel]``,
    read after this step's target update). Mix them with the weak views through
    ``coreg_dist.losses.mixup(x_w, targets, alpha=4.0)`` (same rule: ``l ~ Beta(4, 4)``,
    ``l = max(l, 1 - l)``, one random permutation of the batch). Returns a new (B, C).
    """
    _check_2d("pico_plus_mixup_targets", conf=conf, guess_targets=guess_targets)
    _check_rows("pico_plus_mixup_targets", conf.shape[0], is_rel=is_rel)
    rel = (is_rel != 0).to(conf.device).reshape(-1, 1)
    return torch.where(rel, conf, guess_targets.to(conf.dtype))


def pico_plus_classification_loss(logits: Tensor, conf: Tensor, guess_targets: Tensor,
                                  is_rel: Tensor, logits_mix: Tensor, mixed_targets: Tensor,
                                  cls_weight: float = 2.0, ur_weight: float = 0.1) -> Tensor:
    """PiCO+ classification objective (epochs >= prot_start).

    hbzju/PiCO train_pico_plus.py: ``loss_mix + cls_weight * CE(logits, conf)[reliable] +
    ur_weight * CE(logits, guess)[unreliable]``, each CE a soft cross-entropy averaged over
    its rows (utils_plus/utils_loss.py ``ce_loss``/``partial_loss``), ``loss_mix`` the soft
    CE of the mixed batch against :func:`pico_plus_mixup_targets` mixed by
    ``losses.mixup``. Defaults cls_weight 2, ur_weight 0.1. An empty reliable/unreliable
    part adds 0 (the code would give NaN). Add :func:`pico_plus_contrastive_loss` with
    weight 1 for the total. Scalar.
    """
    _check_2d("pico_plus_classification_loss", logits=logits, conf=conf, guess_targets=guess_targets)
    _check_2d("pico_plus_classification_loss", logits_mix=logits_mix, mixed_targets=mixed_targets)
    _check_rows("pico_plus_classification_loss", logits.shape[0], is_rel=is_rel)
    rel = (is_rel != 0).reshape(-1)
    loss_rel = _mean_or_zero(_soft_ce_rows(logits, conf), rel)
    loss_ur = _mean_or_zero(_soft_ce_rows(logits, guess_targets), ~rel)
    loss_mix = _soft_ce_rows(logits_mix, mixed_targets).mean()
    return loss_mix + float(cls_weight) * loss_rel + float(ur_weight) * loss_ur


# ---------------------------------------------------------------------------
# ALIM (Xu et al., NeurIPS 2023; github.com/zeroQiaoba/ALIM)
# ---------------------------------------------------------------------------

def alim_targets(pred: Tensor, Y: Tensor, lam: float, mode: str = "onehot") -> Tensor:
    """ALIM target of one step from the prototype scores ``pred`` (B, C).

    zeroQiaoba/ALIM utils/utils_loss.py ``partial_loss.confidence_update``:

    * ``mode="onehot"`` (``proto_case='Case1'``, the argparse default; paper: ALIM-Onehot):
      ``onehot(argmax_j pred_ij (Y_ij + lam (1 - Y_ij)))`` - i.e. the best class outside S
      wins iff ``lam * max_{j not in S} pred_ij > max_{j in S} pred_ij``;
    * ``mode="scale"`` (``'Case3'``, used for CIFAR-100 in example.sh; paper: ALIM-Scale):
      ``pred (Y + lam (1 - Y))`` renormalised = ``coreg_dist.losses.weigh_outside``
      (reused; lam = 0 gives the masked prediction, the code's 'Case2', lam = 1 gives pred).

    ``pred`` is ALIM's ``cluster_out`` = ``pico_prototype_scores(q, P, temperature=0.07)``
    (``proto_type='cluster'``). ``lam`` from :func:`alim_lambda` (0 until ``piror_start``).
    Empty S: no constraint, i.e. pred renormalised / its argmax. Ties: first class.
    Returns (B, C) rows summing to 1.
    """
    _check_2d("alim_targets", pred=pred, Y=Y)
    if mode not in ("onehot", "scale"):
        raise ValueError(f"alim_targets: mode must be 'onehot' or 'scale', got {mode!r}")
    if float(lam) < 0:
        raise ValueError(f"alim_targets: lam must be >= 0, got {lam}")
    weighted = weigh_outside(pred, _constraint(Y, pred), float(lam))
    if mode == "scale":
        return weighted
    return F.one_hot(weighted.argmax(dim=1), pred.shape[1]).to(pred.dtype)


def alim_update_targets(conf: Tensor, pred: Tensor, Y: Tensor, lam: float, momentum: float,
                        mode: str = "onehot") -> Tensor:
    """ALIM target update ``conf_i <- m conf_i + (1 - m) alim_targets(pred, Y, lam)_i``.

    zeroQiaoba/ALIM utils/utils_loss.py ``confidence_update`` (same moving average and
    ``conf_ema_range`` 0.95 -> 0.8 schedule as PiCO: :func:`pico_target_momentum`), applied
    from ``proto_start`` = 1 (every epoch; ALIM has no MoCo warm-up). Empty-S rows are
    returned unchanged (as in :func:`pico_update_targets`). Rows may gain mass outside S
    when lam > 0 (the point of ALIM). Returns (B, C), dtype of conf.
    """
    _check_2d("alim_update_targets", conf=conf, pred=pred, Y=Y)
    _check_momentum("alim_update_targets", momentum)
    target = alim_targets(pred, Y, lam, mode).to(conf.dtype)
    new = float(momentum) * conf + (1.0 - float(momentum)) * target
    return torch.where(_nonempty(Y).to(conf.device).unsqueeze(1), new, conf)


def alim_pseudo_labels(probs: Tensor, Y: Tensor, lam: float) -> Tensor:
    """ALIM pseudo-labels for the prototypes and the contrastive mask.

    zeroQiaoba/ALIM pll_model.py ``PiCO.forward``: ``argmax(classfy_out * (Y + lam (1 - Y)))``
    on the classifier's softmax (lam = 0 gives :func:`pico_pseudo_labels`). Empty S: argmax
    over all classes. Returns (B,) long.
    """
    _check_2d("alim_pseudo_labels", probs=probs, Y=Y)
    Yc = _constraint(Y, probs)
    return (probs * (Yc + float(lam) * (1.0 - Yc))).argmax(dim=1)


def alim_margin(pred: Tensor, Y: Tensor, eps: float = 1e-9) -> Tensor:
    """Per-sample ratio ``max_{j in S} pred_ij / (eps + max_{j not in S} pred_ij)``.

    zeroQiaoba/ALIM train_merge.py ``train`` (``margin``, on ``cluster_out``, eps 1e-9). A
    full S gives a huge value (nothing outside), an empty S gives 0; never NaN.
    The trainer stores it per sample over the epoch. Returns (B,).
    """
    _check_2d("alim_margin", pred=pred, Y=Y)
    Yf = _candidates(Y, pred)
    inside = (pred * Yf).max(dim=1).values
    outside = (pred * (1.0 - Yf)).max(dim=1).values
    return inside / (eps + outside)


def alim_lambda_from_margins(margins: Tensor, noise_rate: float, max1: bool = True) -> float:
    """Adaptive lambda: the ``int(N * noise_rate)``-th smallest margin of the epoch.

    zeroQiaoba/ALIM train_merge.py (``piror_auto='case1'``, the default):
    ``lam = sorted(margin)[int(len(margin) * noise_rate)]``; ``noise_rate <= 0`` gives 0;
    ``--max1`` clips at 1 (argparse default False, but every command in the README and
    example.sh passes it, so ``max1=True`` here). Computed at the end of every epoch
    >= ``piror_start`` (argparse 0; README/example.sh 80, 140 for CIFAR-10 q=0.5) and used
    during the next epoch; lam = 0 before. ``noise_rate`` is the (estimated) noise level.
    An index past the end (noise_rate >= 1) takes the largest margin.
    """
    m = margins.detach().reshape(-1)
    if m.numel() == 0:
        raise ValueError("alim_lambda_from_margins: no margins given")
    if float(noise_rate) <= 0:
        return 0.0
    idx = min(int(m.numel() * float(noise_rate)), m.numel() - 1)
    lam = float(torch.sort(m).values[idx])
    return min(lam, 1.0) if max1 else lam


def alim_lambda(pred: Tensor, Y: Tensor, noise_rate: float, max1: bool = True) -> float:
    """Adaptive lambda from the prototype scores ``pred`` (N, C) of the whole epoch.

    ``alim_lambda_from_margins(alim_margin(pred, Y), noise_rate, max1)`` - see both."""
    return alim_lambda_from_margins(alim_margin(pred, Y), noise_rate, max1)


def alim_mixup_loss(logits_mix: Tensor, conf_a: Tensor, conf_b: Tensor, lam_mix: float) -> Tensor:
    """ALIM MixUp regulariser: soft CE of the mixed input against the mixed targets.

    zeroQiaoba/ALIM train_merge.py (``loss_weight_mixup`` 1, ``alpha`` 4): inputs
    ``lam x_a + (1 - lam) x_b`` where ``b`` is a *second, independently shuffled batch* (the
    loader is zipped with itself), ``lam ~ Beta(4, 4)``, ``lam = max(lam, 1 - lam)``;
    loss ``-mean_i sum_j (lam t_a + (1 - lam) t_b)_ij log softmax(logits_mix)_ij`` with
    ``t = conf`` (after this step's update). The code uses ``log(softmax)``; log_softmax
    here (same value, no -inf). Scalar.
    """
    _check_2d("alim_mixup_loss", logits_mix=logits_mix, conf_a=conf_a, conf_b=conf_b)
    lam_mix = float(lam_mix)
    mixed = lam_mix * conf_a + (1.0 - lam_mix) * conf_b
    return pico_classification_loss(logits_mix, mixed)


def alim_total_loss(loss_cls: Tensor, loss_cont: Tensor, loss_mixup: Tensor,
                    loss_weight: float = 0.5, loss_weight_mixup: float = 1.0) -> Tensor:
    """ALIM objective ``loss_cls + loss_weight * loss_cont + loss_weight_mixup * loss_mixup``.

    zeroQiaoba/ALIM train_merge.py (loss_cls = :func:`pico_classification_loss` on the
    targets, loss_cont = :func:`pico_contrastive_loss` with the ALIM pseudo-labels -
    supervised from the first epoch)."""
    return loss_cls + float(loss_weight) * loss_cont + float(loss_weight_mixup) * loss_mixup


# ---------------------------------------------------------------------------
# DivideMix (Li, Socher & Hoi, ICLR 2020; github.com/LiJunnan1992/DivideMix)
# ---------------------------------------------------------------------------

def dividemix_semi_loss(logits_x: Tensor, targets_x: Tensor, logits_u: Tensor, targets_u: Tensor,
                        lambda_u: float, epoch: float, warm_up: float,
                        rampup_len: float = 16) -> Tuple[Tensor, Tensor, float]:
    """DivideMix SemiLoss: ``(Lx, Lu, lamb)``; the objective is ``Lx + lamb * Lu + penalty``.

    LiJunnan1992/DivideMix Train_cifar.py ``SemiLoss`` and ``linear_rampup``:
    ``Lx = -mean_i sum_j t_ij log softmax(logits_x)_ij``,
    ``Lu = mean_{i,j} (softmax(logits_u)_ij - t_ij)^2``,
    ``lamb = lambda_u * clip((epoch - warm_up) / rampup_len, 0, 1)``, with the fractional
    ``epoch = epoch + batch_idx / num_iter``. Authors' defaults: ``lambda_u`` 25 (CIFAR-10
    argparse; README: 0/25/150 by noise level), ``warm_up`` 10 (CIFAR-10) / 30 (CIFAR-100),
    ``rampup_len`` 16. Lx and Lu are exactly ``coreg_dist.losses.label_space_loss`` (reused;
    an empty part gives 0 instead of NaN) and the ramp is ``losses.linear_rampup``.
    """
    _check_2d("dividemix_semi_loss", logits_x=logits_x, targets_x=targets_x)
    _check_2d("dividemix_semi_loss", logits_u=logits_u, targets_u=targets_u)
    ramp = linear_rampup(float(epoch) - float(warm_up), rampup_len)
    _, lx, lu = label_space_loss(logits_x, targets_x, logits_u, targets_u, lambda_u, ramp)
    return lx, lu, float(lambda_u) * ramp


def dividemix_prior_penalty(logits: Tensor, prior: Optional[Tensor] = None) -> Tensor:
    """DivideMix regulariser ``sum_j prior_j log(prior_j / mean_i softmax(logits_i)_j)``.

    LiJunnan1992/DivideMix Train_cifar.py ``train``: uniform ``prior = 1 / C``, computed on
    the logits of the whole mixed batch (labeled and unlabeled rows). It is KL(prior || mean
    prediction) and pushes the mean prediction towards the prior. No clamp (as in the code;
    a mean probability of exactly 0 would give inf). Empty batch: ValueError. Scalar.
    """
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(f"dividemix_prior_penalty: logits must be a non-empty (B, C), got {tuple(logits.shape)}")
    C = logits.shape[1]
    if prior is None:
        prior = torch.full((C,), 1.0 / C, dtype=logits.dtype, device=logits.device)
    else:
        prior = torch.as_tensor(prior, dtype=logits.dtype, device=logits.device).reshape(-1)
        if prior.shape[0] != C:
            raise ValueError(f"dividemix_prior_penalty: prior has {prior.shape[0]} entries, expected {C}")
    pred_mean = torch.softmax(logits, dim=1).mean(dim=0)
    return (prior * torch.log(prior / pred_mean)).sum()
