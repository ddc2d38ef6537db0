"""coreg_dist.gmm against scikit-learn, and split-data (simulated ranks) equivalence."""
import threading
import warnings

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from coreg_dist.gmm import (GMM1D, fit_gmm_1d, init_gmm_from_labels, kmeans_1d,
                            posterior_low_mean)

SK_KW = dict(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4)


def separated(seed):
    r = np.random.default_rng(seed)
    return np.concatenate([r.normal(0, 1, 1400), r.normal(6, 0.5, 600)])


def overlapping(seed):
    r = np.random.default_rng(seed)
    return np.concatenate([r.normal(0, 1, 1000), r.normal(1.5, 1, 1000)])


def division_like(seed):
    """Min-max normalised losses: a big mass near 0 (clean) and a long tail (noisy)."""
    r = np.random.default_rng(seed)
    d = np.concatenate([r.exponential(0.03, 8000), r.beta(2, 3, 2000)])
    return (d - d.min()) / (d.max() - d.min())


def sk_fit(x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMixture(**SK_KW, **kw).fit(x.reshape(-1, 1))


def sk_sorted(sk):
    o = np.argsort(sk.means_.ravel())
    return sk.weights_[o], sk.means_.ravel()[o], sk.covariances_.ravel()[o]


def ours_sorted(g):
    o = np.argsort(g.means)
    return g.weights[o], g.means[o], g.variances[o]


def sk_low_posterior(sk, x):
    return sk.predict_proba(x.reshape(-1, 1))[:, int(np.argmin(sk.means_.ravel()))]


@pytest.mark.parametrize("make,seed", [(separated, 0), (separated, 1), (division_like, 0),
                                       (division_like, 1), (division_like, 2), (overlapping, 0)])
def test_matches_sklearn_default(make, seed):
    x = make(seed)
    g, info = fit_gmm_1d(x, max_iter=10, tol=1e-2, reg_covar=5e-4)
    sk = sk_fit(x, random_state=0)
    scale = x.std()
    for a, b in zip(ours_sorted(g), sk_sorted(sk)):
        np.testing.assert_allclose(a, b, atol=1e-2 * max(scale, 1.0))
    p = posterior_low_mean(g, x)
    ps = sk_low_posterior(sk, x)
    assert np.abs(p - ps).max() < 0.02
    assert np.mean((p > 0.5) == (ps > 0.5)) > 0.99
    assert info["n"] == x.size and 1 <= info["n_iter"] <= 10


@pytest.mark.parametrize("make,seed", [(separated, 3), (overlapping, 1), (overlapping, 5),
                                       (division_like, 4)])
def test_exact_parity_with_sklearn_given_same_init(make, seed):
    """sklearn started from our k-means init (weights/means/precisions_init) follows the same EM."""
    x = make(seed)
    g, info = fit_gmm_1d(x)
    init = info["init"]
    sk = sk_fit(x, random_state=0, **init.sklearn_init())
    np.testing.assert_allclose(g.weights, sk.weights_, rtol=0, atol=1e-10)
    np.testing.assert_allclose(g.means, sk.means_.ravel(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(g.variances, sk.covariances_.ravel(), rtol=0, atol=1e-10)
    assert info["n_iter"] == sk.n_iter_
    assert info["converged"] == sk.converged_
    assert info["lower_bound"] == pytest.approx(sk.lower_bound_, abs=1e-10)
    np.testing.assert_allclose(posterior_low_mean(g, x), sk_low_posterior(sk, x), atol=1e-9)
    # max_iter=0 returns the init itself
    g0, info0 = fit_gmm_1d(x, max_iter=0)
    np.testing.assert_allclose(g0.means, init.means)
    assert info0["n_iter"] == 0


def test_init_matches_sklearn_initialize_from_same_labels():
    """The initial M-step reproduces sklearn's _initialize (hard resp, N_k + 10 eps, w = N_k / n)."""
    x = division_like(7)
    _, labels, _ = kmeans_1d(x)
    g = init_gmm_from_labels(x, labels, n_total=x.size, reg_covar=5e-4)
    sk = GaussianMixture(**SK_KW)
    sk.reg_covar = 5e-4
    resp = np.zeros((x.size, 2))
    resp[np.arange(x.size), labels] = 1
    sk._initialize(x.reshape(-1, 1), resp)
    np.testing.assert_allclose(g.weights, sk.weights_, atol=1e-14)
    np.testing.assert_allclose(g.means, sk.means_.ravel(), atol=1e-14)
    np.testing.assert_allclose(g.variances, sk.covariances_.ravel(), atol=1e-14)


def test_kmeans_fixed_point_matches_sklearn_lloyd():
    x = overlapping(1)
    c, labels, _ = kmeans_1d(x)
    km = KMeans(2, n_init=1, random_state=0, tol=0.0).fit(x.reshape(-1, 1))
    np.testing.assert_allclose(np.sort(c), np.sort(km.cluster_centers_.ravel()), atol=1e-12)
    # labels agree up to the component order
    kl = km.labels_ if np.argmin(km.cluster_centers_.ravel()) == np.argmin(c) else 1 - km.labels_
    assert np.array_equal(labels, kl)
    # sklearn's stopping rule is available too
    c2, _, it2 = kmeans_1d(x, tol=1e-4)
    assert it2 <= 300 and np.all(np.isfinite(c2))


# ---------------------------------------------------------------------------
# Simulated ranks: each thread holds a chunk, allreduce = barrier-synchronised sum
# ---------------------------------------------------------------------------

class ThreadAllReduce:
    def __init__(self, world):
        self.world = world
        self.slots = [None] * world
        self.barrier = threading.Barrier(world)
        self.calls = [0] * world

    def for_rank(self, rank):
        def allreduce(a):
            self.calls[rank] += 1
            self.slots[rank] = np.array(a, dtype=np.float64, copy=True)
            self.barrier.wait()
            total = np.zeros_like(self.slots[0])
            for s in self.slots:          # fixed order: every rank gets the same bits
                total = total + s
            self.barrier.wait()           # nobody overwrites a slot before all have read
            return total
        return allreduce


def fit_split(chunks, **kw):
    ar = ThreadAllReduce(len(chunks))
    results = [None] * len(chunks)
    errors = []

    def run(rank):
        try:
            results[rank] = fit_gmm_1d(chunks[rank], allreduce=ar.for_rank(rank), **kw)
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)
            ar.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(chunks))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    assert len(set(ar.calls)) == 1  # every rank made the same sequence of collective calls
    return results


@pytest.mark.parametrize("make,seed", [(separated, 0), (overlapping, 2), (division_like, 3)])
def test_split_into_three_ranks_equals_unsplit(make, seed):
    x = make(seed)
    rng = np.random.default_rng(seed)
    x = x[rng.permutation(x.size)]
    g_full, info_full = fit_gmm_1d(x)
    for cuts in ([x.size // 3, 2 * x.size // 3], [17, 17], [0, x.size - 5]):  # incl. an empty rank
        chunks = np.split(x, cuts)
        results = fit_split(chunks)
        g0 = results[0][0]
        for g, info in results:
            # identical on every rank
            assert np.array_equal(g.means, g0.means) and np.array_equal(g.variances, g0.variances)
            assert np.array_equal(g.weights, g0.weights)
            assert info["n_iter"] == info_full["n_iter"] and info["n"] == x.size
            assert info["kmeans_iter"] == info_full["kmeans_iter"]
        np.testing.assert_allclose(g0.means, g_full.means, rtol=0, atol=1e-10)
        np.testing.assert_allclose(g0.variances, g_full.variances, rtol=0, atol=1e-10)
        np.testing.assert_allclose(g0.weights, g_full.weights, rtol=0, atol=1e-10)
        assert results[0][1]["lower_bound"] == pytest.approx(info_full["lower_bound"], abs=1e-10)
        post = np.concatenate([posterior_low_mean(g0, c) for c in chunks])
        np.testing.assert_allclose(post, posterior_low_mean(g_full, x), atol=1e-10)


# ---------------------------------------------------------------------------
# Input types and small cases
# ---------------------------------------------------------------------------

def test_torch_input_and_posterior_types():
    x = division_like(5)
    xt = torch.tensor(x, dtype=torch.float32)
    g_np, _ = fit_gmm_1d(x.astype(np.float32).astype(np.float64))
    g_t, _ = fit_gmm_1d(xt)
    np.testing.assert_allclose(g_t.means, g_np.means, atol=1e-12)
    p = posterior_low_mean(g_t, xt)
    assert isinstance(p, torch.Tensor) and p.dtype == torch.float32 and p.shape == xt.shape
    assert p.device == xt.device
    pn = posterior_low_mean(g_t, x)
    assert isinstance(pn, np.ndarray) and pn.dtype == np.float64
    # the low-mean component is the clean one: small losses -> high posterior
    assert pn[np.argmin(x)] > 0.9 and pn[np.argmax(x)] < 0.1
    np.testing.assert_allclose(g_t.predict_proba(x).sum(1), 1.0, atol=1e-12)


def test_low_component_selection_is_by_mean():
    g = GMM1D(weights=[0.5, 0.5], means=[3.0, -1.0], variances=[1.0, 1.0])
    assert g.low == 1
    p = posterior_low_mean(g, np.array([-1.0, 3.0]))
    assert p[0] > 0.95 and p[1] < 0.05


def test_constant_and_tiny_inputs_are_finite():
    g, info = fit_gmm_1d(np.full(50, 0.3))
    assert np.all(np.isfinite(g.means)) and np.all(np.isfinite(g.variances)) and np.all(g.variances > 0)
    assert np.all(np.isfinite(posterior_low_mean(g, np.full(50, 0.3))))
    g2, _ = fit_gmm_1d(np.array([0.0, 1.0]))
    assert np.all(np.isfinite(g2.means))
    with pytest.raises(ValueError):
        fit_gmm_1d(np.array([]))
