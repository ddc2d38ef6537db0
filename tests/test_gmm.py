"""coreg_dist.gmm against scikit-learn, and split-data (simulated ranks) equivalence."""
import threading
import warnings

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from coreg_dist.gmm import (GMM1D, ArrayChunks, Chunks, fit_gmm_1d, init_gmm_from_centres,
                            init_gmm_from_labels, iter_posterior_low_mean, kmeans_1d,
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


# ---------------------------------------------------------------------------
# Chunked input: list of arrays, ArrayChunks over a memmap, lazily loaded shards
# ---------------------------------------------------------------------------

RTOL = 1e-9  # chunking only changes the float summation order


def assert_same_fit(result, reference):
    (g, info), (g_ref, info_ref) = result, reference
    for a, b in [(g.weights, g_ref.weights), (g.means, g_ref.means), (g.variances, g_ref.variances),
                 (info["init"].means, info_ref["init"].means),
                 (info["init"].variances, info_ref["init"].variances)]:
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-12)
    for key in ("n", "n_iter", "kmeans_iter", "converged"):
        assert info[key] == info_ref[key], key
    assert info["lower_bound"] == pytest.approx(info_ref["lower_bound"], rel=RTOL)


def unequal_chunks(x, seed, n_cuts=7):
    """x cut at random places, with an empty chunk at the start and in the middle."""
    cuts = np.sort(np.random.default_rng(seed).integers(0, x.size, n_cuts))
    parts = np.split(x, cuts)
    return [x[:0]] + parts[:3] + [x[:0]] + parts[3:]


def memmap_of(x, path, dtype=np.float64):
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=x.shape)
    mm[:] = x
    mm.flush()
    del mm
    return np.load(path, mmap_mode="r")  # read-only: the fit must not write into its input


def shard_files(x, tmp_path, n_shards=5):
    paths = []
    for i, part in enumerate(np.array_split(x, n_shards)):
        paths.append(tmp_path / f"shard{i}.npy")
        np.save(paths[-1], part.astype(np.float32))
    return paths


class GuardedChunks:
    """Chunk source that can only be iterated: materialising it (np.asarray, np.concatenate,
    list) fails. It records the largest chunk handed out and the number of complete passes."""

    def __init__(self, array, chunk_size):
        self.inner = ArrayChunks(array, chunk_size)
        self.passes = 0
        self.largest = 0

    def __iter__(self):
        for chunk in self.inner:
            self.largest = max(self.largest, chunk.size)
            yield chunk
        self.passes += 1

    def __array__(self, *args, **kwargs):
        raise AssertionError("the chunk source was materialised as one array")

    def __len__(self):  # list(source) asks for it first
        raise AssertionError("the chunk source was materialised as a list")


@pytest.mark.parametrize("make,seed", [(separated, 0), (overlapping, 3), (division_like, 1)])
def test_chunk_sources_equal_array(make, seed, tmp_path):
    x = make(seed)
    ref = fit_gmm_1d(x)
    chunks = unequal_chunks(x, seed)
    sources = {
        "list of unequal chunks": chunks,
        "tuple of torch chunks": tuple(torch.from_numpy(c) for c in chunks),
        "ArrayChunks over memmap": ArrayChunks(memmap_of(x, tmp_path / "x.npy"), chunk_size=777),
        "ArrayChunks, one chunk": ArrayChunks(x, chunk_size=x.size),
        "ArrayChunks over tensor": ArrayChunks(torch.from_numpy(x), chunk_size=1000),
    }
    for name, src in sources.items():
        res = fit_gmm_1d(src)
        assert_same_fit(res, ref)
        post = np.concatenate([np.asarray(p) for p in posterior_low_mean(res[0], src)])
        np.testing.assert_allclose(post, posterior_low_mean(ref[0], x), rtol=0, atol=1e-9,
                                   err_msg=name)
    # float32 data on disk: per-shard files loaded lazily, and a float32 memmap
    x32 = np.concatenate([np.load(p) for p in shard_files(x, tmp_path)]).astype(np.float64)
    ref32 = fit_gmm_1d(x32)
    paths = shard_files(x, tmp_path)
    assert_same_fit(fit_gmm_1d(Chunks(lambda: (np.load(p) for p in paths))), ref32)
    assert_same_fit(fit_gmm_1d(ArrayChunks(memmap_of(x, tmp_path / "x32.npy", np.float32), 1000)),
                    ref32)


def test_fit_only_iterates_the_chunk_source(tmp_path):
    """Structural O(chunk) check: every pass streams chunks; nothing materialises the source."""
    x = division_like(3)
    src = GuardedChunks(memmap_of(x, tmp_path / "x.npy", np.float32), chunk_size=500)
    for materialise in (np.asarray, list, lambda s: np.concatenate(list(s))):
        with pytest.raises(AssertionError):  # the guard works
            materialise(src)
    g, info = fit_gmm_1d(src)
    assert src.largest == 500
    # 2 (mean/std) + one per Lloyd iteration + 2 (init) + 2 per EM iteration
    assert src.passes == 4 + info["kmeans_iter"] + 2 * info["n_iter"]
    assert_same_fit((g, info), fit_gmm_1d(x.astype(np.float32).astype(np.float64)))

    src.passes = 0
    g2, info2 = fit_gmm_1d(src, init=info["init"], max_iter=3, tol=0.0)
    assert src.passes == 2 + 2 * info2["n_iter"] and info2["kmeans_iter"] == 0

    src.passes = 0
    c, labels, it = kmeans_1d(src)
    assert labels is None and src.passes == 2 + it
    init_gmm_from_centres(src, c, n_total=x.size, reg_covar=5e-4)
    posts = list(iter_posterior_low_mean(g, src))
    assert src.passes == 2 + it + 2 + 1
    assert [p.size for p in posts] == [c.size for c in ArrayChunks(x, 500)]
    assert len(posterior_low_mean(g, src)) == len(posts) and len(g.predict_proba(src)) == len(posts)


def test_kmeans_and_init_on_chunks_equal_array():
    x = overlapping(4)
    chunks = unequal_chunks(x, 4)
    c, labels, it = kmeans_1d(x)
    c_ch, labels_ch, it_ch = kmeans_1d(chunks)
    np.testing.assert_allclose(c_ch, c, rtol=RTOL)
    assert labels_ch is None and it_ch == it
    # labels are a function of the final centres, so the centre-based init is the label-based one
    kw = dict(n_total=x.size, reg_covar=5e-4)
    g_lab = init_gmm_from_labels(x, labels, **kw)
    g_cen = init_gmm_from_centres(x, c, **kw)
    for a, b in [(g_lab.weights, g_cen.weights), (g_lab.means, g_cen.means),
                 (g_lab.variances, g_cen.variances)]:
        assert np.array_equal(a, b)
    label_chunks = np.split(labels, np.cumsum([ch.size for ch in chunks])[:-1])
    for g in (init_gmm_from_centres(chunks, c, **kw), init_gmm_from_labels(chunks, label_chunks, **kw)):
        np.testing.assert_allclose(g.means, g_lab.means, rtol=RTOL)
        np.testing.assert_allclose(g.variances, g_lab.variances, rtol=RTOL)
        np.testing.assert_allclose(g.weights, g_lab.weights, rtol=RTOL)
    with pytest.raises(ValueError):  # label chunks must line up with the data chunks
        init_gmm_from_labels(chunks, label_chunks[::-1], **kw)


@pytest.mark.parametrize("make,seed", [(separated, 2), (division_like, 5)])
def test_distributed_chunked_ranks_equal_unsplit(make, seed, tmp_path):
    x = make(seed)
    x = x[np.random.default_rng(seed).permutation(x.size)]
    ref = fit_gmm_1d(x)
    a, b, c = np.split(x, [x.size // 4, x.size // 2])
    guarded = GuardedChunks(memmap_of(c, tmp_path / "c.npy"), chunk_size=333)
    rank_inputs = [
        unequal_chunks(a, seed),                     # list of unequal chunks
        [],                                          # a rank with no samples: empty list
        ArrayChunks(memmap_of(b, tmp_path / "b.npy"), chunk_size=1000),
        [np.empty(0, np.float32)],                   # ... or only empty chunks
        guarded,                                     # never materialised
        ArrayChunks(np.empty(0), chunk_size=10),     # ... or an empty ArrayChunks
    ]
    results = fit_split(rank_inputs)
    g0 = results[0][0]
    for g, info in results:
        assert np.array_equal(g.means, g0.means) and np.array_equal(g.variances, g0.variances)
        assert np.array_equal(g.weights, g0.weights)
        assert_same_fit((g, info), ref)
    assert guarded.largest <= 333
    assert [info["local_n"] for _, info in results] == [a.size, 0, b.size, 0, c.size, 0]
    assert np.isnan(results[1][1]["local_min"]) and np.isnan(results[3][1]["local_max"])
    assert min(info["local_min"] for _, info in results if info["local_n"]) == x.min()
    assert max(info["local_max"] for _, info in results if info["local_n"]) == x.max()
    post = np.concatenate([p for inp in rank_inputs for p in iter_posterior_low_mean(g0, inp)])
    np.testing.assert_allclose(post, posterior_low_mean(ref[0], x), rtol=0, atol=1e-9)


def test_zero_samples_and_one_shot_iterators():
    x = separated(5)
    for empty in ([], [np.empty(0)], ArrayChunks(np.empty(0)), Chunks(lambda: iter(()))):
        with pytest.raises(ValueError, match="no data"):
            fit_gmm_1d(empty)
    g, _ = fit_gmm_1d(x)
    assert posterior_low_mean(g, []).shape == (0,)
    assert [p.shape for p in posterior_low_mean(g, [x[:0], x[:3]])] == [(0,), (3,)]
    # a generator can be consumed once; the fit needs many passes
    for one_shot in (iter([x]), (c for c in [x]), map(np.asarray, [x])):
        with pytest.raises(TypeError, match="one-shot"):
            fit_gmm_1d(one_shot)
    assert_same_fit(fit_gmm_1d(Chunks(lambda: iter([x[:100], x[100:]]))), fit_gmm_1d(x))


def test_flat_sequences_are_still_arrays_and_info_stats():
    x = division_like(6)
    g, info = fit_gmm_1d(x)
    g_list, info_list = fit_gmm_1d(list(x))
    assert np.array_equal(g_list.means, g.means) and info_list["n_iter"] == info["n_iter"]
    p = posterior_low_mean(g, list(x[:5]))
    assert isinstance(p, np.ndarray) and p.shape == (5,)
    c, labels, _ = kmeans_1d(tuple(x))
    assert labels.shape == x.shape and labels.dtype == np.int64
    assert info["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert info["std"] == pytest.approx(x.std(), rel=1e-12)
    assert (info["local_n"], info["local_min"], info["local_max"]) == (x.size, x.min(), x.max())


def test_array_chunks_validation():
    with pytest.raises(ValueError):
        ArrayChunks(np.zeros((3, 2)))
    with pytest.raises(ValueError):
        ArrayChunks(np.zeros(3), chunk_size=0)
    assert [c.tolist() for c in ArrayChunks(np.arange(5.0), 2)] == [[0, 1], [2, 3], [4]]
    col = np.arange(12.0).reshape(6, 2)[:, 1]  # strided 1-D view: sliced, never copied whole
    assert np.array_equal(np.concatenate(list(ArrayChunks(col, 4))), col)


def test_separation_is_ashmans_d():
    """GMM1D.separation: |m1 - m2| * sqrt(2 / (v1 + v2)), what coreg.divide_start=separated reads;
    the fitted mixture of two well-apart samples is far above 2, of one normal sample below."""
    g = GMM1D([0.5, 0.5], [0.0, 3.0], [1.0, 0.5])
    assert g.separation == pytest.approx(3.0 * np.sqrt(2.0 / 1.5))
    rng = np.random.default_rng(0)
    apart = np.concatenate([rng.normal(0, 0.1, 2000), rng.normal(1, 0.1, 2000)])
    assert fit_gmm_1d(apart)[0].separation > 6
    assert fit_gmm_1d(rng.normal(0, 1, 4000))[0].separation < 2
