"""Hand-computed checks of coreg_dist.losses (expected values derived in comments)."""
import math

import numpy as np
import pytest
import torch

from coreg_dist import losses as L

LN2, LN3 = math.log(2.0), math.log(3.0)


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float64, **kw)


# ---------------------------------------------------------------------------
# Warm-up
# ---------------------------------------------------------------------------

def test_partial_ce_by_hand():
    # row 0: softmax([0, ln2, ln3]) = [1,2,3]/6, S={0,1} -> mass 0.5
    # row 1: all 3 classes are candidates -> skipped
    # row 2: softmax([0, 0, ln2]) = [1/4, 1/4, 1/2], S={0} -> mass 0.25
    logits = t([[0.0, LN2, LN3], [0.0, 0.0, 0.0], [0.0, 0.0, LN2]], requires_grad=True)
    Y = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    loss = L.partial_ce(logits, Y)
    expected = (-math.log(0.5 + 1e-5) - math.log(0.25 + 1e-5)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad[1] == 0)
    assert logits.grad[0].abs().sum() > 0


def test_partial_ce_all_full_rows_is_zero_with_grad():
    logits = t([[1.0, 2.0], [0.5, 0.1]], requires_grad=True)
    loss = L.partial_ce(logits, torch.ones(2, 2))
    assert loss.item() == 0.0
    loss.backward()  # must not raise
    assert torch.all(logits.grad == 0)


def test_negative_entropy_and_warmup_by_hand():
    # row 0: p = [1/6, 1/3, 1/2]; row 1: uniform -> sum p log p = ln(1/3)
    logits = t([[0.0, LN2, LN3], [0.0, 0.0, 0.0]])
    r0 = (1 / 6) * math.log(1 / 6) + (1 / 3) * math.log(1 / 3) + 0.5 * math.log(0.5)
    r1 = math.log(1 / 3)
    ne = L.negative_entropy(logits)
    assert ne.item() == pytest.approx((r0 + r1) / 2, abs=1e-12)
    Y = torch.tensor([[0, 0, 1], [1, 0, 0]])
    # partial CE: row0 -log(0.5+eps), row1 -log(1/3+eps)
    pce = (-math.log(0.5 + 1e-5) - math.log(1 / 3 + 1e-5)) / 2
    assert L.warmup_loss(logits, Y).item() == pytest.approx(pce + (r0 + r1) / 2, abs=1e-12)
    assert L.warmup_loss(logits, Y, neg_entropy=False).item() == pytest.approx(pce, abs=1e-12)


def test_negative_entropy_saturated_no_nan():
    logits = t([[1000.0, 0.0, -1000.0]])
    assert torch.isfinite(L.negative_entropy(logits))


# ---------------------------------------------------------------------------
# Co-divide
# ---------------------------------------------------------------------------

def test_distribution_align_by_hand():
    probs = t([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    # default mean = [0.3, 0.45, 0.25]; uniform prior cancels in the renormalisation
    r0 = np.array([0.5 / 0.3, 0.3 / 0.45, 0.2 / 0.25])
    r1 = np.array([0.1 / 0.3, 0.6 / 0.45, 0.3 / 0.25])
    expected = np.stack([r0 / r0.sum(), r1 / r1.sum()])
    np.testing.assert_allclose(L.distribution_align(probs).numpy(), expected, atol=1e-12)
    # explicit global mean and prior
    mean = t([0.2, 0.5, 0.3])
    prior = t([0.5, 0.25, 0.25])
    r = np.array([0.5 * 0.5 / 0.2, 0.3 * 0.25 / 0.5, 0.2 * 0.25 / 0.3])
    out = L.distribution_align(probs[:1], prior=prior, mean=mean)
    np.testing.assert_allclose(out.numpy()[0], r / r.sum(), atol=1e-12)


def test_distribution_align_identity_when_mean_uniform():
    probs = torch.softmax(torch.randn(5, 4, dtype=torch.float64), dim=1)
    out = L.distribution_align(probs, mean=torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(out, probs, atol=1e-12, rtol=0)


def test_division_loss_by_hand():
    probs = t([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [1.0, 0.0, 0.0]])
    Y = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 0]])
    out = L.division_loss(probs, Y)
    assert out.shape == (3,)
    assert out[0].item() == pytest.approx(-math.log(0.3))
    assert out[1].item() == pytest.approx(-math.log(0.6))
    assert torch.isfinite(out[2]) and out[2].item() == pytest.approx(-math.log(1e-12))
    # sum: the mass on the set; a single candidate gives the same as max
    out = L.division_loss(probs, Y, reduce="sum")
    assert out[0].item() == pytest.approx(-math.log(0.5))
    assert out[1].item() == pytest.approx(0.0, abs=1e-6)
    assert out[2].item() == pytest.approx(-math.log(1e-12))
    single = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 1]])
    assert torch.allclose(L.division_loss(probs, single, reduce="sum"), L.division_loss(probs, single))
    with pytest.raises(ValueError, match="reduce"):
        L.division_loss(probs, Y, reduce="mean")


def test_minmax_normalize():
    x = t([2.0, 4.0, 6.0])
    out = L.minmax_normalize(x, 2.0, 6.0)
    np.testing.assert_allclose(out.numpy(), [0.0, 0.5, 1.0], atol=1e-9)
    assert np.all(np.isfinite(L.minmax_normalize(np.ones(3), 1.0, 1.0)))


# ---------------------------------------------------------------------------
# Co-pseudo-labels
# ---------------------------------------------------------------------------

def test_sharpen_by_hand_and_identity():
    out = L.sharpen(t([[0.2, 0.8]]), T=0.5)
    np.testing.assert_allclose(out.numpy(), [[0.04 / 0.68, 0.64 / 0.68]], atol=1e-12)
    p = torch.softmax(torch.randn(4, 5, dtype=torch.float64), dim=1)
    torch.testing.assert_close(L.sharpen(p, T=1.0), p, atol=1e-12, rtol=0)


def test_masked_prediction_by_hand():
    probs = t([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    Y = torch.tensor([[0, 1, 1], [0, 1, 1], [0, 0, 0]])
    out = L.masked_prediction(probs, Y).numpy()
    np.testing.assert_allclose(out[0], [0.0, 0.6, 0.4], atol=1e-12)
    np.testing.assert_allclose(out[1], [0.0, 0.5, 0.5], atol=1e-12)   # zero mass -> uniform over S
    np.testing.assert_allclose(out[2], [1 / 3, 1 / 3, 1 / 3], atol=1e-12)  # empty S -> uniform


def test_weigh_outside_by_hand():
    # lam .5: [.5*.5, .3, .2] = [.25, .3, .2] / .75; lam 1: unchanged; lam 0: masked_prediction
    probs = t([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    Y = torch.tensor([[0, 1, 1], [0, 1, 1]])
    np.testing.assert_allclose(L.weigh_outside(probs, Y, 0.5).numpy()[0], [1 / 3, 0.4, 0.8 / 3], atol=1e-7)
    np.testing.assert_allclose(L.weigh_outside(probs, Y, 0.5).numpy()[1], [1.0, 0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(L.weigh_outside(probs, Y, 1.0).numpy(), probs.numpy(), atol=1e-7)
    np.testing.assert_allclose(L.weigh_outside(probs, Y, 0.0).numpy(),
                               L.masked_prediction(probs, Y).numpy(), atol=0)


def test_refine_labeled_by_hand():
    # p' = 0.5*[0, .6, .4] + 0.5*mean([.2,.2,.6],[.4,.4,.2]) = [.15, .45, .40]
    # sharpen T=.5: squares [.0225, .2025, .16], sum .385
    p_masked = t([[0.0, 0.6, 0.4]])
    views = [t([[0.2, 0.2, 0.6]]), t([[0.4, 0.4, 0.2]])]
    expected = np.array([0.0225, 0.2025, 0.16]) / 0.385
    np.testing.assert_allclose(L.refine_labeled(p_masked, t([0.5]), views).numpy()[0], expected, atol=1e-12)
    # stacked-tensor form and (B,1) weights give the same
    out2 = L.refine_labeled(p_masked, t([[0.5]]), torch.stack(views))
    np.testing.assert_allclose(out2.numpy()[0], expected, atol=1e-12)
    # w = 1 -> sharpened masked prediction only
    np.testing.assert_allclose(L.refine_labeled(p_masked, t([1.0]), views).numpy()[0],
                               np.array([0.0, 0.36, 0.16]) / 0.52, atol=1e-12)


def test_co_guess_unlabeled_by_hand():
    # mean of 4 = [.25,.75] -> squares [.0625,.5625] / .625 = [.1, .9]
    A = [t([[0.5, 0.5]]), t([[0.0, 1.0]])]
    B = [t([[0.25, 0.75]]), t([[0.25, 0.75]])]
    np.testing.assert_allclose(L.co_guess_unlabeled(A, B).numpy(), [[0.1, 0.9]], atol=1e-12)


# ---------------------------------------------------------------------------
# Label-space consistency
# ---------------------------------------------------------------------------

def test_mixup_properties_and_determinism():
    x = torch.arange(24, dtype=torch.float64).reshape(8, 3)
    y = torch.eye(8, dtype=torch.float64)[:, :4] + 0.0
    outs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(3)
        rng = np.random.default_rng(5)
        outs.append(L.mixup(x, y, alpha=4.0, generator=g, rng=rng))
    (mx, my, lam, perm), (mx2, my2, lam2, perm2) = outs
    assert lam == lam2 and torch.equal(perm, perm2) and torch.equal(mx, mx2)
    assert 0.5 <= lam <= 1.0
    assert sorted(perm.tolist()) == list(range(8))
    torch.testing.assert_close(mx, lam * x + (1 - lam) * x[perm])
    torch.testing.assert_close(my, lam * y + (1 - lam) * y[perm])
    # folding: many draws are all >= 0.5
    rng = np.random.default_rng(0)
    lams = [L.mixup(x, y, rng=rng)[2] for _ in range(200)]
    assert min(lams) >= 0.5
    # explicit lam is folded
    assert L.mixup(x, y, lam=0.2)[2] == pytest.approx(0.8)


def test_linear_rampup():
    assert L.linear_rampup(-3) == 0.0
    assert L.linear_rampup(0) == 0.0
    assert L.linear_rampup(8) == 0.5
    assert L.linear_rampup(8, length=4) == 1.0
    assert L.linear_rampup(40) == 1.0


def test_label_space_loss_by_hand():
    # labeled: softmax([0, ln3]) = [.25,.75], target [.5,.5] -> lx = -(.5 ln .25 + .5 ln .75)
    # unlabeled: softmax([0,0]) = [.5,.5], target [1,0] -> lu = (.25 + .25)/2 = .25
    lx_logits = t([[0.0, LN3]], requires_grad=True)
    lu_logits = t([[0.0, 0.0]], requires_grad=True)
    total, lx, lu = L.label_space_loss(lx_logits, t([[0.5, 0.5]]), lu_logits, t([[1.0, 0.0]]),
                                       lambda_u=2.0, ramp=0.5)
    ex_lx = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert lx.item() == pytest.approx(ex_lx, abs=1e-12)
    assert lu.item() == pytest.approx(0.25, abs=1e-12)
    assert total.item() == pytest.approx(ex_lx + 2.0 * 0.5 * 0.25, abs=1e-12)
    total.backward()
    assert lx_logits.grad.abs().sum() > 0 and lu_logits.grad.abs().sum() > 0
    # empty unlabeled part
    total2, _, lu2 = L.label_space_loss(lx_logits, t([[0.5, 0.5]]), lx_logits[:0], t([[1.0, 0.0]])[:0], 1.0, 1.0)
    assert lu2.item() == 0.0 and total2.item() == pytest.approx(ex_lx)


# ---------------------------------------------------------------------------
# Feature-space consistency
# ---------------------------------------------------------------------------

def test_prototype_loss_by_hand():
    # prototypes e1, e2, T = 1: s = softmax(z)
    # labeled row z=[ln3, 0] -> s=[.75,.25], target [1,0] -> KL = ln(1/.75) = ln(4/3)
    # unlabeled row z=[0,0] -> s=[.5,.5], target [1,0] -> MSE = .25
    protos = t([[1.0, 0.0], [0.0, 1.0]])
    z = t([[LN3, 0.0], [0.0, 0.0]], requires_grad=True)
    targets = t([[1.0, 0.0], [1.0, 0.0]])
    is_lab = torch.tensor([True, False])
    loss = L.prototype_loss(z, protos, targets, is_lab, T=1.0)
    assert loss.item() == pytest.approx(math.log(4 / 3) + 0.25, abs=1e-12)
    loss.backward()
    assert z.grad.abs().sum() > 0
    # T scales the similarities: T=0.5 labeled only -> s = softmax([2 ln3, 0]) = [.9, .1]
    only_lab = L.prototype_loss(z.detach()[:1], protos, targets[:1], torch.tensor([1]), T=0.5)
    assert only_lab.item() == pytest.approx(math.log(1 / 0.9), abs=1e-12)
    # soft target KL: target [.5,.5] vs s [.75,.25]
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert L.prototype_loss(z.detach()[:1], protos, t([[0.5, 0.5]]), torch.tensor([1]), T=1.0).item() \
        == pytest.approx(kl, abs=1e-12)
    # no rows -> 0
    assert L.prototype_loss(z.detach()[:0], protos, targets[:0], torch.tensor([], dtype=torch.bool)).item() == 0.0


def _naive_proto_update(protos, z, labels, m):
    P = protos.clone()
    touched = set()
    for zi, c in zip(z, labels.tolist()):
        P[c] = m * P[c] + (1 - m) * zi
        touched.add(c)
    for c in touched:
        n = P[c].norm()
        if n > 0:
            P[c] = P[c] / n
    return P


def test_update_prototypes_by_hand():
    # zero prototypes, m=.5: class 0 gets [1,0] then [0,1]:
    # .5*0 + .5*[1,0] = [.5,0]; .5*[.5,0] + .5*[0,1] = [.25,.5] -> normalised [1,2]/sqrt5
    protos = torch.zeros(3, 2, dtype=torch.float64)
    protos[2] = t([0.6, 0.8])
    z = t([[1.0, 0.0], [0.0, 1.0]])
    out = L.update_prototypes(protos, z, torch.tensor([0, 0]), m=0.5)
    np.testing.assert_allclose(out[0].numpy(), np.array([1.0, 2.0]) / math.sqrt(5), atol=1e-12)
    assert torch.all(out[1] == 0) and torch.all(torch.isfinite(out))   # untouched zero row, no NaN
    np.testing.assert_allclose(out[2].numpy(), [0.6, 0.8])
    assert torch.all(protos[0] == 0)   # input not modified
    # soft targets -> argmax; mask drops rows
    out2 = L.update_prototypes(protos, z, t([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]]), m=0.5,
                               mask=torch.tensor([True, False]))
    np.testing.assert_allclose(out2[0].numpy(), [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(out2[2].numpy(), [0.6, 0.8])


def test_update_prototypes_matches_sequential_loop():
    g = torch.Generator().manual_seed(0)
    protos = torch.nn.functional.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    protos[3] = 0
    z = torch.nn.functional.normalize(torch.randn(64, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 4, (64,), generator=g)
    for m in (0.999, 0.9, 0.3):
        out = L.update_prototypes(protos, z, labels, m=m)
        torch.testing.assert_close(out, _naive_proto_update(protos, z, labels, m), atol=1e-12, rtol=0)
    out32 = L.update_prototypes(protos.float(), z.float(), labels)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), _naive_proto_update(protos, z, labels, 0.999), atol=1e-5, rtol=0)


# Hand-made contrastive example: B = 3 anchors, Q = 2 queue entries.
#   anchors:  q0 label 0 P,  q1 label 0 U,  q2 label 1 P
#   columns:  0:q0(0,P) 1:q1(0,U) 2:q2(1,P) 3:k0(0,P) 4:k1(0,U) 5:k2(1,P) 6:Q0(0,P) 7:Q1(1,U)
LAB_Q = [0, 0, 1]
P_Q = [1, 0, 1]
LAB_QUEUE = [0, 1]
P_QUEUE = [1, 0]
NOISY_POS = [
    [0, 0, 0, 1, 0, 0, 1, 0],  # P anchor: own key + same-label P (queue 0); q1/k1 (U) ignored
    [0, 0, 0, 0, 1, 0, 0, 0],  # U anchor: only its own key
    [0, 0, 0, 0, 0, 1, 0, 0],  # P anchor label 1: own key; queue 1 is U -> ignored
]
NOISY_VALID = [
    [0, 0, 1, 1, 0, 1, 1, 1],  # self, q1, k1 out
    [0, 0, 1, 0, 1, 1, 0, 1],  # self and every same-label column but its key out
    [1, 1, 0, 1, 1, 1, 1, 0],  # self and same-label U queue entry out
]
SUPCON_POS = [
    [0, 1, 0, 1, 1, 0, 1, 0],
    [1, 0, 0, 1, 1, 0, 1, 0],
    [0, 0, 0, 0, 0, 1, 0, 1],
]
SUPCON_VALID = [
    [0, 1, 1, 1, 1, 1, 1, 1],
    [1, 0, 1, 1, 1, 1, 1, 1],
    [1, 1, 0, 1, 1, 1, 1, 1],
]


def _all_lab_p():
    labels_all = torch.tensor(LAB_Q + LAB_Q + LAB_QUEUE)
    is_p_all = torch.tensor(P_Q + P_Q + P_QUEUE)
    return labels_all, is_p_all


def test_contrastive_masks_hand_example():
    labels_all, is_p_all = _all_lab_p()
    pos, valid = L.contrastive_masks(torch.tensor(LAB_Q), torch.tensor(P_Q), labels_all, is_p_all, 3)
    assert pos.shape == valid.shape == (3, 8)
    assert pos.to(torch.int64).tolist() == NOISY_POS
    assert valid.to(torch.int64).tolist() == NOISY_VALID
    pos, valid = L.contrastive_masks(torch.tensor(LAB_Q), torch.tensor(P_Q), labels_all, is_p_all, 3,
                                     noisy=False)
    assert pos.to(torch.int64).tolist() == SUPCON_POS
    assert valid.to(torch.int64).tolist() == SUPCON_VALID


def _naive_supcon(q, k, queue, lab_q, p_q, lab_queue, p_queue, T, noisy):
    """Independent numpy loop over anchors/columns following the written rules."""
    def nrm(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)
    q, k, queue = nrm(q), nrm(k), nrm(queue)
    feats = np.concatenate([q, k, queue])
    lab = list(lab_q) + list(lab_q) + list(lab_queue)
    isp = list(p_q) + list(p_q) + list(p_queue)
    B = len(q)
    losses = []
    for i in range(B):
        pos, den = [], []
        for j in range(len(feats)):
            if j == i:
                continue
            lij = float(q[i] @ feats[j]) / T
            if j == B + i:
                pos.append(lij); den.append(lij); continue
            if lab[j] != lab[i]:
                den.append(lij); continue
            if not noisy or (isp[i] and isp[j]):
                pos.append(lij); den.append(lij)
            # else: ignored
        mx = max(den)
        logden = mx + math.log(sum(math.exp(v - mx) for v in den))
        losses.append(-sum(v - logden for v in pos) / len(pos))
    return sum(losses) / B


def test_noisy_supcon_tiny_by_hand():
    # B=1, queue=1: q=k=[1,0], queue=[0,1] with another label, T=1:
    # l(own key)=1, l(queue)=0 -> loss = -log(e/(e+1)) = log(1 + e^-1)
    loss = L.noisy_supcon_loss(t([[1.0, 0.0]]), t([[1.0, 0.0]]), t([[0.0, 1.0]]),
                               torch.tensor([0]), torch.tensor([1]), torch.tensor([1]), torch.tensor([1]),
                               T=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-12)


@pytest.mark.parametrize("noisy", [True, False])
def test_noisy_supcon_matches_naive_loop(noisy):
    rng = np.random.default_rng(1)
    q = rng.normal(size=(3, 4)); k = rng.normal(size=(3, 4)); queue = rng.normal(size=(2, 4))
    qt = torch.tensor(q, requires_grad=True)
    loss = L.noisy_supcon_loss(qt, torch.tensor(k), torch.tensor(queue), torch.tensor(LAB_Q),
                               torch.tensor(P_Q), torch.tensor(LAB_QUEUE), torch.tensor(P_QUEUE),
                               T=0.07, noisy=noisy)
    expected = _naive_supcon(q, k, queue, LAB_Q, P_Q, LAB_QUEUE, P_QUEUE, 0.07, noisy)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert torch.isfinite(qt.grad).all() and qt.grad.abs().sum() > 0


def test_noisy_supcon_larger_random_and_soft_labels():
    rng = np.random.default_rng(2)
    B, Q, D, C = 16, 40, 8, 5
    q = rng.normal(size=(B, D)); k = q + 0.1 * rng.normal(size=(B, D)); queue = rng.normal(size=(Q, D))
    lq = rng.integers(0, C, B); lqu = rng.integers(0, C, Q)
    pq = rng.integers(0, 2, B); pqu = rng.integers(0, 2, Q)
    soft = np.eye(C)[lq] * 0.7 + 0.3 / C
    loss = L.noisy_supcon_loss(torch.tensor(q).float(), torch.tensor(k).float(), torch.tensor(queue).float(),
                               torch.tensor(soft), torch.tensor(pq), torch.tensor(lqu), torch.tensor(pqu == 1))
    expected = _naive_supcon(q, k, queue, lq.tolist(), pq.tolist(), lqu.tolist(), pqu.tolist(), 0.07, True)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # empty queue works
    l0 = L.noisy_supcon_loss(torch.tensor(q), torch.tensor(k), None, torch.tensor(lq), torch.tensor(pq),
                             None, None)
    assert torch.isfinite(l0)
