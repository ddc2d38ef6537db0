import numpy as np
import pytest

from coreg_dist import labels as L


def probs_example():
    # 2 images, 3 templates, 4 classes
    p = np.array([
        [[0.7, 0.2, 0.1, 0.0], [0.4, 0.5, 0.1, 0.0], [0.6, 0.3, 0.05, 0.05]],
        [[0.1, 0.1, 0.1, 0.7], [0.1, 0.1, 0.1, 0.7], [0.2, 0.1, 0.1, 0.6]],
    ])
    return p


def test_union_argmax():
    Y = L.union_argmax(probs_example())
    assert Y.tolist() == [[True, True, False, False], [False, False, False, True]]


def test_topk_and_ratio():
    p = probs_example()
    # averages: img0 [0.5667, 0.3333, 0.0833, 0.0167]; img1 [0.1333, 0.1, 0.1, 0.6667]
    assert L.topk_sets(p, 2).tolist() == [[True, True, False, False], [True, False, False, True]]
    # ratio 0.5 of top1: img0 keeps 0 (0.567) and 1 (0.333 >= 0.283); img1 keeps only 3
    assert L.ratio_sets(p, 3, 0.5).tolist() == [[True, True, False, False], [False, False, False, True]]


def test_soft_labels_and_sets():
    p = probs_example()
    s = L.soft_labels(p)
    np.testing.assert_allclose(s[0], [0.56667, 0.33333, 0.08333, 0.01667], atol=1e-4)
    assert L.soft_sets(p, 0.1).tolist() == [[True, True, False, False], [True, True, True, True]]


def test_top_few_round_trip():
    p = probs_example()
    idx, val = L.top_few(p, 2)
    assert idx.shape == (2, 3, 2) and idx.dtype == np.int16 and val.dtype == np.float16
    dense = L.expand_top_few(idx, val, 4)
    # union of argmax is exactly re-derivable from the stored top few
    assert (L.union_argmax(dense) == L.union_argmax(p)).all()
    full_idx, full_val = L.top_few(p, 10)
    np.testing.assert_allclose(L.expand_top_few(full_idx, full_val, 4), p, atol=1e-3)


def test_stats_and_validation():
    Y = np.array([[1, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=bool)
    st = L.candidate_stats(Y, np.array([1, 0, 0]))
    assert st["avg_candidates"] == pytest.approx(4 / 3)
    assert st["coverage"] == pytest.approx(2 / 3) and st["eta"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="empty candidate set at shard-1/key-7"):
        L.to_multi_hot([], 3, where="shard-1/key-7")
    with pytest.raises(ValueError, match="out of range"):
        L.to_multi_hot([0, 3], 3)
    with pytest.raises(ValueError, match="unknown candidate rule 'best'"):
        L.derive_candidates(probs_example(), "best")


def test_synthetic_npll_rates():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 10, 20000)
    Y = L.synthetic_npll(true, 10, q=0.05, eta=0.2, rng=rng)
    st = L.candidate_stats(Y, true)
    assert st["eta"] == pytest.approx(0.2, abs=0.01)
    # expected size: 1 + 9 q (the swap keeps the size)
    assert st["avg_candidates"] == pytest.approx(1 + 9 * 0.05, abs=0.02)
    assert Y.sum(1).min() >= 1


def test_candidate_pairs_companion_share_exact_and_bounded():
    """The share is sum_i max_{j != i} n_ij / sum_i n_i, the same however the rows arrive;
    with fewer counters than pairs it can only overcount."""
    rng = np.random.default_rng(0)
    for C in (4, 13):
        Y = rng.random((300, C)) < 0.3
        Y[:20] = False                               # empty rows count nothing
        Y[20:40] = np.eye(C, dtype=bool)[rng.integers(0, C, 20)]   # singletons: no pairs
        S = Y.astype(float)
        n_ij = S.T @ S
        np.fill_diagonal(n_ij, 0)
        want = n_ij.max(axis=1).sum() / S.sum()
        whole, split = L.CandidatePairs(C), L.CandidatePairs(C)
        whole.add(Y)
        for part in np.array_split(Y, 7):
            split.add(part)
        assert np.array_equal(whole.pairs.reshape(C, C), n_ij)
        assert whole.companion_share() == pytest.approx(want)
        assert split.companion_share() == pytest.approx(want)
        assert whole.companion_share(chunk=3) == pytest.approx(want)
        sets = S[S.sum(axis=1) > 0]                  # the mean set size: over non-empty rows
        assert whole.mean_set_size() == pytest.approx(sets.sum() / len(sets))
        assert split.mean_set_size() == pytest.approx(sets.sum() / len(sets))
        small = L.CandidatePairs(C, max_buckets=5)
        small.add(Y)
        assert small.pairs.size == 5 and small.companion_share() >= want - 1e-12
    # habitual groups (always the same three) against sets whose wrong members vary
    habitual = np.zeros((90, 9), dtype=bool)
    for g in range(3):
        habitual[g * 30:(g + 1) * 30, 3 * g:3 * g + 3] = True
    varied = np.zeros((90, 9), dtype=bool)
    varied[np.arange(90), np.arange(90) % 9] = True
    varied[np.arange(90), rng.integers(0, 9, 90)] = True
    h, v = L.CandidatePairs(9), L.CandidatePairs(9)
    h.add(habitual)
    v.add(varied)
    assert h.companion_share() == 1.0 and v.companion_share() < 0.5
    assert L.CandidatePairs(3).companion_share() == 0.0 == L.CandidatePairs(3).mean_set_size()
