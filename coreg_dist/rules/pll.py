"""Partial-label baselines: PRODEN, RC/CC, LWS and CR-DPLL (PLCR) as pure tensor rules.

Conventions (as in :mod:`coreg_dist.losses`):

* ``logits``: (B, C) raw scores; ``Y``: (B, C) candidate mask (bool/int/float, nonzero =
  candidate); ``conf``: (B, C) per-sample confidence rows (the stored state).
* Losses return scalars averaged over the B rows. Update rules return NEW (B, C) rows,
  computed without gradient; inputs are never modified.
* Empty candidate row (no candidate at all): read as "no information", i.e. S = all C
  classes. Inits and updates then give rows uniform over all C classes (as
  :func:`coreg_dist.losses.masked_prediction` does), and the losses treat every class as a
  candidate. Nothing becomes NaN or inf.

Sources read (authors' code; the docstrings say which file):
  * PRODEN: github.com/Lvcrezia77/PRODEN (utils/utils_loss.py, main.py, utils/utils_algo.py)
  * RC/CC: the authors' "RCCC" code (readme: "implementation for Provably Consistent
    Partial-Label Learning (NeurIPS 2020)"), read as vendored in zonszer/DualCoOp
    (RCCC/utils/utils_loss.py, RCCC/utils/utils_algo.py, RCCC/main.py); the same
    rc_loss/cc_loss/confidence_update are in hongwei-wen/LW-loss-for-partial-label.
  * LWS: github.com/hongwei-wen/LW-loss-for-partial-label (utils/utils_loss.py,
    utils/utils_algo.py, main-cv_sgd_best.py, README.md, main.py)
  * CR-DPLL: github.com/wu-dd/PLCR (main.py, cifar.py)
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from coreg_dist.losses import Views, _as_float, _stack_views, linear_rampup, masked_prediction

Tensor = torch.Tensor

__all__ = [
    "proden_init",
    "proden_loss",
    "proden_update",
    "cc_loss",
    "lws_init",
    "lws_loss",
    "lws_update",
    "cr_dpll_loss",
    "cr_dpll_update",
    "cr_dpll_lambda",
]


# ---------------------------------------------------------------------------
# Shared checks
# ---------------------------------------------------------------------------

def _check_2d(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be (B, C), got shape {tuple(t.shape)}")


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    _check_2d(name_a, a)
    if a.shape != b.shape:
        raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, "
                         f"got {tuple(b.shape)}")


def _candidates_or_all(Y: Tensor, like: Tensor) -> Tensor:
    """0/1 float candidate mask where an empty row is replaced by all ones (S = all classes)."""
    Yf = _as_float(Y, like)
    empty = Yf.sum(dim=1, keepdim=True) == 0
    return torch.where(empty, torch.ones_like(Yf), Yf)


def _views_checked(logits_views: Views, Y: Tensor) -> Tensor:
    """(V, B, C) stack of the views; each view must have Y's shape."""
    views = _stack_views(logits_views)
    _check_2d("Y", Y)
    if views.dim() != 3 or views.shape[1:] != Y.shape:
        raise ValueError(f"each view's logits must be (B, C) = {tuple(Y.shape)}, "
                         f"got views of shape {tuple(views.shape)}")
    return views


# ---------------------------------------------------------------------------
# PRODEN (and RC, which has the same rules)
# ---------------------------------------------------------------------------

def proden_init(Y: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Initial PRODEN confidence: uniform over the candidate set, ``Y_ij / |S_i|``.

    Lv, Xu, Feng, Niu, Geng & Sugiyama, "Progressive Identification of True Labels for
    Partial-Label Learning", ICML 2020; code github.com/Lvcrezia77/PRODEN,
    utils/utils_algo.py ``partialize`` (``new_y[i] = row / torch.sum(row)``). RC (Feng et
    al., NeurIPS 2020, RCCC/main.py ``confidence = train_givenY / tempY``) and CR-DPLL
    (wu-dd/PLCR main.py ``confidence / confidence.sum(axis=1)``) start from the same rows.

    An empty row becomes uniform over all C classes. Returns (B, C) in ``dtype``.
    """
    _check_2d("Y", Y)
    Yf = (Y != 0).to(dtype)
    return masked_prediction(torch.ones_like(Yf), Yf)


def proden_loss(logits: Tensor, conf: Tensor) -> Tensor:
    """PRODEN / RC classifier loss: ``-(1/B) sum_i sum_j conf_ij log softmax(logits_i)_j``.

    Lv et al., ICML 2020; code github.com/Lvcrezia77/PRODEN, utils/utils_loss.py
    ``partial_loss`` (``-sum(target * log(softmax)) / B``). Feng et al., "Provably
    Consistent Partial-Label Learning", NeurIPS 2020, RC loss (RCCC/utils/utils_loss.py
    ``rc_loss``: ``-(log_softmax * confidence).sum(1).mean()``) is the same function, so
    there is no separate ``rc_loss`` here.

    ``log_softmax`` replaces the authors' ``log(softmax)``: same value, but a saturated
    class gives a finite log instead of ``0 * -inf = NaN``. ``conf`` is a target: it is
    detached, so no gradient reaches it. Scalar.
    """
    _check_same_shape("logits", logits, "conf", conf)
    target = conf.detach().to(logits.dtype)
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


@torch.no_grad()
def proden_update(logits: Tensor, Y: Tensor) -> Tensor:
    """New PRODEN / RC confidence rows: ``softmax(logits)`` restricted to S and renormalised.

    Lv et al., ICML 2020; code github.com/Lvcrezia77/PRODEN, utils/utils_loss.py
    ``partial_loss`` (``revisedY = 1[target > 0] * softmax; revisedY /= revisedY.sum(1)``),
    stored detached in main.py. RC (Feng et al., NeurIPS 2020, RCCC/utils/utils_algo.py
    ``confidence_update``: ``softmax * batchY``, row-normalised) is the same formula; the two
    methods differ only in WHICH logits the caller passes:
      * PRODEN: the logits of the training forward of this step (before the optimizer step);
      * RC: a fresh forward of the same batch after the optimizer step, without grad.

    Deviation: PRODEN masks with ``target > 0`` (the current confidence), RC with the given
    candidates; we mask with ``Y``. They differ only once a confidence has underflowed to
    exactly 0, which PRODEN would then drop for good.

    Via :func:`coreg_dist.losses.masked_prediction`: a row whose candidate mass is 0 becomes
    uniform over S (the authors divide 0/0 = NaN); an empty row becomes uniform over all C.
    Returns (B, C), zero outside S, rows summing to 1; never carries gradient.
    """
    _check_same_shape("logits", logits, "Y", Y)
    return masked_prediction(torch.softmax(logits.detach(), dim=1), Y)


# ---------------------------------------------------------------------------
# CC
# ---------------------------------------------------------------------------

def cc_loss(logits: Tensor, Y: Tensor) -> Tensor:
    """CC (classifier-consistent) loss: ``mean_i -log sum_{j in S_i} softmax(logits_i)_j``.

    Feng, Lv, Han, Xu, Niu, Geng, An & Sugiyama, "Provably Consistent Partial-Label
    Learning", NeurIPS 2020; authors' code RCCC/utils/utils_loss.py ``cc_loss``
    (``-log((softmax * partialY).sum(1)).mean()``), also in
    hongwei-wen/LW-loss-for-partial-label utils/utils_loss.py.

    Not an alias of :func:`coreg_dist.losses.partial_ce`: that one adds ``eps = 1e-5`` inside
    the log and drops rows whose S covers all C classes from the mean (Co-Reg's code), while
    CC keeps every row in the mean (a full row contributes ``-log 1 = 0``) and has no eps.
    On rows that are not full they agree up to the eps (tested).

    Computed as ``logsumexp(logits) - logsumexp(logits over S)``: same value as the
    authors' formula, but finite when every candidate's probability underflows. An empty
    row counts as S = all classes and contributes 0. Scalar.
    """
    _check_same_shape("logits", logits, "Y", Y)
    S = _candidates_or_all(Y, logits) > 0
    log_mass = (torch.logsumexp(logits.masked_fill(~S, float("-inf")), dim=1)
                - torch.logsumexp(logits, dim=1))
    return -log_mass.mean()


# ---------------------------------------------------------------------------
# LWS
# ---------------------------------------------------------------------------

def lws_init(Y: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Initial LWS weights: ``1 / C`` for EVERY class, candidates or not.

    Wen, Cui, Hang, Liu, Wang & Lin, "Leveraged Weighted Loss for Partial Label Learning",
    ICML 2021; code github.com/hongwei-wen/LW-loss-for-partial-label, main-cv_sgd_best.py
    (``confidence = torch.ones(n, c) / c`` for ``-lo lws``). Unlike PRODEN the rows are
    not zero outside S: the non-candidate term of :func:`lws_loss` is weighted by them.
    ``Y`` only gives the shape and device. Returns (B, C) in ``dtype``.
    """
    _check_2d("Y", Y)
    C = Y.shape[1]
    return torch.full(Y.shape, 1.0 / C, dtype=dtype, device=Y.device)


def lws_loss(logits: Tensor, Y: Tensor, conf: Tensor, lw_weight: float = 1.0,
             lw_weight0: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """LWS loss (leveraged weighted loss with the sigmoid binary loss).

    Wen et al., ICML 2021; code github.com/hongwei-wen/LW-loss-for-partial-label,
    utils/utils_loss.py ``lws_loss``:

      ``l1 = (1/B) sum_i sum_{j in S_i}  conf_ij * sigmoid(-z_ij)``   (candidates pushed up)
      ``l2 = (1/B) sum_i sum_{j not in S_i} conf_ij * sigmoid(z_ij)``  (non-candidates down)
      ``total = lw_weight0 * l1 + lw_weight * l2``

    on the raw logits ``z`` (no softmax). The authors write the sigmoids piecewise by the
    sign of z for stability (with 0.5 at z = 0); ``torch.sigmoid`` is the same function.

    Defaults: ``lw_weight0 = 1`` (their ``-lw0`` default) and ``lw_weight = beta = 1``: the
    value of all their README runs on CIFAR-10 and of most MNIST ones (their search grid in
    main.py is {1, 2}); the argparse default ``-lw 0`` would switch the non-candidate term
    off, which none of their reported runs does.

    ``conf`` is detached. An empty row counts as S = all classes (only l1). Returns
    ``(total, lw_weight0 * l1, lw_weight * l2)`` like the authors' function.
    """
    _check_same_shape("logits", logits, "Y", Y)
    _check_same_shape("logits", logits, "conf", conf)
    S = _candidates_or_all(Y, logits)
    w = conf.detach().to(logits.dtype)
    B = logits.shape[0]
    l1 = (w * S * torch.sigmoid(-logits)).sum() / B
    l2 = (w * (1.0 - S) * torch.sigmoid(logits)).sum() / B
    term1, term2 = float(lw_weight0) * l1, float(lw_weight) * l2
    return term1 + term2, term1, term2


@torch.no_grad()
def lws_update(logits: Tensor, Y: Tensor, eps: float = 1e-8) -> Tensor:
    """New LWS weights: softmax renormalised SEPARATELY over S and over its complement.

    Wen et al., ICML 2021; code github.com/hongwei-wen/LW-loss-for-partial-label,
    utils/utils_algo.py ``confidence_update_lw`` (called after the optimizer step with a
    fresh no-grad forward of the batch, main-cv_sgd_best.py):

      ``p = softmax(z)``;
      ``w_ij = p_ij / (sum_{k in S_i} p_ik + C eps)``        for j in S_i,
      ``w_ij = p_ij / (sum_{k not in S_i} p_ik + C eps)``    for j not in S_i.

    The ``C eps`` is the authors' ``(new_weight + 1e-8).sum(dim=1)``: eps is added to each of
    the C entries before summing. So each part sums to (almost) 1 and a row sums to
    (almost) 2; a full or empty row (S = all classes) has no non-candidate part (zeros).
    Returns (B, C) without gradient.
    """
    _check_same_shape("logits", logits, "Y", Y)
    p = torch.softmax(logits.detach(), dim=1)
    S = _candidates_or_all(Y, p)
    C = p.shape[1]

    def within(mask: Tensor) -> Tensor:
        part = p * mask
        return part / (part.sum(dim=1, keepdim=True) + C * eps)

    return within(S) + within(1.0 - S)


# ---------------------------------------------------------------------------
# CR-DPLL (PLCR)
# ---------------------------------------------------------------------------

def cr_dpll_loss(logits_views: Views, Y: Tensor, conf: Tensor,
                 lam: float) -> Tuple[Tensor, Tensor, Tensor]:
    """CR-DPLL objective: ``total = sup + lam * cons``.

    Wu, Wang & Zhang, "Revisiting Consistency Regularization for Deep Partial Label
    Learning", ICML 2022; code github.com/wu-dd/PLCR, main.py ``DPLL_train``.

    ``logits_views``: (V, B, C) or a list of V (B, C); view 0 is the weakly augmented
    image (their ``x_aug0``: flip + crop), the others the strong views (their ``x_aug1``,
    ``x_aug2``: flip + crop + Cutout + AutoAugment, cifar.py); V = 3 in their code.

    * ``sup = -(1/B) sum_i sum_{j not in S_i} log(1.0000001 - softmax(view0)_ij)``: the
      supervised term is a complementary-label loss on the NON-candidates of the weak view
      only and does not use ``conf`` (their ``super_loss``; the paper's abstract: "supervised
      learning on non-candidate labels"). It is not a confidence-weighted CE.
    * ``cons = sum_v KL(conf_i || softmax(view_v)_i)`` with ``KLDivLoss(reduction=
      'batchmean')``: summed over classes, divided by B, summed (not averaged) over the V
      views; entries with ``conf = 0`` contribute 0. ``conf`` is detached.
    * ``lam`` from :func:`cr_dpll_lambda`.

    An empty row counts as S = all classes: its sup term is 0. Returns scalars
    ``(total, sup, cons)``.
    """
    views = _views_checked(logits_views, Y)
    _check_same_shape("Y", Y, "conf", conf)
    S = _candidates_or_all(Y, views)
    p_weak = torch.softmax(views[0], dim=1)
    sup = -(torch.log(1.0000001 - p_weak) * (1.0 - S)).sum(dim=1).mean()
    target = conf.detach().to(views.dtype)
    cons = sum(F.kl_div(F.log_softmax(v, dim=1), target, reduction="batchmean") for v in views)
    return sup + float(lam) * cons, sup, cons


@torch.no_grad()
def cr_dpll_update(logits_views: Views, Y: Tensor) -> Tensor:
    """New CR-DPLL target rows: geometric mean of the views' softmaxes, restricted to S.

    Wu, Wang & Zhang, ICML 2022; code github.com/wu-dd/PLCR, main.py
    ``confidence_update``: ``part_y * prod_v softmax(view_v) ** (1/3)`` renormalised over
    the row, from the detached probabilities of the training forward of this step (before
    the optimizer step). The exponent is hard-coded 1/(2+1) there for their 3 views; here
    it is 1/V (identical for V = 3). The product is taken as ``exp(mean_v log_softmax)``.

    Via :func:`coreg_dist.losses.masked_prediction`: zero candidate mass gives uniform
    over S (the authors get 0/0 = NaN); an empty row is uniform over all C. Returns (B, C),
    zero outside S, rows summing to 1, without gradient.
    """
    views = _views_checked(logits_views, Y)
    geo = F.log_softmax(views.detach(), dim=2).mean(dim=0).exp()
    return masked_prediction(geo, Y)


def cr_dpll_lambda(epoch: float, lam: float = 1.0, ramp_epochs: float = 100.0) -> float:
    """Weight of the CR-DPLL consistency term: ``min(epoch / ramp_epochs * lam, lam)``.

    Wu, Wang & Zhang, ICML 2022; code github.com/wu-dd/PLCR, main.py
    (``lam = min((epoch / 100) * args.lam, args.lam)``, ``--lam`` default 1). ``epoch`` is
    0-based as in their loop, so epoch 0 gives 0; it is set once per epoch there.
    Equal to ``lam * linear_rampup(epoch, ramp_epochs)`` for ``lam >= 0``, epoch >= 0.
    """
    return float(lam) * linear_rampup(epoch, ramp_epochs)
