"""Two-component 1-D Gaussian mixture fitted by EM over sufficient statistics.

Co-divide (docs/coreg-method.md 2.2 step 5) fits ``GaussianMixture(n_components=2,
max_iter=10, tol=1e-2, reg_covar=5e-4)`` to the (min-max normalised, 5-epoch
averaged) division losses and keeps the posterior of the low-mean component.
This module reimplements that fit so it can run on data split across ranks:

* every rank holds a slice ``x`` of the data and computes *local* sums
  (counts, sums, centred sums of squares, log-likelihood sums ...);
* an ``allreduce`` callable turns a float64 vector of local sums into the
  global sums (identity when None, i.e. one process holds all data);
* every decision (centres, parameters, convergence, stopping) is taken from
  global sums only, so all ranks follow the same path and end with the same
  GMM, equal (up to float summation order) to the single-process fit.

``allreduce`` contract: ``allreduce(a: np.ndarray[float64]) -> np.ndarray`` returns
the element-wise sum of ``a`` over all ranks (e.g. wrap
``torch.distributed.all_reduce(t, op=SUM)`` on a float64 tensor). All ranks must
call :func:`fit_gmm_1d` together; it makes the same sequence of allreduce calls on
every rank. A rank may hold zero samples.

Algorithm (mirrors scikit-learn 1.x ``GaussianMixture`` with
``covariance_type='full'`` on 1-D data, ``n_init=1``):

1. Init ("kmeans"): 1-D k-means (Lloyd) on global sums, then one M-step from
   the hard assignments: ``N_k = count_k + 10*eps``, ``mu_k = sum x / N_k``,
   ``var_k = sum (x - mu_k)^2 / N_k + reg_covar``, ``w_k = N_k / n``.
   scikit-learn seeds k-means with k-means++ (random); here the two Lloyd
   centres start at ``mean -/+ std`` of the data [D] - deterministic and
   computable from sums (a global min/max would need a max-reduction), and
   Lloyd runs to its fixed point (sklearn stops once the centre shift is below
   1e-4 * var, at a start-dependent place). Where sklearn's k-means reaches the
   same partition (well-separated data, the division-loss shape) the fits agree
   to rounding; on strongly overlapping data, where a 10-iteration, tol=1e-2 EM
   stays near its start, they can differ by a few 1e-2 in the posteriors - as
   do sklearn fits with different ``random_state``.
2. EM, for ``n_iter = 1..max_iter``: E-step with the current parameters
   (responsibilities ``r_ik``, ``lower_bound = mean_i log sum_k w_k N(x_i|k)``),
   M-step ``N_k = sum_i r_ik + 10*eps``, ``mu_k = sum_i r_ik x_i / N_k``,
   ``var_k = sum_i r_ik (x_i - mu_k)^2 / N_k + reg_covar`` (centred second pass,
   as scikit-learn, no cancellation), ``w_k = N_k / sum N``; stop when
   ``|lower_bound - previous| < tol`` (the first iteration compares with -inf).
   The returned parameters are those after the last M-step, as in scikit-learn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np

try:  # torch is optional for this module
    import torch
except Exception:  # pragma: no cover
    torch = None

AllReduce = Callable[[np.ndarray], np.ndarray]
ArrayLike = Union[np.ndarray, "torch.Tensor", Sequence[float]]

_EPS10 = 10.0 * np.finfo(np.float64).eps
_LOG_2PI = math.log(2.0 * math.pi)

__all__ = [
    "GMM1D",
    "fit_gmm_1d",
    "posterior_low_mean",
    "kmeans_1d",
    "init_gmm_from_labels",
    "estimate_log_prob",
    "e_step",
    "first_moment_stats",
    "second_moment_stats",
    "m_step",
]


@dataclass
class GMM1D:
    """Parameters of a 2-component 1-D Gaussian mixture (float64 arrays of shape (2,))."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray

    def __post_init__(self):
        self.weights = np.asarray(self.weights, dtype=np.float64).reshape(-1)
        self.means = np.asarray(self.means, dtype=np.float64).reshape(-1)
        self.variances = np.asarray(self.variances, dtype=np.float64).reshape(-1)

    @property
    def low(self) -> int:
        """Index of the component with the smaller mean (the "clean" one)."""
        return int(np.argmin(self.means))

    def predict_proba(self, x: ArrayLike) -> np.ndarray:
        """(n, 2) posteriors for the local data ``x``."""
        resp, _ = e_step(self, _to_numpy(x))
        return resp

    def sklearn_init(self) -> dict:
        """kwargs (weights_init, means_init, precisions_init) for sklearn's GaussianMixture."""
        return dict(weights_init=self.weights.copy(), means_init=self.means.reshape(2, 1).copy(),
                    precisions_init=(1.0 / self.variances).reshape(2, 1, 1))


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def _reduce(allreduce: Optional[AllReduce], a: Sequence[float]) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    out = (allreduce or _identity)(arr)
    return np.asarray(out, dtype=np.float64).reshape(arr.shape)


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy().reshape(-1)
    return np.asarray(x, dtype=np.float64).reshape(-1)


# ---------------------------------------------------------------------------
# Local building blocks (no communication)
# ---------------------------------------------------------------------------

def estimate_log_prob(gmm: GMM1D, x: np.ndarray) -> np.ndarray:
    """(n, 2) ``log w_k + log N(x | mu_k, var_k)``, in scikit-learn's precision-Cholesky form."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, 1)
    prec_chol = 1.0 / np.sqrt(gmm.variances)                         # (2,)
    y = x * prec_chol[None, :] - (gmm.means * prec_chol)[None, :]
    return -0.5 * (_LOG_2PI + y * y) + np.log(prec_chol)[None, :] + np.log(gmm.weights)[None, :]


def e_step(gmm: GMM1D, x: np.ndarray) -> Tuple[np.ndarray, float]:
    """Local E-step: responsibilities (n, 2) and the local sum of ``log sum_k w_k N(x|k)``."""
    wlp = estimate_log_prob(gmm, x)
    if wlp.shape[0] == 0:
        return np.zeros((0, 2)), 0.0
    mx = wlp.max(axis=1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    lpn = np.log(np.exp(wlp - mx).sum(axis=1, keepdims=True)) + mx     # (n, 1)
    resp = np.exp(wlp - lpn)
    return resp, float(lpn.sum())


def first_moment_stats(x: np.ndarray, resp: np.ndarray) -> np.ndarray:
    """Local ``[sum r_0, sum r_1, sum r_0 x, sum r_1 x]``."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    return np.concatenate([resp.sum(axis=0), resp.T @ x])


def second_moment_stats(x: np.ndarray, resp: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Local centred ``[sum r_0 (x - mu_0)^2, sum r_1 (x - mu_1)^2]`` (global ``means``)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, 1)
    d = x - np.asarray(means, dtype=np.float64)[None, :]
    return (resp * d * d).sum(axis=0)


def m_step(first: np.ndarray, second_fn: Callable[[np.ndarray], np.ndarray], reg_covar: float,
           weight_norm: Optional[float] = None) -> GMM1D:
    """M-step from *global* first-moment sums.

    ``first`` = global ``[N_0, N_1, S_0, S_1]``; ``second_fn(means)`` must return the
    global centred second moments for those means (it performs the allreduce).
    Weights are ``N_k / weight_norm`` (``n`` at init, as scikit-learn's
    ``_initialize``) or ``N_k / sum N`` when ``weight_norm`` is None (its ``_m_step``).
    """
    nk = first[:2] + _EPS10
    means = first[2:4] / nk
    ss = second_fn(means)
    variances = ss / nk + reg_covar
    weights = nk / (nk.sum() if weight_norm is None else weight_norm)
    return GMM1D(weights=weights, means=means, variances=variances)


# ---------------------------------------------------------------------------
# Distributed-ready drivers
# ---------------------------------------------------------------------------

def _global_mean_std(x: np.ndarray, allreduce: Optional[AllReduce]) -> Tuple[float, float, float]:
    n, s = _reduce(allreduce, [x.size, x.sum()])
    if n <= 0:
        raise ValueError("fit_gmm_1d: no data on any rank")
    mean = s / n
    ss = _reduce(allreduce, [((x - mean) ** 2).sum()])[0]
    return float(n), float(mean), float(math.sqrt(ss / n))


def kmeans_1d(x: ArrayLike, *, allreduce: Optional[AllReduce] = None,
              centres: Optional[Sequence[float]] = None, max_iter: int = 300, tol: float = 0.0,
              _stats: Optional[Tuple[float, float, float]] = None):
    """2-means in 1-D by Lloyd iterations on global sums (scikit-learn's Lloyd semantics).

    Start centres: ``centres`` or ``(mean - std, mean + std)``. Each iteration assigns
    every local point to its nearest centre (ties to centre 0), all-reduces
    ``[n_0, n_1, sum_0, sum_1, n_changed]`` and moves the centres (an empty
    cluster keeps its centre). Stops when no label changes, or when the squared
    centre shift is ``<= tol * var(x)``; in the latter case labels are reassigned
    to the final centres. Returns ``(centres (2,), local labels (n,) int64, n_iter)``.

    ``tol=0`` (default) runs Lloyd to its fixed point, so the result does not
    depend on the start centres in the usual case [D]. scikit-learn's KMeans uses
    ``tol=1e-4`` and a random k-means++ start, i.e. it may stop slightly before
    the fixed point at a start-dependent place; pass ``tol=1e-4`` to use the same
    stopping rule.
    """
    x = _to_numpy(x)
    n, mean, std = _stats if _stats is not None else _global_mean_std(x, allreduce)
    tol_abs = tol * std * std
    c = np.array([mean - std, mean + std] if centres is None else centres, dtype=np.float64)
    labels_old = np.full(x.shape, -1, dtype=np.int64)
    labels = labels_old
    strict = False
    it = 0
    for it in range(1, max_iter + 1):
        labels = (np.abs(x - c[1]) < np.abs(x - c[0])).astype(np.int64)
        m1 = labels == 1
        changed = float(np.count_nonzero(labels != labels_old))
        tot = _reduce(allreduce, [np.count_nonzero(~m1), np.count_nonzero(m1),
                                  x[~m1].sum(), x[m1].sum(), changed])
        new = c.copy()
        for k in range(2):
            if tot[k] > 0:
                new[k] = tot[2 + k] / tot[k]
        shift = float(((new - c) ** 2).sum())
        c = new
        if tot[4] == 0:
            strict = True
            break
        if shift <= tol_abs:
            break
        labels_old = labels
    if not strict:
        labels = (np.abs(x - c[1]) < np.abs(x - c[0])).astype(np.int64)
    return c, labels, it


def init_gmm_from_labels(x: np.ndarray, labels: np.ndarray, *, n_total: float, reg_covar: float,
                         allreduce: Optional[AllReduce] = None) -> GMM1D:
    """scikit-learn's ``_initialize``: one M-step from hard responsibilities, weights ``N_k / n``."""
    x = _to_numpy(x)
    resp = np.zeros((x.size, 2))
    resp[np.arange(x.size), np.asarray(labels, dtype=np.int64)] = 1.0
    first = _reduce(allreduce, first_moment_stats(x, resp))
    return m_step(first, lambda mu: _reduce(allreduce, second_moment_stats(x, resp, mu)),
                  reg_covar, weight_norm=n_total)


def fit_gmm_1d(x: ArrayLike, *, max_iter: int = 10, tol: float = 1e-2, reg_covar: float = 5e-4,
               allreduce: Optional[AllReduce] = None,
               init: Union[str, GMM1D, Sequence[float]] = "kmeans",
               kmeans_tol: float = 0.0, kmeans_max_iter: int = 300) -> Tuple[GMM1D, dict]:
    """Fit a 2-component 1-D GMM to the (possibly distributed) data; see the module doc.

    ``x``: this rank's slice (1-D numpy array or torch tensor, any device/dtype).
    ``init``: "kmeans" (default), a length-2 sequence of k-means start centres,
    or a :class:`GMM1D` to start EM from directly (no k-means).
    ``kmeans_tol``/``kmeans_max_iter``: see :func:`kmeans_1d`.
    Returns ``(gmm, info)`` with ``info = {"n_iter", "converged", "lower_bound",
    "lower_bounds", "n", "kmeans_iter", "init"}``; ``gmm`` is identical on all ranks.
    """
    x = _to_numpy(x)
    stats = _global_mean_std(x, allreduce)
    n_total = stats[0]
    kmeans_iter = 0
    if isinstance(init, GMM1D):
        gmm = GMM1D(init.weights.copy(), init.means.copy(), init.variances.copy())
    else:
        centres = None if (isinstance(init, str) and init == "kmeans") else init
        if isinstance(centres, str):
            raise ValueError(f"unknown init {init!r}")
        _, labels, kmeans_iter = kmeans_1d(x, allreduce=allreduce, centres=centres, _stats=stats,
                                         max_iter=kmeans_max_iter, tol=kmeans_tol)
        gmm = init_gmm_from_labels(x, labels, n_total=n_total, reg_covar=reg_covar,
                                   allreduce=allreduce)
    init_gmm = GMM1D(gmm.weights.copy(), gmm.means.copy(), gmm.variances.copy())

    lower_bound = -np.inf
    lower_bounds = []
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        prev = lower_bound
        resp, lpn_sum = e_step(gmm, x)
        tot = _reduce(allreduce, np.concatenate([first_moment_stats(x, resp), [lpn_sum]]))
        gmm = m_step(tot[:4], lambda mu: _reduce(allreduce, second_moment_stats(x, resp, mu)),
                     reg_covar)
        lower_bound = float(tot[4] / n_total)
        lower_bounds.append(lower_bound)
        if abs(lower_bound - prev) < tol:
            converged = True
            break
    info = dict(n_iter=n_iter, converged=converged, lower_bound=lower_bound,
                lower_bounds=lower_bounds, n=int(n_total), kmeans_iter=kmeans_iter, init=init_gmm)
    return gmm, info


def posterior_low_mean(gmm: GMM1D, x: ArrayLike):
    """Posterior of the low-mean ("clean") component for the local data ``x``.

    Returns the same kind as ``x``: a numpy float64 array, or a torch tensor on
    ``x``'s device (``x``'s dtype if floating, else float32). Shape (n,).
    """
    p = e_step(gmm, _to_numpy(x))[0][:, gmm.low]
    if torch is not None and isinstance(x, torch.Tensor):
        dt = x.dtype if x.is_floating_point() else torch.float32
        return torch.as_tensor(p, dtype=dt).reshape(x.shape).to(x.device)
    return p.reshape(np.shape(x)) if np.ndim(x) > 0 else p
