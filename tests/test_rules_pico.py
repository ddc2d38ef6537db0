"""Hand-computed checks of coreg_dist.rules.pico (PiCO, PiCO+, ALIM, DivideMix rules).

Every expected number is worked out in the comment next to it.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from coreg_dist import losses as L
from coreg_dist.rules import pico as R

LN2, LN3, E = math.log(2.0), math.log(3.0), math.e


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float64, **kw)


# ---------------------------------------------------------------------------
# PiCO
# ---------------------------------------------------------------------------

def test_initial_targets_uniform_over_S_and_over_all_for_empty_row():
    Y = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    conf = R.pico_initial_targets(Y)
    # |S| = 2 -> 1/2 each; |S| = 1 -> 1; empty -> uniform over all C (not 0/0)
    assert torch.equal(conf, torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0, 1.0], [0.25] * 4]))


def test_classification_loss_by_hand():
    # row 0: log_softmax([0, ln3]) = [ln(1/4), ln(3/4)], conf [1/2, 1/2]
    #        -> -(1/2)(ln 1/4 + ln 3/4) = (ln4 + ln4 - ln3)/2 = 2 ln2 - ln3/2
    # row 1: conf is a zero row (empty S) -> 0; mean over both rows
    logits = t([[0.0, LN3], [5.0, -1.0]], requires_grad=True)
    conf = t([[0.5, 0.5], [0.0, 0.0]])
    loss = R.pico_classification_loss(logits, conf)
    assert loss.item() == pytest.approx((2 * LN2 - LN3 / 2) / 2, abs=1e-12)
    loss.backward()
    assert torch.all(logits.grad[1] == 0)


def test_target_momentum_schedule_endpoints():
    assert R.pico_target_momentum(0, 500) == pytest.approx(0.95)
    assert R.pico_target_momentum(500, 500) == pytest.approx(0.8)
    # midway: 0.95 + 0.5 * (0.8 - 0.95) = 0.875
    assert R.pico_target_momentum(250, 500) == pytest.approx(0.875)


def test_update_targets_by_hand_zero_outside_S_and_empty_row_unchanged():
    conf = t([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    score = t([[0.2, 0.3, 0.5], [0.1, 0.2, 0.7]])
    Y = torch.tensor([[1, 1, 0], [0, 0, 0]])
    new = R.pico_update_targets(conf, score, Y, momentum=0.9)
    # row 0: class 2 has the top score but is outside S -> argmax over S is class 1
    #        0.9 * [.5, .5, 0] + 0.1 * [0, 1, 0] = [.45, .55, 0]
    # row 1: empty S -> unchanged (zero row, no NaN)
    assert torch.allclose(new, t([[0.45, 0.55, 0.0], [0.0, 0.0, 0.0]]), atol=1e-12)
    assert new[0, 2] == 0  # zero outside S
    assert torch.equal(conf, t([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))  # input untouched
    assert not torch.isnan(new).any()


def test_update_targets_shape_mismatch_raises():
    with pytest.raises(ValueError):
        R.pico_update_targets(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), 0.9)
    with pytest.raises(ValueError):
        R.pico_update_targets(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), 1.5)


def test_pseudo_labels_inside_S_and_empty_row_uses_all_classes():
    probs = t([[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]])
    Y = torch.tensor([[1, 1, 0], [0, 0, 0]])
    # row 0: best in S = class 1; row 1: empty S -> argmax over all = class 2
    assert R.pico_pseudo_labels(probs, Y).tolist() == [1, 2]


def test_prototype_scores_by_hand():
    q = t([[1.0, 0.0]])
    P = t([[1.0, 0.0], [0.0, 1.0]])
    # dots [1, 0]: softmax = [e, 1] / (e + 1)
    assert torch.allclose(R.pico_prototype_scores(q, P), t([[E / (E + 1), 1 / (E + 1)]]))
    # ALIM's vMF temperature 0.5: softmax([2, 0]) = [e^2, 1] / (e^2 + 1)
    assert torch.allclose(R.pico_prototype_scores(q, P, temperature=0.5),
                          t([[E ** 2 / (E ** 2 + 1), 1 / (E ** 2 + 1)]]))


def test_update_prototypes_by_hand_and_normalised():
    P = t([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    q = t([[0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 0])
    new = R.pico_update_prototypes(P, q, labels, m=0.5)
    # sample 1: o0 = .5 [1,0] + .5 [0,1] = [.5,.5]   (authors normalise only at the end)
    # sample 2: o0 = .5 [.5,.5] + .5 [.6,.8] = [.55, .65]; |o0| = sqrt(.3025 + .4225) = sqrt(.725)
    n = math.sqrt(0.725)
    assert torch.allclose(new[0], t([0.55 / n, 0.65 / n]), atol=1e-12)
    assert torch.equal(new[1], P[1]) and torch.equal(new[2], P[2])  # untouched rows as they were
    assert torch.allclose(new[:2].norm(dim=1), torch.ones(2, dtype=torch.float64))
    assert torch.equal(P[0], t([1.0, 0.0]))  # input not modified


def test_update_prototypes_from_zero_with_default_m_and_mask():
    P = torch.zeros(2, 2, dtype=torch.float64)
    q = t([[0.0, 2.0], [3.0, 0.0]])
    # default m = 0.99: o1 = 0.01 * [0, 2] -> normalised [0, 1]; sample 2 masked out (PiCO+ unreliable)
    new = R.pico_update_prototypes(P, q, torch.tensor([1, 0]), mask=torch.tensor([True, False]))
    assert torch.allclose(new, t([[0.0, 0.0], [0.0, 1.0]]))


def test_prototype_phase():
    assert not R.pico_prototype_phase(79) and R.pico_prototype_phase(80)
    assert R.pico_prototype_phase(1, prot_start=1)


def test_supervised_contrastive_loss_reuses_plain_supcon_by_hand():
    # q0=k0=[1,0], q1=k1=[0,1], no queue, T=1.
    # anchor 0 columns [q0 self (excluded), q1: 0, k0: 1, k1: 0]; denominator 1 + e + 1 = 2 + e
    q = t([[1.0, 0.0], [0.0, 1.0]])
    k = q.clone()
    Ld = math.log(2 + E)
    # different labels: positive = own key only -> -(1 - Ld) = Ld - 1 for both anchors
    diff = R.pico_contrastive_loss(q, k, None, torch.tensor([0, 1]), None, T=1.0)
    assert diff.item() == pytest.approx(Ld - 1, abs=1e-12)
    # same label: positives q1 (0), k0 (1), k1 (0): -(1/3)((0-Ld)+(1-Ld)+(0-Ld)) = Ld - 1/3
    same = R.pico_contrastive_loss(q, k, None, torch.tensor([0, 0]), None, T=1.0)
    assert same.item() == pytest.approx(Ld - 1 / 3, abs=1e-12)


def test_supervised_contrastive_loss_with_queue_by_hand():
    # q0=k0=[1,0], queue u=[[0,1]] with label 0, B=1, T=1.
    # columns [q0 self, k0: 1, u: 0]; denominator e + 1; label 0 == queue label -> both positive
    # loss = -(1/2)((1 - ln(e+1)) + (0 - ln(e+1))) = ln(e+1) - 1/2
    q = t([[1.0, 0.0]])
    loss = R.pico_contrastive_loss(q, q.clone(), t([[0.0, 1.0]]), torch.tensor([0]),
                                   torch.tensor([0]), T=1.0)
    assert loss.item() == pytest.approx(math.log(E + 1) - 0.5, abs=1e-12)
    # queue label 1: only the own key is positive -> ln(e+1) - 1
    loss = R.pico_contrastive_loss(q, q.clone(), t([[0.0, 1.0]]), torch.tensor([0]),
                                   torch.tensor([1]), T=1.0)
    assert loss.item() == pytest.approx(math.log(E + 1) - 1, abs=1e-12)


def test_moco_warmup_loss_by_hand():
    # q = k = [1,0], queue [[0,1], [-1,0]], T=1: logits [1, 0, -1]
    # CE = -log(e / (e + 1 + 1/e)) = ln(e + 1 + 1/e) - 1
    q = t([[1.0, 0.0]])
    loss = R.pico_contrastive_loss(q, q.clone(), t([[0.0, 1.0], [-1.0, 0.0]]), torch.tensor([0]),
                                   torch.tensor([0, 0]), supervised=False, T=1.0)
    assert loss.item() == pytest.approx(math.log(E + 1 + 1 / E) - 1, abs=1e-12)


def test_total_loss_weight():
    assert R.pico_total_loss(t(1.0), t(2.0)).item() == pytest.approx(2.0)  # 1 + 0.5 * 2


# ---------------------------------------------------------------------------
# PiCO+
# ---------------------------------------------------------------------------

def test_pico_plus_pseudo_labels():
    probs = t([[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]])
    Y = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # reliable: best inside S = 1; unreliable: best over all classes = 2
    assert R.pico_plus_pseudo_labels(probs, Y, torch.tensor([True, False])).tolist() == [1, 2]


def test_pico_plus_prototype_distance_by_hand():
    q = t([[1.0, 0.0], [0.6, 0.8]])
    P = t([[1.0, 0.0], [0.0, 1.0]])
    probs = t([[0.3, 0.7], [0.3, 0.7]])
    Y = torch.tensor([[1, 0], [1, 1]])
    # row 0: best in S = class 0 -> -(q0 . o0) = -1
    # row 1: best in S = class 1 -> -(0.6*0 + 0.8*1) = -0.8
    assert torch.allclose(R.pico_plus_prototype_distance(q, P, probs, Y), t([-1.0, -0.8]))


def test_pico_plus_select_reliable_global_fraction():
    d = t([0.3, -0.9, 0.1, -0.5, 0.0])
    # int(5 * 0.6) = 3 smallest: -0.9 (1), -0.5 (3), 0.0 (4)
    assert R.pico_plus_select_reliable(d).tolist() == [False, True, False, True, True]
    assert not R.pico_plus_select_reliable(d, 0.0).any()


def test_pico_plus_reliable_threshold_selects_the_same_set():
    d = t([0.3, -0.9, 0.5, -0.2, 0.1])
    thr = R.pico_plus_reliable_threshold(d)               # int(5 * 0.6) = 3 closest: -0.9, -0.2, 0.1
    assert thr == pytest.approx(0.1)
    assert (d <= thr).tolist() == R.pico_plus_select_reliable(d).tolist()
    assert R.pico_plus_reliable_threshold(d, 0.1) == float("-inf")     # int(0.5) = 0 chosen
    assert R.pico_plus_reliable_threshold(d, 1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="pure_ratio"):
        R.pico_plus_reliable_threshold(d, 1.5)


def test_pico_plus_supcon_loss_by_hand_with_weights():
    # features q0=k0=[1,0], q1=k1=[0,1] (N=4, B=2), T=1; Ld = ln(2+e) for both anchors
    # anchor 0 positives {k0}: Ld - 1; anchor 1 positives {q0, k1}: -(1/2)((0-Ld)+(1-Ld)) = Ld - 1/2
    feats = t([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    mask = t([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0]])  # self columns are ignored
    Ld = math.log(2 + E)
    loss = R.pico_plus_supcon_loss(feats, mask, 2, T=1.0)
    assert loss.item() == pytest.approx(((Ld - 1) + (Ld - 0.5)) / 2, abs=1e-12)
    w = t([0.5, 0.1])
    loss = R.pico_plus_supcon_loss(feats, mask, 2, weights=w, T=1.0)
    assert loss.item() == pytest.approx((0.5 * (Ld - 1) + 0.1 * (Ld - 0.5)) / 2, abs=1e-12)


def test_pico_plus_supcon_matches_plain_supcon_with_label_mask():
    g = torch.Generator().manual_seed(0)
    q, k, u = (F.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=1) for n in (3, 3, 2))
    lq, lu = torch.tensor([0, 1, 0]), torch.tensor([1, 0])
    labels = torch.cat([lq, lq, lu])
    mask = (lq.view(-1, 1) == labels.view(1, -1)).double()
    ref = L.noisy_supcon_loss(q, k, u, lq, torch.ones(3), lu, torch.ones(2), T=0.07, noisy=False)
    ours = R.pico_plus_supcon_loss(torch.cat([q, k, u]), mask, 3, T=0.07)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-10)


def _plus_example():
    # B=2, one queue item; columns [q0, q1, k0, k1, u0]; all pseudo-labels 0
    feats = t([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [0.28, 0.96]])
    labels = torch.tensor([0, 0, 0, 0, 0])
    rel = torch.tensor([True, False, True, False, True])  # q0 reliable, q1 not, queue item reliable
    return feats, labels, rel


def test_pico_plus_masks_without_and_with_knn():
    feats, labels, rel = _plus_example()
    mask_all, mask = R.pico_plus_contrastive_masks(feats, labels, rel, 2, use_knn=False)
    assert torch.equal(mask_all, torch.ones(2, 5, dtype=torch.float64))
    # row 0 (reliable): same label and reliable column -> q0, k0, u0 (q0 = self, reset to 1)
    # row 1 (unreliable): zeroed, then own query/key reset -> q1, k1
    assert mask.tolist() == [[1, 0, 1, 0, 1], [0, 1, 0, 1, 0]]
    _, mask = R.pico_plus_contrastive_masks(feats, labels, rel, 2, use_knn=True, chosen_neighbors=2)
    # row 1 cosines: q0 0, q1 1, k0 0, k1 0.8, u0 0.96 -> top-2 {q1, u0}; + own key k1
    assert mask.tolist() == [[1, 0, 1, 0, 1], [0, 1, 0, 1, 1]]


def test_pico_plus_contrastive_loss_composition():
    feats, labels, rel = _plus_example()
    q, k, u = feats[:2], feats[2:4], feats[4:]
    args = (q, k, u, labels[:2], labels[4:], rel[:2], rel[4:])
    mask_all, mask = R.pico_plus_contrastive_masks(feats, labels, rel, 2, use_knn=False)
    # before knn_start: L(mask) + 0.1 * L(mask_all)
    expect = (R.pico_plus_supcon_loss(feats, mask, 2) + 0.1 * R.pico_plus_supcon_loss(feats, mask_all, 2))
    got = R.pico_plus_contrastive_loss(*args, epoch=99, chosen_neighbors=2)
    assert got.item() == pytest.approx(expect.item(), abs=1e-12)
    # from knn_start: weights 0.5 (reliable q0), 0.1 (unreliable q1) on the kNN mask
    _, mask = R.pico_plus_contrastive_masks(feats, labels, rel, 2, use_knn=True, chosen_neighbors=2)
    expect = (R.pico_plus_supcon_loss(feats, mask, 2, weights=t([0.5, 0.1]))
              + 0.1 * R.pico_plus_supcon_loss(feats, mask_all, 2))
    got = R.pico_plus_contrastive_loss(*args, epoch=100, chosen_neighbors=2)
    assert got.item() == pytest.approx(expect.item(), abs=1e-12)
    # the gradient reaches the queries
    qg = q.clone().requires_grad_(True)
    R.pico_plus_contrastive_loss(qg, *args[1:], epoch=100, chosen_neighbors=2).backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all() and qg.grad.abs().sum() > 0


def test_pico_plus_guess_targets_equals_sharpened_scores():
    # softmax([0, ln2]/0.5) = softmax([0, 2 ln2]) = [1, 4]/5
    lp = t([[0.0, LN2]])
    assert torch.allclose(R.pico_plus_guess_targets(lp, 0.5), t([[0.2, 0.8]]))
    # same as the authors' form: sharpen(softmax(lp), T) = [1/9, 4/9] / (5/9)
    assert torch.allclose(R.pico_plus_guess_targets(lp, 0.5), L.sharpen(torch.softmax(lp, 1), 0.5))
    # no 0/0 where p^(1/T) underflows
    big = torch.tensor([[0.0, -3000.0, -3000.0]])
    assert not torch.isnan(R.pico_plus_guess_targets(big)).any()


def test_pico_plus_mixup_targets_and_classification_loss():
    conf = t([[0.6, 0.4], [1.0, 0.0]])
    guess = t([[0.2, 0.8], [0.3, 0.7]])
    is_rel = torch.tensor([True, False])
    targets = R.pico_plus_mixup_targets(conf, guess, is_rel)
    assert torch.equal(targets, t([[0.6, 0.4], [0.3, 0.7]]))
    # all logits zero: every soft CE of a row summing to 1 is ln2
    # total = ln2 (mix) + 2 * ln2 (reliable) + 0.1 * ln2 (unreliable) = 3.1 ln2
    z = torch.zeros(2, 2, dtype=torch.float64)
    loss = R.pico_plus_classification_loss(z, conf, guess, is_rel, z, targets)
    assert loss.item() == pytest.approx(3.1 * LN2, abs=1e-12)
    # no unreliable sample: that term is 0, not NaN -> 3 ln2
    loss = R.pico_plus_classification_loss(z, conf, guess, torch.tensor([True, True]), z, targets)
    assert loss.item() == pytest.approx(3.0 * LN2, abs=1e-12)


# ---------------------------------------------------------------------------
# ALIM
# ---------------------------------------------------------------------------

PRED = [[0.2, 0.3, 0.5]]
YS = [[1, 1, 0]]


def test_alim_scale_by_hand_and_limits():
    pred, Y = t(PRED), torch.tensor(YS)
    # lam 0.5: [0.2, 0.3, 0.25] / 0.75 = [4, 6, 5] / 15
    assert torch.allclose(R.alim_targets(pred, Y, 0.5, "scale"), t([[4 / 15, 6 / 15, 5 / 15]]))
    # lam 0: masked target [0.2, 0.3, 0] / 0.5 = [0.4, 0.6, 0]
    assert torch.allclose(R.alim_targets(pred, Y, 0.0, "scale"), L.masked_prediction(pred, Y))
    assert torch.allclose(R.alim_targets(pred, Y, 0.0, "scale"), t([[0.4, 0.6, 0.0]]))
    # lam 1: the raw prediction
    assert torch.allclose(R.alim_targets(pred, Y, 1.0, "scale"), pred)


def test_alim_onehot_out_of_S_loses_and_wins():
    pred, Y = t(PRED), torch.tensor(YS)
    # lam 0.5: max in S 0.3 vs 0.5 * 0.5 = 0.25 outside -> class 1 (inside) wins
    assert R.alim_targets(pred, Y, 0.5).tolist() == [[0.0, 1.0, 0.0]]
    # lam 0.8: 0.8 * 0.5 = 0.4 > 0.3 -> class 2 (outside S) wins
    assert R.alim_targets(pred, Y, 0.8).tolist() == [[0.0, 0.0, 1.0]]
    # same rule for the pseudo-labels of the prototypes / contrastive mask
    assert R.alim_pseudo_labels(pred, Y, 0.5).tolist() == [1]
    assert R.alim_pseudo_labels(pred, Y, 0.8).tolist() == [2]


def test_alim_update_targets_by_hand_and_empty_row():
    conf = t([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    pred = t([PRED[0], PRED[0]])
    Y = torch.tensor([YS[0], [0, 0, 0]])
    new = R.alim_update_targets(conf, pred, Y, lam=0.8, momentum=0.9)
    # row 0: onehot class 2 -> 0.9 [.5, .5, 0] + 0.1 [0, 0, 1] = [.45, .45, .1]
    # row 1: empty S -> unchanged
    assert torch.allclose(new, t([[0.45, 0.45, 0.1], [0.0, 0.0, 0.0]]), atol=1e-12)
    # stateless targets of an empty row: no constraint -> pred itself (no NaN), for lam 0 too
    for lam in (0.0, 0.5):
        assert torch.allclose(R.alim_targets(pred[1:], Y[1:], lam, "scale"), pred[1:])
        assert R.alim_targets(pred[1:], Y[1:], lam).tolist() == [[0.0, 0.0, 1.0]]


def test_alim_margin_and_lambda_quantile():
    pred = t([PRED[0], [0.5, 0.5, 0.0], [0.1, 0.1, 0.8]])
    Y = torch.tensor([YS[0], [1, 1, 1], [0, 0, 0]])
    m = R.alim_margin(pred, Y)
    # row 0: 0.3 / (1e-9 + 0.5); row 1: full S -> 0.5 / 1e-9; row 2: empty S -> 0 / 0.8 = 0
    assert m[0].item() == pytest.approx(0.3 / (1e-9 + 0.5))
    assert m[1].item() == pytest.approx(0.5 / 1e-9)
    assert m[2].item() == 0.0
    margins = t([0.6, 2.0, 0.1, 1.5, 0.9])  # sorted: [0.1, 0.6, 0.9, 1.5, 2.0]
    assert R.alim_lambda_from_margins(margins, 0.2) == pytest.approx(0.6)  # index int(1.0) = 1
    assert R.alim_lambda_from_margins(margins, 0.5) == pytest.approx(0.9)  # index int(2.5) = 2
    assert R.alim_lambda_from_margins(margins, 0.7) == pytest.approx(1.0)  # 1.5 clipped by max1
    assert R.alim_lambda_from_margins(margins, 0.7, max1=False) == pytest.approx(1.5)
    assert R.alim_lambda_from_margins(margins, 0.0) == 0.0
    # end to end: margins [0.6, 5e8, 0] sorted [0, 0.6, 5e8]; noise 0.4 -> index int(1.2) = 1
    assert R.alim_lambda(pred, Y, 0.4) == pytest.approx(0.3 / (1e-9 + 0.5))


def test_alim_mixup_and_total_loss():
    # logits [0, ln3] -> log p = [ln 1/4, ln 3/4]; mixed target 0.75 [1,0] + 0.25 [0,1] = [.75, .25]
    # loss = -(.75 ln(1/4) + .25 ln(3/4)) = 1.5 ln2 + .25 (2 ln2 - ln3) = 2 ln2 - .25 ln3
    loss = R.alim_mixup_loss(t([[0.0, LN3]]), t([[1.0, 0.0]]), t([[0.0, 1.0]]), 0.75)
    assert loss.item() == pytest.approx(2 * LN2 - 0.25 * LN3, abs=1e-12)
    # 1 + 0.5 * 2 + 1 * 3 = 5
    assert R.alim_total_loss(t(1.0), t(2.0), t(3.0)).item() == pytest.approx(5.0)


# ---------------------------------------------------------------------------
# DivideMix
# ---------------------------------------------------------------------------

def test_dividemix_semi_loss_by_hand():
    lx_in, tx = torch.zeros(1, 2, dtype=torch.float64), t([[1.0, 0.0]])
    lu_in, tu = t([[0.0, LN3]]), t([[0.0, 1.0]])
    # Lx = -ln(1/2) = ln2; softmax_u = [1/4, 3/4] -> Lu = ((1/4)^2 + (1/4)^2) / 2 = 1/16
    # lamb = 25 * clip((18 - 10) / 16, 0, 1) = 12.5
    Lx, Lu, lamb = R.dividemix_semi_loss(lx_in, tx, lu_in, tu, 25.0, 18, 10)
    assert Lx.item() == pytest.approx(LN2, abs=1e-12)
    assert Lu.item() == pytest.approx(1 / 16, abs=1e-12)
    assert lamb == pytest.approx(12.5)
    assert R.dividemix_semi_loss(lx_in, tx, lu_in, tu, 25.0, 5, 10)[2] == 0.0
    assert R.dividemix_semi_loss(lx_in, tx, lu_in, tu, 25.0, 30.5, 10)[2] == pytest.approx(25.0)
    # same as losses.label_space_loss's parts (the reuse)
    _, lx2, lu2 = L.label_space_loss(lx_in, tx, lu_in, tu, 25.0, 0.5)
    assert Lx.item() == lx2.item() and Lu.item() == lu2.item()


def test_dividemix_prior_penalty_by_hand():
    # softmax rows [1/4, 3/4] and [1/2, 1/2] -> mean [3/8, 5/8]; prior [1/2, 1/2]
    # 0.5 ln(0.5 / (3/8)) + 0.5 ln(0.5 / (5/8)) = 0.5 ln(4/3) + 0.5 ln(4/5) = 0.5 ln(16/15)
    pen = R.dividemix_prior_penalty(t([[0.0, LN3], [0.0, 0.0]]))
    assert pen.item() == pytest.approx(0.5 * math.log(16 / 15), abs=1e-12)
    # a uniform mean prediction gives 0
    assert R.dividemix_prior_penalty(torch.zeros(3, 4)).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError):
        R.dividemix_prior_penalty(torch.zeros(0, 4))
