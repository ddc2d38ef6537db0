"""Hand-computed checks of coreg_dist.rules.pll (PRODEN, RC/CC, LWS, CR-DPLL).

Expected numbers are worked out in the comments; where useful the authors' own formula
(written out inline, as in their repositories) is evaluated on the same tensors too.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from coreg_dist import losses as L
from coreg_dist.rules import pll

LN2, LN3 = math.log(2.0), math.log(3.0)


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float64, **kw)


# logits whose softmaxes are easy: softmax([0, ln2, ln3]) = [1, 2, 3] / 6,
# softmax([0, 0, ln2]) = [1, 1, 2] / 4.
LOGITS = [[0.0, LN2, LN3], [0.0, 0.0, LN2]]


# ---------------------------------------------------------------------------
# PRODEN / RC
# ---------------------------------------------------------------------------

def test_proden_init_uniform_over_S_and_empty_row_uniform_over_all():
    Y = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 0, 1]])
    # |S| = 2 -> 1/2 on S; empty -> 1/3 everywhere; |S| = 1 -> one-hot
    expected = t([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 1.0]])
    out = pll.proden_init(Y, dtype=torch.float64)
    assert torch.allclose(out, expected, atol=1e-15)


def test_proden_loss_by_hand_and_grad_not_through_conf():
    logits = t(LOGITS, requires_grad=True)
    conf = t([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], requires_grad=True)
    # row 0: -(.5 ln(1/6) + .5 ln(1/3)) = .5 ln6 + .5 ln3 ; row 1: -ln(1/2) = ln2 ; mean of both
    expected = (0.5 * math.log(6) + 0.5 * LN3 + LN2) / 2
    loss = pll.proden_loss(logits, conf)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # the authors' partial_loss / rc_loss: -sum(target * log softmax) / B
    ref = -(conf * torch.log(torch.softmax(logits, 1))).sum() / 2
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
    loss.backward()
    # d/dz = (softmax - conf) / B ; row 0: ([1/6, 2/6, 3/6] - [.5, .5, 0]) / 2
    assert torch.allclose(logits.grad[0], t([-1 / 6, -1 / 12, 1 / 4]), atol=1e-12)
    assert conf.grad is None


def test_proden_update_by_hand():
    logits = t(LOGITS + [[0.0, 0.0, 0.0], [0.0, -1000.0, -1000.0]], requires_grad=True)
    Y = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0], [0, 1, 1]])
    out = pll.proden_update(logits, Y)
    expected = t([
        [1 / 3, 2 / 3, 0.0],          # [1/6, 2/6] / (1/2)
        [0.0, 1 / 3, 2 / 3],          # [1/4, 2/4] / (3/4)
        [1 / 3, 1 / 3, 1 / 3],        # empty S -> uniform over all classes
        [0.0, 0.5, 0.5],              # candidate mass exp(-1000) == 0 -> uniform over S
    ])
    assert torch.allclose(out, expected, atol=1e-12)
    assert not out.requires_grad
    # the authors' formula on the rows where it is defined
    p = torch.softmax(logits.detach(), 1)[:2] * Y[:2]
    assert torch.allclose(out[:2], p / p.sum(1, keepdim=True), atol=1e-15)


# ---------------------------------------------------------------------------
# CC
# ---------------------------------------------------------------------------

def test_cc_loss_by_hand_full_row_counts_in_mean():
    logits = t(LOGITS, requires_grad=True)
    Y = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: -ln(1/6 + 2/6) = ln2 ; row 1 (full S): -ln 1 = 0 ; mean over BOTH rows = ln2 / 2
    loss = pll.cc_loss(logits, Y)
    assert loss.item() == pytest.approx(LN2 / 2, abs=1e-12)
    # the authors' cc_loss: -log((softmax * Y).sum(1)).mean()
    ref = -torch.log((torch.softmax(logits, 1) * Y).sum(1)).mean()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
    # partial_ce skips the full row (mean over 1 row) and adds eps: not the same function
    assert L.partial_ce(logits, Y).item() == pytest.approx(-math.log(0.5 + 1e-5), abs=1e-12)
    loss.backward()
    # d/dz = (p - q) / B with q = p restricted to S: ([1/6,1/3,1/2] - [1/3,2/3,0]) / 2
    assert torch.allclose(logits.grad[0], t([-1 / 12, -1 / 6, 1 / 4]), atol=1e-12)
    assert torch.allclose(logits.grad[1], torch.zeros(3, dtype=torch.float64), atol=1e-12)


def test_cc_loss_equals_partial_ce_up_to_eps_without_full_rows():
    logits = t(LOGITS)
    Y = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # masses 1/2 and 1/4 -> (ln2 + ln4) / 2 = 1.5 ln2
    assert pll.cc_loss(logits, Y).item() == pytest.approx(1.5 * LN2, abs=1e-12)
    # partial_ce = (-ln(.5 + 1e-5) - ln(.25 + 1e-5)) / 2: differs by < 1e-4 only through eps
    assert pll.cc_loss(logits, Y).item() == pytest.approx(L.partial_ce(logits, Y).item(), abs=1e-4)


def test_cc_loss_empty_row_and_underflow_are_finite():
    logits = t([[0.0, -2000.0], [0.3, -0.7]])
    Y = torch.tensor([[0, 1], [0, 0]])
    # row 0: -log softmax_1 = logsumexp(0, -2000) + 2000 = 2000 (authors' log(0) = inf)
    # row 1: empty S -> S = all classes -> 0
    loss = pll.cc_loss(logits, Y)
    assert loss.item() == pytest.approx(1000.0, abs=1e-9)


# ---------------------------------------------------------------------------
# LWS
# ---------------------------------------------------------------------------

def _authors_lws(outputs, partialY, confidence, lw_weight, lw_weight0):
    """hongwei-wen/LW-loss-for-partial-label utils_loss.lws_loss (piecewise sigmoids), inline."""
    onezero = (partialY > 0).to(outputs.dtype)
    sig1 = torch.full_like(outputs, 0.5)
    sig1[outputs < 0] = 1 / (1 + torch.exp(outputs[outputs < 0]))
    sig1[outputs > 0] = torch.exp(-outputs[outputs > 0]) / (1 + torch.exp(-outputs[outputs > 0]))
    sig2 = torch.full_like(outputs, 0.5)
    sig2[outputs > 0] = 1 / (1 + torch.exp(-outputs[outputs > 0]))
    sig2[outputs < 0] = torch.exp(outputs[outputs < 0]) / (1 + torch.exp(outputs[outputs < 0]))
    l1 = (confidence * onezero * sig1).sum() / outputs.shape[0]
    l2 = (confidence * (1 - onezero) * sig2).sum() / outputs.shape[0]
    return lw_weight0 * l1 + lw_weight * l2


def test_lws_init_uniform_over_all_classes():
    Y = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    expected = torch.full((2, 4), 0.25, dtype=torch.float64)   # 1/C for every class
    assert torch.allclose(pll.lws_init(Y, dtype=torch.float64), expected)


def test_lws_loss_by_hand():
    logits = t([[0.0, LN3, -LN3], [LN3, 0.0, 0.0]], requires_grad=True)
    Y = torch.tensor([[1, 1, 0], [0, 0, 1]])
    conf = t([[1 / 3, 1 / 3, 1 / 3], [0.2, 0.3, 0.5]], requires_grad=True)
    # sigmoid(0) = 1/2, sigmoid(ln3) = 3/4, sigmoid(-ln3) = 1/4
    # row 0: l1 = 1/3 (s(-0) + s(-ln3)) = 1/3 (1/2 + 1/4) = 1/4 ; l2 = 1/3 s(-ln3) = 1/12
    # row 1: l1 = .5 s(-0) = 1/4 ; l2 = .2 s(ln3) + .3 s(0) = .15 + .15 = .3
    # l1 = (1/4 + 1/4) / 2 = 1/4 ; l2 = (1/12 + 3/10) / 2 = 23/120
    total, t1, t2 = pll.lws_loss(logits, Y, conf, lw_weight=2.0, lw_weight0=1.0)
    assert t1.item() == pytest.approx(0.25, abs=1e-12)
    assert t2.item() == pytest.approx(2 * 23 / 120, abs=1e-12)
    assert total.item() == pytest.approx(0.25 + 46 / 120, abs=1e-12)   # = 19/30
    ref = _authors_lws(logits.detach(), Y, conf.detach(), 2.0, 1.0)
    assert total.item() == pytest.approx(ref.item(), abs=1e-12)
    # defaults lw_weight = lw_weight0 = 1
    assert pll.lws_loss(logits, Y, conf)[0].item() == pytest.approx(0.25 + 23 / 120, abs=1e-12)
    total.backward()
    # d/dz [conf s(-z)] = -conf s(z)(1 - s(z)); row 0 class 0: -(1/3)(1/4) / B(=2) = -1/24
    # d/dz [lw conf s(z)] = lw conf s(z)(1 - s(z)); row 0 class 2: 2 (1/3)(3/16) / 2 = 1/16
    assert logits.grad[0, 0].item() == pytest.approx(-1 / 24, abs=1e-12)
    assert logits.grad[0, 2].item() == pytest.approx(1 / 16, abs=1e-12)
    assert conf.grad is None


def test_lws_update_by_hand():
    logits = t(LOGITS + [[0.0, LN2, LN3], [0.0, LN2, LN3]])
    Y = torch.tensor([[1, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0]])
    eps3 = 3e-8   # the authors' (w + 1e-8).sum(1) over C = 3 classes
    out = pll.lws_update(logits, Y)
    expected = t([
        # p = [1/6, 2/6, 3/6]: S part / (1/2 + 3e-8), non-S part (1/2) / (1/2 + 3e-8)
        [(1 / 6) / (0.5 + eps3), (2 / 6) / (0.5 + eps3), 0.5 / (0.5 + eps3)],
        # p = [1/4, 1/4, 2/4], S = {2}: 1/2 / (1/2 + eps); non-S: [1/4, 1/4] / (1/2 + eps)
        [0.25 / (0.5 + eps3), 0.25 / (0.5 + eps3), 0.5 / (0.5 + eps3)],
        # full S: p / (1 + 3e-8), no non-candidate part
        [(1 / 6) / (1 + eps3), (2 / 6) / (1 + eps3), (3 / 6) / (1 + eps3)],
        # empty S counts as full S
        [(1 / 6) / (1 + eps3), (2 / 6) / (1 + eps3), (3 / 6) / (1 + eps3)],
    ])
    assert torch.allclose(out, expected, atol=1e-15)
    assert not out.requires_grad
    # each part sums to ~1: row 0 -> S part 1, non-S part 1
    Yf = Y.double()
    assert torch.allclose((out * Yf).sum(1)[:3], torch.ones(3, dtype=torch.float64), atol=1e-7)
    assert torch.allclose((out * (1 - Yf)).sum(1)[:2], torch.ones(2, dtype=torch.float64),
                          atol=1e-7)


# ---------------------------------------------------------------------------
# CR-DPLL
# ---------------------------------------------------------------------------

def test_cr_dpll_lambda_schedule():
    # min(epoch / 100 * lam, lam), epoch 0-based
    assert pll.cr_dpll_lambda(0) == 0.0
    assert pll.cr_dpll_lambda(50) == pytest.approx(0.5)
    assert pll.cr_dpll_lambda(100) == 1.0
    assert pll.cr_dpll_lambda(150) == 1.0
    assert pll.cr_dpll_lambda(50, lam=2.0) == pytest.approx(1.0)
    for e in range(0, 201, 7):
        assert pll.cr_dpll_lambda(e, lam=3.0) == pytest.approx(min(e / 100 * 3.0, 3.0))


def _views(requires_grad=False):
    # view 0 (weak): the LOGITS rows ; views 1, 2 (strong): zero logits -> p = 1/3 everywhere
    v = t([LOGITS, [[0.0] * 3] * 2, [[0.0] * 3] * 2])
    return v.requires_grad_(requires_grad)


def test_cr_dpll_loss_by_hand():
    views = _views(requires_grad=True)
    Y = torch.tensor([[1, 1, 0], [0, 0, 1]])
    conf = t([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], requires_grad=True)
    # sup on view 0, non-candidates only:
    #   row 0: -ln(1.0000001 - 1/2) ; row 1: -2 ln(1.0000001 - 1/4)
    sup_exp = (-math.log(1.0000001 - 0.5) - 2 * math.log(1.0000001 - 0.25)) / 2
    # KL(conf || p), batchmean (sum over classes, / B):
    #   view 0: row 0 .5 ln(.5 / (1/6)) + .5 ln(.5 / (1/3)) = .5 ln3 + .5 ln1.5 ;
    #           row 1 ln(1 / .5) = ln2
    #   views 1, 2: row 0 2 * .5 ln(.5 / (1/3)) = ln1.5 ; row 1 ln(1 / (1/3)) = ln3
    kl0 = (0.5 * LN3 + 0.5 * math.log(1.5) + LN2) / 2
    kl12 = (math.log(1.5) + LN3) / 2
    cons_exp = kl0 + 2 * kl12
    total, sup, cons = pll.cr_dpll_loss(views, Y, conf, lam=0.5)
    assert sup.item() == pytest.approx(sup_exp, abs=1e-12)
    assert cons.item() == pytest.approx(cons_exp, abs=1e-12)
    assert total.item() == pytest.approx(sup_exp + 0.5 * cons_exp, abs=1e-12)
    # the authors' DPLL_train terms
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    ref_cons = sum(kl(torch.log_softmax(v, -1), conf.detach()) for v in views.detach())
    p0 = F.softmax(views.detach()[0], 1)
    ref_sup = -torch.mean(torch.sum(torch.log(1.0000001 - p0) * (1 - Y), 1))
    assert cons.item() == pytest.approx(ref_cons.item(), abs=1e-12)
    assert sup.item() == pytest.approx(ref_sup.item(), abs=1e-12)
    # a list of views gives the same
    total_list = pll.cr_dpll_loss(list(views.detach()), Y, conf, lam=0.5)[0]
    assert total_list.item() == pytest.approx(total.item(), abs=1e-12)
    total.backward()
    assert conf.grad is None
    assert views.grad[1].abs().sum() > 0


def test_cr_dpll_loss_lam_zero_only_weak_view_gets_grad():
    views = _views(requires_grad=True)
    Y = torch.tensor([[1, 1, 0], [0, 0, 1]])
    conf = pll.proden_init(Y, dtype=torch.float64)
    total, _, _ = pll.cr_dpll_loss(views, Y, conf, lam=0.0)
    total.backward()
    assert views.grad[0].abs().sum() > 0
    assert torch.all(views.grad[1:] == 0)


def test_cr_dpll_update_by_hand():
    views = _views(requires_grad=True)
    Y = torch.tensor([[1, 1, 0], [0, 1, 1]])
    out = pll.cr_dpll_update(views, Y)
    # prod_v p_v^(1/3): the strong views are uniform, so the row is prop. to p_0^(1/3)
    # row 0: (1/6)^(1/3) : (1/3)^(1/3) = 1 : 2^(1/3) on S = {0, 1}
    # row 1: (1/4)^(1/3) : (1/2)^(1/3) = 1 : 2^(1/3) on S = {1, 2}
    c = 2.0 ** (1 / 3)
    expected = t([[1 / (1 + c), c / (1 + c), 0.0], [0.0, 1 / (1 + c), c / (1 + c)]])
    assert torch.allclose(out, expected, atol=1e-12)
    assert not out.requires_grad
    # the authors' confidence_update
    p = torch.softmax(views.detach(), -1)
    rev = Y * p[0] ** (1 / 3) * p[1] ** (1 / 3) * p[2] ** (1 / 3)
    assert torch.allclose(out, rev / rev.sum(1, keepdim=True), atol=1e-14)


# ---------------------------------------------------------------------------
# Shared properties
# ---------------------------------------------------------------------------

def test_update_rows_zero_outside_S_sum_to_one_and_empty_rows_finite():
    g = torch.Generator().manual_seed(0)
    B, C = 6, 4
    logits = torch.randn(B, C, generator=g) * 5
    views = torch.randn(3, B, C, generator=g) * 5
    Y = (torch.rand(B, C, generator=g) < 0.5).float()
    Y[0] = 0.0          # empty candidate set
    Y[1] = 1.0          # full candidate set
    Y[2] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    for out in (pll.proden_update(logits, Y), pll.cr_dpll_update(views, Y)):
        assert torch.isfinite(out).all()
        assert torch.all(out[1:] * (1 - Y[1:]) == 0)
        assert torch.allclose(out.sum(1), torch.ones(B), atol=1e-6)
        assert torch.allclose(out[0], torch.full((C,), 1.0 / C))
    conf = pll.proden_init(Y)
    losses = [pll.proden_loss(logits, conf), pll.cc_loss(logits, Y),
              pll.lws_loss(logits, Y, pll.lws_init(Y))[0],
              pll.lws_loss(logits, Y, pll.lws_update(logits, Y))[0],
              *pll.cr_dpll_loss(views, Y, conf, lam=1.0)]
    assert all(torch.isfinite(x) for x in losses)
    assert torch.isfinite(pll.lws_update(logits, Y)).all()


def test_float32_inputs_work():
    logits = torch.tensor(LOGITS, dtype=torch.float32, requires_grad=True)
    Y = torch.tensor([[True, True, False], [False, False, True]])
    conf = pll.proden_init(Y)
    assert conf.dtype == torch.float32
    loss = (pll.proden_loss(logits, conf) + pll.cc_loss(logits, Y)
            + pll.lws_loss(logits, Y, pll.lws_init(Y))[0]
            + pll.cr_dpll_loss([logits, logits, logits], Y, conf, lam=1.0)[0])
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_shape_mismatches_raise():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="conf"):
        pll.proden_loss(logits, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="Y"):
        pll.proden_update(logits, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="Y"):
        pll.cc_loss(logits, torch.zeros(2))
    with pytest.raises(ValueError):
        pll.proden_loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="conf"):
        pll.lws_loss(logits, torch.ones(2, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="view"):
        pll.cr_dpll_update(torch.zeros(3, 2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="conf"):
        pll.cr_dpll_loss(torch.zeros(3, 2, 3), torch.ones(2, 3), torch.zeros(2, 4),
                         lam=1.0)
    with pytest.raises(ValueError):
        pll.proden_init(torch.ones(3))
