"""Co-Reg losses and pseudo-label formulas (pure functions on tensors).

Every function here is device-agnostic: new tensors are created on the device
(and, where it matters, with the dtype) of the inputs; nothing calls ``.cuda()``.
Nothing here keeps state or talks to other processes: every global quantity
(the dataset-wide mean prediction for distribution alignment, the global min/max
of the division loss, the P/U flags of the queue ...) is passed in by the caller.

Tags follow docs/coreg-method.md: [P] paper, [C] authors' code, [D] project decision.

Conventions
-----------
* ``logits``: (B, C) raw scores; ``probs``/``p``: (B, C) rows on the simplex.
* ``Y``: (B, C) multi-hot candidate matrix (bool, int or float; nonzero = candidate).
* "views" arguments take either a sequence of (B, C) tensors or one (V, B, C) tensor.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Views = Union[Tensor, Sequence[Tensor]]

__all__ = [
    "partial_ce",
    "negative_entropy",
    "warmup_loss",
    "distribution_align",
    "division_loss",
    "minmax_normalize",
    "sharpen",
    "masked_prediction",
    "refine_labeled",
    "co_guess_unlabeled",
    "mixup",
    "linear_rampup",
    "label_space_loss",
    "prototype_loss",
    "update_prototypes",
    "contrastive_masks",
    "noisy_supcon_loss",
]


def _as_float(Y: Tensor, like: Tensor) -> Tensor:
    """Candidate matrix as 0/1 floats with the dtype/device of ``like``."""
    return (Y != 0).to(dtype=like.dtype, device=like.device)


def _zero_with_grad(t: Tensor) -> Tensor:
    """A scalar 0 that stays attached to ``t``'s graph (so ``backward`` works)."""
    return t.sum() * 0.0


def _stack_views(views: Views) -> Tensor:
    if isinstance(views, Tensor):
        return views if views.dim() == 3 else views.unsqueeze(0)
    return torch.stack(list(views), dim=0)


def _hard_labels(labels: Tensor) -> Tensor:
    """1-D integer labels; 2-D (soft) targets are reduced by argmax."""
    if labels.dim() == 2:
        return labels.argmax(dim=1)
    return labels.reshape(-1).long()


# ---------------------------------------------------------------------------
# 2.1 Warm-up
# ---------------------------------------------------------------------------

def partial_ce(logits: Tensor, Y: Tensor, eps: float = 1e-5) -> Tensor:
    """Partial cross-entropy [P][C].

    ``L = mean_{i : |S_i| < C} -log( sum_j Y_ij softmax(logits_i)_j + eps )``

    Rows whose candidate set covers all C classes carry no information and are
    skipped [C]; if no row remains, a zero scalar attached to the graph is
    returned. Returns a scalar.
    """
    C = logits.shape[1]
    Yf = _as_float(Y, logits)
    keep = Yf.sum(dim=1) < C
    if not bool(keep.any()):
        return _zero_with_grad(logits)
    p = torch.softmax(logits, dim=1)
    mass = (Yf * p).sum(dim=1)
    return -torch.log(mass[keep] + eps).mean()


def negative_entropy(logits: Tensor) -> Tensor:
    """Negative-entropy (confidence) penalty [C]: ``mean_i sum_j p_ij log p_ij``.

    Computed with ``log_softmax`` so saturated rows give 0 instead of NaN. Scalar.
    """
    logp = torch.log_softmax(logits, dim=1)
    return (logp.exp() * logp).sum(dim=1).mean()


def warmup_loss(logits: Tensor, Y: Tensor, neg_entropy: bool = True) -> Tensor:
    """Warm-up objective [P][C]: ``partial_ce(logits, Y) + negative_entropy(logits)``.

    ``neg_entropy=False`` drops the penalty. Scalar.
    """
    loss = partial_ce(logits, Y)
    if neg_entropy:
        loss = loss + negative_entropy(logits)
    return loss


# ---------------------------------------------------------------------------
# 2.2 Co-divide
# ---------------------------------------------------------------------------

def distribution_align(probs: Tensor, prior: Optional[Tensor] = None,
                       mean: Optional[Tensor] = None, eps: float = 1e-12) -> Tensor:
    """Distribution alignment [C]: ``p_i <- normalise(p_i * prior / mean_p)``.

    ``mean``: (C,) mean prediction over *all* training samples (computed by the
    caller, possibly all-reduced across ranks). Defaults to ``probs.mean(0)``,
    i.e. the mean over the given rows only. ``prior``: (C,), default uniform 1/C.
    The denominator is clamped at ``eps``. Returns (B, C) rows summing to 1.
    """
    C = probs.shape[1]
    if mean is None:
        mean = probs.mean(dim=0)
    mean = torch.as_tensor(mean, dtype=probs.dtype, device=probs.device).reshape(1, C)
    if prior is None:
        prior = torch.full((1, C), 1.0 / C, dtype=probs.dtype, device=probs.device)
    else:
        prior = torch.as_tensor(prior, dtype=probs.dtype, device=probs.device).reshape(1, C)
    q = probs * prior / mean.clamp_min(eps)
    return q / q.sum(dim=1, keepdim=True).clamp_min(eps)


def division_loss(probs: Tensor, Y: Tensor, eps: float = 1e-12, reduce: str = "max") -> Tensor:
    """Division loss: ``l_i = -log max_{j in S_i} p_ij`` [C] (reduce="max"), or
    ``-log sum_{j in S_i} p_ij`` (reduce="sum": the partial-CE loss, low for a sample whose mass
    stays in its set however it is spread there, so an ambiguous set is not taken for a noisy
    one; equal to max on a single candidate).

    ``probs`` should already be DA-aligned when DA is on. The value is clamped
    at ``eps`` (a row with an empty candidate set gives ``-log eps``; the
    authors' code has no clamp). Returns (B,) per-sample losses.
    """
    Yf = _as_float(Y, probs)
    if reduce == "max":
        best = (probs * Yf).max(dim=1).values
    elif reduce == "sum":
        best = (probs * Yf).sum(dim=1)
    else:
        raise ValueError(f"division_loss: reduce must be max or sum, not {reduce!r}")
    return -torch.log(best.clamp_min(eps))


def minmax_normalize(x, lo, hi, eps: float = 1e-12):
    """Min-max normalisation [C]: ``(x - lo) / (hi - lo + eps)``.

    ``lo``/``hi`` are the *global* min/max (over all samples, all ranks), passed
    in by the caller. Works on tensors and numpy arrays; same shape as ``x``.
    """
    return (x - lo) / (hi - lo + eps)


# ---------------------------------------------------------------------------
# 2.3 Co-pseudo-labels
# ---------------------------------------------------------------------------

def sharpen(p: Tensor, T: float = 0.5) -> Tensor:
    """Temperature sharpening [P][C]: ``p_j^(1/T) / sum_k p_k^(1/T)`` row-wise."""
    pt = p ** (1.0 / T)
    return pt / pt.sum(dim=1, keepdim=True)


def masked_prediction(probs: Tensor, Y: Tensor) -> Tensor:
    """Candidate-restricted prediction [P][C]: ``Y_i * p_i / sum_j Y_ij p_ij``.

    Where the masked mass is 0 the row becomes uniform over S_i; if S_i is also
    empty the row becomes uniform over all C classes [D]. Returns (B, C).
    """
    Yf = _as_float(Y, probs)
    masked = Yf * probs
    mass = masked.sum(dim=1, keepdim=True)
    nY = Yf.sum(dim=1, keepdim=True)
    C = probs.shape[1]
    uniform_S = torch.where(nY > 0, Yf / nY.clamp_min(1.0), torch.full_like(Yf, 1.0 / C))
    return torch.where(mass > 0, masked / torch.where(mass > 0, mass, torch.ones_like(mass)),
                       uniform_S)


def weigh_outside(probs: Tensor, Y: Tensor, lam: float) -> Tensor:
    """``p_i * (Y_i + lam * (1 - Y_i))``, renormalised: classes outside S_i down-weighted by lam.
    lam = 1 leaves p as is; lam = 0 is `masked_prediction` (with its fallbacks)."""
    if lam <= 0:
        return masked_prediction(probs, Y)
    Yf = _as_float(Y, probs)
    q = probs * (Yf + lam * (1 - Yf))
    return q / q.sum(dim=1, keepdim=True).clamp_min(1e-12)


def refine_labeled(p_masked: Tensor, w: Tensor, probs_B_views: Views, T: float = 0.5) -> Tensor:
    """Pseudo-label of a P sample for network B [P][C].

    ``p' = w * p_masked + (1 - w) * mean_v softmax(f_B(x_v))``, then ``sharpen(p', T)``.

    ``p_masked``: (B, C) from :func:`masked_prediction` (network A, DA-aligned);
    ``w``: (B,) or (B, 1) clean posterior from A's GMM; ``probs_B_views``: the
    softmaxes (probabilities, not logits) of network B on the weak views.
    Returns (B, C).
    """
    w = torch.as_tensor(w, dtype=p_masked.dtype, device=p_masked.device).reshape(-1, 1)
    pB = _stack_views(probs_B_views).to(p_masked.dtype).mean(dim=0)
    return sharpen(w * p_masked + (1.0 - w) * pB, T)


def co_guess_unlabeled(probs_A_views: Views, probs_B_views: Views, T: float = 0.5) -> Tensor:
    """Co-guessed pseudo-label of a U sample [P][C].

    Mean of the softmaxes of both networks on the weak views (2 + 2 = 4 in
    Co-Reg), then ``sharpen(., T)``. Inputs are probabilities. Returns (B, C).
    """
    allp = torch.cat([_stack_views(probs_A_views), _stack_views(probs_B_views)], dim=0)
    return sharpen(allp.mean(dim=0), T)


# ---------------------------------------------------------------------------
# 2.4 Label-space consistency
# ---------------------------------------------------------------------------

def mixup(inputs: Tensor, targets: Tensor, alpha: float = 4.0,
          generator: Optional[torch.Generator] = None,
          rng: Optional[np.random.Generator] = None,
          lam: Optional[float] = None,
          perm: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, float, Tensor]:
    """MixUp over the whole concatenated batch [C].

    ``l ~ Beta(alpha, alpha)``, ``l = max(l, 1 - l)``; one permutation ``perm``
    of all N rows; ``x~ = l x + (1 - l) x[perm]``, ``t~ = l t + (1 - l) t[perm]``.

    Randomness [D]: torch's Beta sampler is not driven by a ``torch.Generator``,
    so ``l`` is drawn from the numpy Generator ``rng``
    (``rng.beta(alpha, alpha)``; numpy's global ``np.random.beta`` when ``rng``
    is None, as in the authors' code), and ``perm`` from the torch Generator
    ``generator`` (``torch.randperm(N, generator=generator)`` on the generator's
    device, then moved to the inputs' device). ``lam`` overrides the draw
    (it is still folded to ``max(lam, 1-lam)``); ``perm`` overrides the permutation (the
    trainer's per-stream MixUp builds one that mixes rows within each data stream).

    Returns ``(mixed_inputs (N, ...), mixed_targets (N, C), l: float, perm (N,) long)``;
    ``l`` and ``perm`` let the caller mix anything else (e.g. per-row weights).
    """
    if lam is None:
        lam = float(rng.beta(alpha, alpha)) if rng is not None else float(np.random.beta(alpha, alpha))
    lam = max(float(lam), 1.0 - float(lam))
    n = inputs.shape[0]
    if perm is None:
        gdev = generator.device if generator is not None else torch.device("cpu")
        perm = torch.randperm(n, generator=generator, device=gdev)
    perm = perm.to(inputs.device)
    mixed_inputs = lam * inputs + (1.0 - lam) * inputs[perm]
    tperm = perm.to(targets.device)
    mixed_targets = lam * targets + (1.0 - lam) * targets[tperm]
    return mixed_inputs, mixed_targets, lam, perm


def linear_rampup(epoch_since_warmup: float, length: float = 16) -> float:
    """Ramp for the unlabeled term [C]: ``clip(x / length, 0, 1)`` as a float.

    ``x`` may be fractional (``epoch - warm_up + batch_idx / num_iter`` in [C]).
    ``length <= 0`` gives 1.0 for x >= 0.
    """
    x = float(epoch_since_warmup)
    if length <= 0:
        return 1.0 if x >= 0 else 0.0
    return float(np.clip(x / float(length), 0.0, 1.0))


def label_space_loss(logits_x: Tensor, targets_x: Tensor, logits_u: Tensor, targets_u: Tensor,
                     lambda_u: float, ramp: float) -> Tuple[Tensor, Tensor, Tensor]:
    """L_pseu [C] (DivideMix-style semi-supervised loss on mixed rows).

    ``lx = mean_i -sum_j t_ij log softmax(logits_x)_ij`` (soft CE, labeled rows);
    ``lu = mean_{i,j} (softmax(logits_u)_ij - t_ij)^2`` (MSE averaged over rows
    and classes, unlabeled rows); ``total = lx + lambda_u * ramp * lu``.
    An empty part contributes a zero attached to the graph.
    Returns scalars ``(total, lx, lu)``.
    """
    if logits_x.shape[0] > 0:
        lx = -(F.log_softmax(logits_x, dim=1) * targets_x).sum(dim=1).mean()
    else:
        lx = _zero_with_grad(logits_x)
    if logits_u.shape[0] > 0:
        lu = ((torch.softmax(logits_u, dim=1) - targets_u) ** 2).mean()
    else:
        lu = _zero_with_grad(logits_u)
    total = lx + float(lambda_u) * float(ramp) * lu
    return total, lx, lu


# ---------------------------------------------------------------------------
# 2.5 Feature-space consistency
# ---------------------------------------------------------------------------

def prototype_loss(z: Tensor, prototypes: Tensor, targets: Tensor, is_labeled: Tensor,
                   T: float = 0.3, lambda_u: float = 1.0) -> Tensor:
    """Prototypical alignment loss [P][C].

    ``s_i = softmax(z_i . o_j / T)`` over the C prototypes (prototypes are
    detached; ``z`` is used as given - the projection head already L2-normalises).
    Labeled rows: ``KL(p~ || s)`` with 'batchmean' reduction, i.e. summed over
    classes and divided by the number of labeled rows. Unlabeled rows:
    ``mean_{i,j} (s_ij - p~_ij)^2``. Returns ``KL + lambda_u * MSE`` (scalar;
    an empty part contributes 0, attached to the graph).

    MixUp [C]: the authors compute ``l * loss(t_a) + (1 - l) * loss(t_b)``;
    passing the mixed targets ``l t_a + (1 - l) t_b`` here gives the same
    gradient (both losses are affine in the target up to terms constant in
    ``z``), and loss values that differ only by such constants.
    """
    lab = (is_labeled != 0).to(z.device).reshape(-1)
    logits = z @ prototypes.detach().to(z.dtype).t() / T
    total = _zero_with_grad(z)
    if bool(lab.any()):
        logs = torch.log_softmax(logits[lab], dim=1)
        total = total + F.kl_div(logs, targets[lab].to(logs.dtype), reduction="batchmean")
    unl = ~lab
    if bool(unl.any()):
        s = torch.softmax(logits[unl], dim=1)
        total = total + float(lambda_u) * ((s - targets[unl].to(s.dtype)) ** 2).mean()
    return total


@torch.no_grad()
def update_prototypes(prototypes: Tensor, z: Tensor, targets: Tensor, m: float = 0.999,
                      mask: Optional[Tensor] = None) -> Tensor:
    """EMA prototype update [P][C] (no grad); returns a new (C, D) tensor.

    For each row i in order (``j = argmax targets_i``; ``targets`` may also be
    1-D integer labels): ``o_j <- m o_j + (1 - m) z_i``; afterwards every row that
    received at least one sample is L2-normalised (``F.normalize``: a zero row
    stays zero, never NaN). Untouched rows are left as they are.

    The authors' sequential per-sample loop is evaluated in closed form: a class
    hit by samples i_1 < ... < i_n ends at
    ``m^n o_j + (1 - m) sum_t m^(n - t) z_{i_t}``, which is exactly what the loop
    computes (up to float rounding). ``mask`` (bool, (B,)) selects the rows to use
    (e.g. only P samples). The input tensor is not modified; in a distributed run
    the caller gathers ``z``/``targets`` from all ranks first so every rank
    applies the same update.
    """
    labels = _hard_labels(targets).to(prototypes.device)
    z = z.detach().to(device=prototypes.device, dtype=prototypes.dtype)
    if mask is not None:
        keep = (mask != 0).to(prototypes.device).reshape(-1)
        labels, z = labels[keep], z[keep]
    C = prototypes.shape[0]
    out = prototypes.detach().clone()
    if labels.numel() == 0:
        return out
    onehot = F.one_hot(labels, C).to(torch.float64)            # (n, C)
    counts = onehot.sum(dim=0)                                  # (C,)
    rank = (onehot.cumsum(dim=0) * onehot).sum(dim=1) - 1.0     # order of i within its class
    expo = counts[labels] - 1.0 - rank                          # m^(n_j - 1 - r_i)
    coef = ((1.0 - m) * torch.pow(torch.tensor(m, dtype=torch.float64, device=out.device), expo))
    decay = torch.pow(torch.tensor(m, dtype=torch.float64, device=out.device), counts)
    acc = torch.zeros(C, out.shape[1], dtype=torch.float64, device=out.device)
    acc.index_add_(0, labels, coef.unsqueeze(1) * z.to(torch.float64))
    new = decay.unsqueeze(1) * out.to(torch.float64) + acc
    touched = counts > 0
    new[touched] = F.normalize(new[touched], p=2, dim=1)
    out[touched] = new[touched].to(out.dtype)
    return out


def contrastive_masks(labels_anchor: Tensor, is_p_anchor: Tensor, labels_all: Tensor,
                      is_p_all: Tensor, n_query: int, noisy: bool = True,
                      anchor_idx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Positive / valid masks for the (noisy) supervised contrastive loss [P][C].

    Contrast set layout: ``[queries (B), keys (B), queue (Q)]`` so ``N = 2B + Q``
    columns; the anchors are the B queries (``B = n_query``); query i's own key
    is column ``B + i``. Labels are hard labels (1-D) or soft targets (argmax).

    ``noisy=True`` (Co-Reg, authors' 'modified' mode):
      * self column (i, i): neither positive nor valid;
      * own key (i, B+i): always positive;
      * other j with the same label: positive iff anchor and j are both in P;
        otherwise ignored (P anchor vs same-label U column; U anchor vs any
        same-label column);
      * different label: negative.
    ``noisy=False``: plain SupCon - same label = positive, different = negative,
    own key positive, self excluded.

    ``anchor_idx`` (distributed runs): the anchors are only the queries at these positions
    (this rank's rows of the gathered global batch); default all B queries.

    Returns ``(pos_mask, valid_mask)``, both bool (A, N) for A anchors; valid = positives +
    negatives (the softmax denominator), ``pos_mask <= valid_mask``.
    """
    B = int(n_query)
    la = _hard_labels(labels_anchor)
    lall = _hard_labels(labels_all).to(la.device)
    N = lall.shape[0]
    dev = la.device
    idx = torch.arange(B, device=dev) if anchor_idx is None else anchor_idx.to(dev)
    A = idx.shape[0]
    same = la.view(-1, 1) == lall.view(1, -1)
    rows = torch.arange(A, device=dev)
    self_m = torch.zeros(A, N, dtype=torch.bool, device=dev)
    self_m[rows, idx] = True
    own_key = torch.zeros(A, N, dtype=torch.bool, device=dev)
    own_key[rows, B + idx] = True
    if noisy:
        pa = (is_p_anchor != 0).to(dev).reshape(-1, 1)
        pj = (is_p_all != 0).to(dev).reshape(1, -1)
        both_p = pa & pj
        pos = same & both_p
        ignored = same & ~both_p
    else:
        pos = same
        ignored = torch.zeros_like(same)
    pos = (pos | own_key) & ~self_m
    ignored = ignored & ~own_key
    valid = ~ignored & ~self_m
    return pos, valid


def noisy_supcon_loss(q: Tensor, k: Tensor, queue_feats: Optional[Tensor], labels_q: Tensor,
                      is_p_q: Tensor, queue_labels: Optional[Tensor], queue_is_p: Optional[Tensor],
                      T: float = 0.07, noisy: bool = True,
                      anchor_idx: Optional[Tensor] = None) -> Tensor:
    """Noisy supervised contrastive loss (MoCo form) [P][C].

    Features are L2-normalised; contrast set ``F = [q; k; queue]`` (N = 2B + Q);
    ``l_ij = q_i . F_j / T``. With the masks of :func:`contrastive_masks`
    (labels of the keys = labels of their queries):

    ``loss_i = -(1/|pos_i|) sum_{j in pos_i} [ l_ij - log sum_{j' in valid_i} exp(l_ij') ]``

    averaged over the B anchors (every anchor has >= 1 positive, its own key).
    Row maxima are subtracted (detached) for stability. ``k`` and the queue are
    used as given (the caller produces them without grad). Scalar.

    ``anchor_idx``: in a distributed run ``q``/``k`` are the gathered global batch (queries
    with their gradient) and only this rank's rows are anchors; the mean is over them, so the
    ranks' average is the global mean, and the contrast set is the one a single device has.
    """
    Bq = q.shape[0]
    D = q.shape[1]
    if queue_feats is None:
        queue_feats = q.new_zeros((0, D))
    lq = _hard_labels(labels_q).to(q.device)
    pq = (is_p_q != 0).to(q.device).reshape(-1)
    if queue_labels is None or queue_feats.shape[0] == 0:
        lqueue = lq.new_zeros((0,))
        pqueue = pq.new_zeros((0,))
        queue_feats = queue_feats[:0]
    else:
        lqueue = _hard_labels(queue_labels).to(q.device)
        pqueue = (queue_is_p != 0).to(q.device).reshape(-1)
    qn = F.normalize(q, dim=1)
    feats = torch.cat([qn, F.normalize(k.to(q.dtype), dim=1),
                       F.normalize(queue_feats.to(device=q.device, dtype=q.dtype), dim=1)], dim=0)
    labels_all = torch.cat([lq, lq, lqueue])
    is_p_all = torch.cat([pq, pq, pqueue])
    if anchor_idx is not None:
        anchor_idx = anchor_idx.to(q.device)
        qa, la, pa = qn[anchor_idx], lq[anchor_idx], pq[anchor_idx]
    else:
        qa, la, pa = qn, lq, pq
    pos, valid = contrastive_masks(la, pa, labels_all, is_p_all, Bq, noisy=noisy,
                                   anchor_idx=anchor_idx)
    logits = qa @ feats.t() / T
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_denom = torch.logsumexp(logits.masked_fill(~valid, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_denom
    posf = pos.to(logits.dtype)
    per_anchor = -(posf * log_prob).sum(dim=1) / posf.sum(dim=1).clamp_min(1.0)
    return per_anchor.mean()
