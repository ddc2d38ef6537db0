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
every rank (one per pass over the data, never one per chunk, so ranks may hold
different numbers of chunks). A rank may hold zero samples.

Input ``x`` (this rank's slice) is either

* an *array*: a 1-D numpy array, torch tensor (any device/dtype) or flat sequence
  of numbers, converted once to float64; or
* a *chunk source*: any re-iterable object other than an array/tensor whose
  ``iter()`` yields, on every call, the same 1-D chunks (numpy arrays or tensors,
  any float dtype) in the same order - a list of per-shard arrays,
  :class:`ArrayChunks` over an ``np.memmap``, :class:`Chunks` around a function
  that loads shard files lazily, or any object with such an ``__iter__``.
  A one-shot iterator (a generator) is rejected, since the fit needs many passes;
  wrap the function that makes it in :class:`Chunks`.

Memory: an array input is processed as a single chunk (converted to float64
whole - including an ``np.memmap`` passed directly, so wrap a memmap in
:class:`ArrayChunks`). For a chunk source every pass of the algorithm is a
loop over the chunks that accumulates a few local sums; nothing of length ``n``
is kept (k-means labels are recomputed from the centres, responsibilities from
the parameters), so the extra memory per rank is a few float64 arrays of the
largest chunk's length, independent of ``n``. The
price is passes over the data: 2 (mean/std) + one per Lloyd iteration + 2
(init) + 2 per EM iteration (the second-moment pass recomputes the E-step
instead of storing the responsibilities). A fit on chunks equals the fit on the
concatenated array up to float summation order.

Algorithm (mirrors scikit-learn 1.x ``GaussianMixture`` with
``covariance_type='full'`` on 1-D data, ``n_init=1``):

1. Init ("kmeans"): 1-D k-means (Lloyd) on global sums, then one M-step from
   the hard assignments to the final centres: ``N_k = count_k + 10*eps``,
   ``mu_k = sum x / N_k``, ``var_k = sum (x - mu_k)^2 / N_k + reg_covar``,
   ``w_k = N_k / n``.
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

import collections.abc
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

try:  # torch is optional for this module
    import torch
except Exception:  # pragma: no cover
    torch = None

AllReduce = Callable[[np.ndarray], np.ndarray]
ArrayLike = Union[np.ndarray, "torch.Tensor", Sequence[float]]
# Anything re-iterable yielding 1-D arrays/tensors (see the module doc), or an ArrayLike.
DataLike = Union[ArrayLike, Iterable[Any]]
# One pass over a rank's data as (chunk, responsibilities (c, 2), local log-likelihood sum).
RespPass = Callable[[], Iterable[Tuple[np.ndarray, np.ndarray, float]]]

_EPS10 = 10.0 * np.finfo(np.float64).eps
_LOG_2PI = math.log(2.0 * math.pi)

__all__ = [
    "GMM1D",
    "ArrayChunks",
    "Chunks",
    "fit_gmm_1d",
    "posterior_low_mean",
    "iter_posterior_low_mean",
    "kmeans_1d",
    "init_gmm_from_labels",
    "init_gmm_from_centres",
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

    @property
    def separation(self) -> float:
        """Ashman's D, |m1 - m2| * sqrt(2 / (v1 + v2)): how far apart the two components are in
        units of their spread. Above about 2 the mixture is bimodal; near 0 it is one bump split
        in two, and a division on it is arbitrary."""
        spread = max(float(self.variances.sum()), 1e-300)
        return float(abs(self.means[0] - self.means[1]) * np.sqrt(2.0 / spread))

    def predict_proba(self, x: DataLike):
        """(n, 2) posteriors for the local data ``x``; a list of per-chunk (n_c, 2) for a chunk source."""
        if _is_chunk_source(x):
            return [e_step(self, c)[0] for c in _as_chunks(x)]
        return e_step(self, _to_numpy(x))[0]

    def sklearn_init(self) -> dict:
        """kwargs (weights_init, means_init, precisions_init) for sklearn's GaussianMixture."""
        return dict(weights_init=self.weights.copy(), means_init=self.means.reshape(2, 1).copy(),
                    precisions_init=(1.0 / self.variances).reshape(2, 1, 1))


# ---------------------------------------------------------------------------
# Inputs: arrays and chunk sources
# ---------------------------------------------------------------------------

class ArrayChunks:
    """Re-iterable chunk source over a 1-D array: consecutive slices of ``chunk_size`` samples.

    Meant for an ``np.memmap`` (e.g. float32 per-sample losses on disk): slicing a
    memmap reads nothing, so only the chunk being worked on is read and converted
    to float64. Also works for an in-memory numpy array or torch tensor, to bound
    the fit's temporaries. The array must be 1-D (pass a 1-D view such as
    ``mm[:, j]``) because reshaping a non-contiguous memmap would copy all of it.
    """

    def __init__(self, array, chunk_size: int = 1 << 20):
        if len(array.shape) != 1:
            raise ValueError(f"ArrayChunks needs a 1-D array, got shape {tuple(array.shape)}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.array = array
        self.chunk_size = int(chunk_size)

    def __iter__(self) -> Iterator:
        n, step = self.array.shape[0], self.chunk_size
        return (self.array[i:i + step] for i in range(0, n, step))


class Chunks:
    """Re-iterable chunk source from ``make_iter``, a function returning a fresh iterable of chunks.

    Turns a one-shot generator into something every pass can iterate, e.g. per-shard
    files loaded one at a time: ``Chunks(lambda: (np.load(p) for p in shard_paths))``.
    """

    def __init__(self, make_iter: Callable[[], Iterable]):
        self.make_iter = make_iter

    def __iter__(self) -> Iterator:
        return iter(self.make_iter())


class _Float64Chunks(Chunks):
    """Internal normal form of any input: float64 1-D numpy chunks, converted one at a time."""

    def __init__(self, source: Iterable, chunked: bool):
        super().__init__(lambda: map(_to_numpy, source))
        self.chunked = chunked  # False: the caller passed one array (one chunk, already float64)


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy().reshape(-1)
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _is_scalar(v) -> bool:
    return isinstance(v, numbers.Number) or getattr(v, "ndim", None) == 0


def _is_chunk_source(x) -> bool:
    """Whether ``x`` is a chunk source rather than one array (see the module doc).

    Decided without converting ``x`` to an array: that would materialise a lazy source.
    """
    if isinstance(x, Chunks):
        return True
    if isinstance(x, (np.ndarray, np.generic, numbers.Number, str, bytes)):
        return False
    if torch is not None and isinstance(x, torch.Tensor):
        return False
    if isinstance(x, (list, tuple)):
        # A flat list of numbers is one array, as before chunked input existed.
        return not all(_is_scalar(v) for v in x)
    return hasattr(x, "__iter__")


def _as_chunks(x: DataLike) -> _Float64Chunks:
    """Normalise any input to a re-iterable of float64 chunks; an array becomes one chunk."""
    if isinstance(x, _Float64Chunks):
        return x
    if not _is_chunk_source(x):
        return _Float64Chunks([_to_numpy(x)], chunked=False)  # convert once, not on every pass
    if isinstance(x, collections.abc.Iterator):  # checked without iter(): that may open files
        raise TypeError("chunk source is a one-shot iterator, but the fit iterates the data many "
                        "times: pass a list, ArrayChunks, or Chunks(lambda: <new iterator>)")
    return _Float64Chunks(x, chunked=True)


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def _reduce(allreduce: Optional[AllReduce], a: Sequence[float]) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    out = (allreduce or _identity)(arr)
    return np.asarray(out, dtype=np.float64).reshape(arr.shape)


# ---------------------------------------------------------------------------
# Local building blocks on one array / chunk (no communication)
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


def _nearest_is_1(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Boolean k-means labels: True where centre 1 is strictly nearer (ties go to centre 0)."""
    return np.abs(x - centres[1]) < np.abs(x - centres[0])


def _one_hot(labels: np.ndarray) -> np.ndarray:
    """(n, 2) hard responsibilities from 0/1 (or boolean) labels."""
    return np.eye(2)[np.asarray(labels, dtype=np.int64).reshape(-1)]


# ---------------------------------------------------------------------------
# Streamed passes (one allreduce per pass)
# ---------------------------------------------------------------------------

class _DataStats(NamedTuple):
    n: float            # global
    mean: float         # global
    std: float          # global (population std, centred second pass)
    local_n: int
    local_min: float    # this rank only (nan when empty): global needs a max-reduction
    local_max: float


def _global_stats(xs: Iterable[np.ndarray], allreduce: Optional[AllReduce]) -> _DataStats:
    acc = np.zeros(2)
    lo, hi = math.inf, -math.inf
    for x in xs:
        acc += (x.size, x.sum())
        if x.size:  # min/max come free with this pass; empty chunks have none
            lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    local_n = int(acc[0])
    n, s = _reduce(allreduce, acc)
    if n <= 0:
        raise ValueError("fit_gmm_1d: no data on any rank")
    mean = s / n
    ss = np.zeros(1)
    for x in xs:
        ss += ((x - mean) ** 2).sum()
    ss = _reduce(allreduce, ss)[0]
    if not local_n:
        lo = hi = math.nan
    return _DataStats(float(n), float(mean), float(math.sqrt(ss / n)), local_n, lo, hi)


def _lloyd_sums(xs: Iterable[np.ndarray], c: np.ndarray, prev: Optional[np.ndarray]) -> np.ndarray:
    """Local ``[n_0, n_1, sum_0, sum_1, n_changed]`` for the labels of centres ``c``.

    ``n_changed`` compares with the labels of the previous iteration's centres
    ``prev`` (all points when None): labels are a function of the centres, so they
    are recomputed here rather than kept as a per-point array.
    """
    acc = np.zeros(5)
    for x in xs:
        m1 = _nearest_is_1(x, c)
        changed = x.size if prev is None else np.count_nonzero(m1 != _nearest_is_1(x, prev))
        acc += (np.count_nonzero(~m1), np.count_nonzero(m1), x[~m1].sum(), x[m1].sum(), changed)
    return acc


def _kmeans(xs: Iterable[np.ndarray], stats: _DataStats, allreduce: Optional[AllReduce],
            centres: Optional[Sequence[float]], max_iter: int, tol: float) -> Tuple[np.ndarray, int]:
    """Lloyd iterations of :func:`kmeans_1d`; returns ``(centres, n_iter)``."""
    start = [stats.mean - stats.std, stats.mean + stats.std] if centres is None else centres
    c = np.array(start, dtype=np.float64)
    tol_abs = tol * stats.std * stats.std
    prev = None
    it = 0
    for it in range(1, max_iter + 1):
        tot = _reduce(allreduce, _lloyd_sums(xs, c, prev))
        new = c.copy()
        for k in range(2):
            if tot[k] > 0:  # an empty cluster keeps its centre
                new[k] = tot[2 + k] / tot[k]
        shift = float(((new - c) ** 2).sum())
        prev, c = c, new
        if tot[4] == 0 or shift <= tol_abs:
            break
    return c, it


def _streamed_m_step(resp_pass: RespPass, reg_covar: float, allreduce: Optional[AllReduce],
                     weight_norm: Optional[float] = None) -> Tuple[GMM1D, np.ndarray]:
    """M-step over the chunks of ``resp_pass()``; returns the GMM and global ``[N_0, N_1, S_0, S_1, loglik]``.

    ``resp_pass`` is run twice (first moments, then centred second moments around
    the new means): recomputing the responsibilities instead of storing them keeps
    memory O(chunk).
    """
    acc = np.zeros(5)
    for x, resp, loglik in resp_pass():
        acc[:4] += first_moment_stats(x, resp)
        acc[4] += loglik
    tot = _reduce(allreduce, acc)

    def second(means: np.ndarray) -> np.ndarray:
        ss = np.zeros(2)
        for x, resp, _ in resp_pass():
            ss += second_moment_stats(x, resp, means)
        return _reduce(allreduce, ss)

    return m_step(tot[:4], second, reg_covar, weight_norm), tot


def _soft_pass(xs: Iterable[np.ndarray], gmm: GMM1D) -> RespPass:
    return lambda: ((x, *e_step(gmm, x)) for x in xs)


def _hard_pass(xs: Iterable[np.ndarray], centres: np.ndarray) -> RespPass:
    return lambda: ((x, _one_hot(_nearest_is_1(x, centres)), 0.0) for x in xs)


# ---------------------------------------------------------------------------
# Distributed-ready drivers
# ---------------------------------------------------------------------------

def kmeans_1d(x: DataLike, *, allreduce: Optional[AllReduce] = None,
              centres: Optional[Sequence[float]] = None, max_iter: int = 300, tol: float = 0.0):
    """2-means in 1-D by Lloyd iterations on global sums (scikit-learn's Lloyd semantics).

    Start centres: ``centres`` or ``(mean - std, mean + std)``. Each iteration assigns
    every local point to its nearest centre (ties to centre 0), all-reduces
    ``[n_0, n_1, sum_0, sum_1, n_changed]`` and moves the centres (an empty
    cluster keeps its centre). Stops when no label changes, or when the squared
    centre shift is ``<= tol * var(x)``. Returns ``(centres (2,), labels, n_iter)``
    where ``labels`` are the local points' labels for the final centres, (n,)
    int64, for an array ``x``, and None for a chunk source (they would be O(n);
    a point's label is ``|x - c_1| < |x - c_0|``, see :func:`init_gmm_from_centres`).

    ``tol=0`` (default) runs Lloyd to its fixed point, so the result does not
    depend on the start centres in the usual case [D]. scikit-learn's KMeans uses
    ``tol=1e-4`` and a random k-means++ start, i.e. it may stop slightly before
    the fixed point at a start-dependent place; pass ``tol=1e-4`` to use the same
    stopping rule.
    """
    xs = _as_chunks(x)
    c, it = _kmeans(xs, _global_stats(xs, allreduce), allreduce, centres, max_iter, tol)
    labels = None if xs.chunked else _nearest_is_1(next(iter(xs)), c).astype(np.int64)
    return c, labels, it


def init_gmm_from_labels(x: DataLike, labels, *, n_total: float, reg_covar: float,
                         allreduce: Optional[AllReduce] = None) -> GMM1D:
    """scikit-learn's ``_initialize``: one M-step from hard responsibilities, weights ``N_k / n``.

    ``labels``: the local points' 0/1 labels, in the same form as ``x`` (an array
    for an array; for a chunk source, a re-iterable of label chunks of the same lengths).
    """
    xs = _as_chunks(x)
    label_chunks = labels if xs.chunked else [labels]

    def hard_pass():
        for xc, lc in zip(xs, label_chunks, strict=True):
            resp = _one_hot(lc)
            if resp.shape[0] != xc.size:
                raise ValueError(f"labels chunk has {resp.shape[0]} entries for {xc.size} points")
            yield xc, resp, 0.0

    return _streamed_m_step(hard_pass, reg_covar, allreduce, weight_norm=n_total)[0]


def init_gmm_from_centres(x: DataLike, centres: Sequence[float], *, n_total: float,
                          reg_covar: float, allreduce: Optional[AllReduce] = None) -> GMM1D:
    """:func:`init_gmm_from_labels` with each point labelled by its nearest of two k-means ``centres``.

    The labels are recomputed chunk by chunk, so this works on chunk sources in
    O(chunk) memory; with the centres of :func:`kmeans_1d` it equals
    ``init_gmm_from_labels`` with its labels.
    """
    xs = _as_chunks(x)
    c = np.asarray(centres, dtype=np.float64).reshape(2)
    return _streamed_m_step(_hard_pass(xs, c), reg_covar, allreduce, weight_norm=n_total)[0]


def fit_gmm_1d(x: DataLike, *, max_iter: int = 10, tol: float = 1e-2, reg_covar: float = 5e-4,
               allreduce: Optional[AllReduce] = None,
               init: Union[str, GMM1D, Sequence[float]] = "kmeans",
               kmeans_tol: float = 0.0, kmeans_max_iter: int = 300) -> Tuple[GMM1D, dict]:
    """Fit a 2-component 1-D GMM to the (possibly distributed) data; see the module doc.

    ``x``: this rank's slice: a 1-D numpy array or torch tensor (any device/dtype),
    or a chunk source (list of arrays, :class:`ArrayChunks`, :class:`Chunks`, ...)
    processed in O(chunk) memory.
    ``init``: "kmeans" (default), a length-2 sequence of k-means start centres,
    or a :class:`GMM1D` to start EM from directly (no k-means).
    ``kmeans_tol``/``kmeans_max_iter``: see :func:`kmeans_1d`.
    Returns ``(gmm, info)`` with ``info = {"n_iter", "converged", "lower_bound",
    "lower_bounds", "n", "kmeans_iter", "init", "mean", "std", "local_n",
    "local_min", "local_max"}``: ``n``, ``mean``, ``std`` are global, ``local_*``
    describe this rank's data (min/max nan when it has none) and come from the
    first pass at no extra cost. ``gmm`` is identical on all ranks.
    """
    xs = _as_chunks(x)
    stats = _global_stats(xs, allreduce)
    kmeans_iter = 0
    if isinstance(init, GMM1D):
        gmm = GMM1D(init.weights.copy(), init.means.copy(), init.variances.copy())
    else:
        centres = None if (isinstance(init, str) and init == "kmeans") else init
        if isinstance(centres, str):
            raise ValueError(f"unknown init {init!r}")
        c, kmeans_iter = _kmeans(xs, stats, allreduce, centres, kmeans_max_iter, kmeans_tol)
        gmm = init_gmm_from_centres(xs, c, n_total=stats.n, reg_covar=reg_covar,
                                    allreduce=allreduce)
    init_gmm = GMM1D(gmm.weights.copy(), gmm.means.copy(), gmm.variances.copy())

    lower_bound = -np.inf
    lower_bounds = []
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        prev = lower_bound
        gmm, tot = _streamed_m_step(_soft_pass(xs, gmm), reg_covar, allreduce)
        lower_bound = float(tot[4] / stats.n)
        lower_bounds.append(lower_bound)
        if abs(lower_bound - prev) < tol:
            converged = True
            break
    info = dict(n_iter=n_iter, converged=converged, lower_bound=lower_bound,
                lower_bounds=lower_bounds, n=int(stats.n), kmeans_iter=kmeans_iter, init=init_gmm,
                mean=stats.mean, std=stats.std, local_n=stats.local_n,
                local_min=stats.local_min, local_max=stats.local_max)
    return gmm, info


def _posterior_low_mean_array(gmm: GMM1D, x: ArrayLike):
    p = e_step(gmm, _to_numpy(x))[0][:, gmm.low]
    if torch is not None and isinstance(x, torch.Tensor):
        dt = x.dtype if x.is_floating_point() else torch.float32
        return torch.as_tensor(p, dtype=dt).reshape(x.shape).to(x.device)
    return p.reshape(np.shape(x)) if np.ndim(x) > 0 else p


def iter_posterior_low_mean(gmm: GMM1D, x: DataLike) -> Iterator:
    """Yield the low-mean posterior chunk by chunk (one item for an array ``x``).

    Each item is what :func:`posterior_low_mean` returns for that chunk; use this
    to stream the posteriors of a chunk source back to disk in O(chunk) memory.
    """
    if not _is_chunk_source(x):
        yield _posterior_low_mean_array(gmm, x)
        return
    _as_chunks(x)  # rejects one-shot iterators like everywhere else
    for chunk in x:
        yield _posterior_low_mean_array(gmm, chunk)


def posterior_low_mean(gmm: GMM1D, x: DataLike):
    """Posterior of the low-mean ("clean") component for the local data ``x``.

    For an array: returns the same kind as ``x``: a numpy float64 array, or a torch
    tensor on ``x``'s device (``x``'s dtype if floating, else float32). Shape (n,).
    For a chunk source: a list with one such result per chunk (see
    :func:`iter_posterior_low_mean` to avoid holding them all).
    """
    if _is_chunk_source(x):
        return list(iter_posterior_low_mean(gmm, x))
    return _posterior_low_mean_array(gmm, x)
