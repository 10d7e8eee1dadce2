"""Tests for crs_core.select: fast greedy selection == the literal reference (select_reference.py),
rounds, properties, the metadata / user variants, the summary and bad input.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from crs_core.errors import CRSError
from crs_core.strategies import names as strategy_names
from crs_core.select import (
    DEFAULT_WEIGHTS,
    SelectionError,
    assign_clusters,
    build_features,
    cluster_probabilities,
    entropy,
    js_divergence,
    kmeans_centers,
    select,
    selection_summary,
)
from select_reference import (_single_threaded_blas, assert_same, blob_data, ref_entropy, ref_js,  # noqa: F401 (fixtures)
                              ref_probabilities, ref_select_fisher, ref_select_js, sherman_morrison_lambda, small,
                              unit384, unit_rows)

# --------------------------------------------------------------------------
# fast == reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 1.0, 5.0])
def test_js_matches_reference_small(small, lam):
    C = kmeans_centers(small, 4, seed=0)
    fast = select("JS", small, 40, centers=C, lam=lam)
    assert_same(fast, *ref_select_js(small, C, 40, lam=lam))


def test_fisher_matches_reference_small(small):
    fast = select("FISHER", small, 45)
    assert_same(fast, *ref_select_fisher(small, 45))


def test_fisher_matches_reference_unit384(unit384):
    # every row has score log 2 at the first step (up to the last bit): tie rule -> row 0
    fast = select("FISHER", unit384, 80)
    ref_idx, ref_scores = ref_select_fisher(unit384, 80)
    assert fast.indices[0] == 0
    assert_same(fast, ref_idx, ref_scores)


def test_float32_input_matches_reference(unit384):
    X32 = unit384.astype(np.float32)  # float32 is used as given (converted exactly to float64)
    fast = select("FISHER", X32, 60)
    assert_same(fast, *ref_select_fisher(X32, 60))
    C = kmeans_centers(X32, 10, seed=0)
    fj = select("JS", X32, 60, centers=C)
    assert_same(fj, *ref_select_js(X32, C, 60))


def test_js_matches_reference_unit384(unit384):
    C = kmeans_centers(unit384, 12, seed=0)
    fast = select("JS", unit384, 120, centers=C, lam=1.0)
    assert_same(fast, *ref_select_js(unit384, C, 120, lam=1.0))


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_js_matches_reference_blobs(blob_data, lam):
    X, _ = blob_data
    C = kmeans_centers(X, 6, seed=1)
    fast = select("JS", X, 150, centers=C, lam=lam)
    assert_same(fast, *ref_select_js(X, C, 150, lam=lam))


def test_fisher_matches_reference_blobs(blob_data):
    X, _ = blob_data
    fast = select("FISHER", X * 3.0, 150)  # non-unit scale on purpose
    assert_same(fast, *ref_select_fisher(X * 3.0, 150))


def test_fisher_whole_dataset_small(small):
    # budget = N: the ordering of every row must still match
    fast = select("FISHER", small, small.shape[0])
    assert_same(fast, *ref_select_fisher(small, small.shape[0]))
    assert sorted(fast.indices.tolist()) == list(range(small.shape[0]))


def test_js_whole_dataset_small(small):
    C = kmeans_centers(small, 3, seed=0)
    fast = select("JS", small, small.shape[0], centers=C)
    assert_same(fast, *ref_select_js(small, C, small.shape[0]))


def test_duplicate_rows_tie_to_lowest_index():
    rng = np.random.default_rng(5)
    base = rng.standard_normal((10, 4))
    X = np.concatenate([base, base, base])  # every row three times
    fast = select("FISHER", X, 12)
    assert_same(fast, *ref_select_fisher(X, 12))
    C = kmeans_centers(base, 3, seed=0)
    fj = select("JS", X, 12, centers=C)
    assert_same(fj, *ref_select_js(X, C, 12))


# --------------------------------------------------------------------------
# rounds: select(B1) then continue(B2) == select(B1 + B2)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["JS", "FISHER", "RANDOM_UNIFORM"])
def test_continuation_equals_one_long_call(blob_data, strategy):
    X, _ = blob_data
    C = kmeans_centers(X, 6, seed=0) if strategy == "JS" else None
    full = select(strategy, X, 90, centers=C, seed=3)
    first = select(strategy, X, 40, centers=C, seed=3)
    second = select(strategy, X, 30, centers=C, seed=3, already_selected=first.indices)
    third = select(strategy, X, 20, centers=C, seed=3, already_selected=np.concatenate([first.indices, second.indices]))
    joined = np.concatenate([first.indices, second.indices, third.indices])
    np.testing.assert_array_equal(joined, full.indices)
    np.testing.assert_allclose(np.concatenate([first.scores, second.scores, third.scores]), full.scores, rtol=1e-9, atol=1e-12)


def test_continuation_matches_reference_with_already(unit384):
    already = [5, 17, 200]
    fast = select("FISHER", unit384, 30, already_selected=already)
    assert_same(fast, *ref_select_fisher(unit384, 30, already=already))
    C = kmeans_centers(unit384, 8, seed=0)
    fj = select("JS", unit384, 30, centers=C, already_selected=already)
    assert_same(fj, *ref_select_js(unit384, C, 30, already=already))


# --------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------


def test_no_repeats_and_budget(blob_data):
    X, _ = blob_data
    C = kmeans_centers(X, 6, seed=0)
    for strategy in ("JS", "FISHER", "RANDOM_UNIFORM"):
        r = select(strategy, X, 123, centers=C if strategy == "JS" else None)
        assert r.indices.shape == (123,) and r.scores.shape == (123,)
        assert len(set(r.indices.tolist())) == 123
        assert r.indices.min() >= 0 and r.indices.max() < X.shape[0]
        assert r.strategy == strategy


def test_random_is_seeded_and_excludes_already(blob_data):
    X, _ = blob_data
    a = select("RANDOM_UNIFORM", X, 50, seed=11)
    b = select("random_uniform", X, 50, seed=11)
    c = select("RANDOM_UNIFORM", X, 50, seed=12)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)
    np.testing.assert_array_equal(a.indices, np.random.default_rng(11).permutation(X.shape[0])[:50])
    d = select("RANDOM_UNIFORM", X, 50, seed=11, already_selected=a.indices[:10])
    assert not set(d.indices.tolist()) & set(a.indices[:10].tolist())
    assert np.all(a.scores == 0)


def test_deterministic_greedy(blob_data):
    X, _ = blob_data
    C = kmeans_centers(X, 6, seed=0)
    for s in ("JS", "FISHER"):
        a = select(s, X, 60, centers=C if s == "JS" else None)
        b = select(s, X, 60, centers=C if s == "JS" else None)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.scores, b.scores)


def test_sherman_morrison_equals_explicit_inverse(unit384):
    X = unit384.astype(np.float64)
    order = select("FISHER", X, 50).indices
    Lam_sm = sherman_morrison_lambda(X, order)
    Lam_inv = np.linalg.inv(np.eye(X.shape[1]) + X[order].T @ X[order])
    np.testing.assert_allclose(Lam_sm, Lam_inv, atol=1e-12)


def test_fisher_scores_decrease(blob_data):
    # Lambda only shrinks, so the greedy maximum can only go down
    X, _ = blob_data
    r = select("FISHER", X, 100)
    assert np.all(np.diff(r.scores) <= 1e-12)


def test_js_and_entropy_bounds():
    rng = np.random.default_rng(0)
    K = 7
    P = rng.dirichlet(np.full(K, 0.3), size=500)
    P[::5, 0] = 0.0  # exact zeros: 0 log 0 = 0
    P /= P.sum(axis=1, keepdims=True)
    Q = rng.dirichlet(np.ones(K), size=500)
    js = js_divergence(P, Q)
    assert np.all(js >= 0) and np.all(js <= math.log(2) + 1e-15)
    np.testing.assert_allclose(js, ref_js(P, Q), atol=1e-14)
    # disjoint supports reach log 2, identical distributions 0
    assert js_divergence(np.array([1.0, 0, 0]), np.array([0, 0.5, 0.5])) == pytest.approx(math.log(2), abs=1e-15)
    assert js_divergence(P[3], P[3]) == 0.0
    # symmetric
    np.testing.assert_allclose(js_divergence(P, Q), js_divergence(Q, P), atol=1e-15)
    H = entropy(P)
    assert np.all(H >= 0) and np.all(H <= math.log(K) + 1e-12)
    np.testing.assert_allclose(H, ref_entropy(P), atol=1e-14)
    assert entropy(np.full(K, 1.0 / K)) == pytest.approx(math.log(K))
    # relative accuracy for nearly equal distributions (used for the bounds)
    p = np.full(K, 1.0 / K)
    q = p * (1 + 1e-6 * np.arange(K))
    q /= q.sum()
    approx = 0.125 * np.sum((p - q) ** 2 / ((p + q) / 2))  # second-order expansion
    assert js_divergence(p, q) == pytest.approx(approx, rel=1e-5)


def test_cluster_probabilities_and_scores_bounds(blob_data):
    X, _ = blob_data
    C = kmeans_centers(X, 6, seed=0)
    P = cluster_probabilities(X, C)
    np.testing.assert_allclose(P, ref_probabilities(X, C), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(P.sum(axis=1), 1.0)
    r = select("JS", X, 80, centers=C, lam=1.0)
    # first score is an entropy, later ones entropy + lam * JS
    assert 0 <= r.scores[0] <= math.log(6) + 1e-12
    assert np.all(r.scores <= math.log(6) + math.log(2) + 1e-12)


def test_js_lambda_zero_is_entropy_order(blob_data):
    X, _ = blob_data
    C = kmeans_centers(X, 6, seed=0)
    r = select("JS", X, 30, centers=C, lam=0.0)
    H = ref_entropy(ref_probabilities(X, C))
    order = sorted(range(X.shape[0]), key=lambda i: (-H[i], i))[:30]
    # equal up to the tie rule; there are no near-ties in this data
    np.testing.assert_array_equal(r.indices, order)


def test_progress_called_sparsely(blob_data):
    X, _ = blob_data
    calls = []
    select("FISHER", X, 300, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (300, 300)
    assert len(calls) <= 101
    assert all(t == 300 for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# --------------------------------------------------------------------------
# metadata / user variants
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blocks():
    rng = np.random.default_rng(21)
    R = rng.standard_normal((250, 12))
    M = rng.standard_normal((250, 8)) * 5.0
    U = rng.standard_normal((250, 4)) * 0.1
    return R, M, U


def test_build_features_construction(blocks):
    R, M, U = blocks
    F = build_features(R, M, U, weights=(1.0, 2.0, 1.0))
    assert F.shape == (250, 24)
    np.testing.assert_allclose(np.linalg.norm(F, axis=1), 1.0)
    # squared distances are the weight-averaged block distances
    n = lambda A: A / np.linalg.norm(A, axis=1, keepdims=True)  # noqa: E731
    Rn, Mn, Un = n(R), n(M), n(U)
    i, j = 3, 77
    want = (1 * np.sum((Rn[i] - Rn[j]) ** 2) + 2 * np.sum((Mn[i] - Mn[j]) ** 2) + 1 * np.sum((Un[i] - Un[j]) ** 2)) / 4
    assert np.sum((F[i] - F[j]) ** 2) == pytest.approx(want, rel=1e-12)
    # weight 0 drops the block; review alone = unit-normalised review
    np.testing.assert_array_equal(build_features(R, M, weights=(1.0, 0.0, 1.0)), build_features(R))
    np.testing.assert_allclose(build_features(R), Rn)
    assert DEFAULT_WEIGHTS == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("base", ["JS", "FISHER"])
def test_variants_with_zero_weights_equal_base(blocks, base):
    R, M, U = blocks
    Rn = build_features(R)
    C = kmeans_centers(Rn, 5, seed=0) if base == "JS" else None
    want = select(base, Rn, 60, centers=C)
    meta = select(f"METADATA_{base}", R, 60, meta_emb=M, weights=(1.0, 0.0, 0.0), centers=C)
    user = select(f"USER_{base}", R, 60, meta_emb=M, user_emb=U, weights=(1.0, 0.0, 0.0), centers=C)
    for r in (meta, user):
        np.testing.assert_array_equal(r.indices, want.indices)
        np.testing.assert_allclose(r.scores, want.scores, rtol=1e-12)


@pytest.mark.parametrize("strategy", ["METADATA_JS", "METADATA_FISHER", "USER_JS", "USER_FISHER"])
def test_variants_invariant_to_block_scale(blocks, strategy):
    R, M, U = blocks
    user = U if strategy.startswith("USER") else None
    F = build_features(R, M, user)
    C = kmeans_centers(F, 5, seed=0) if strategy.endswith("JS") else None
    a = select(strategy, R, 50, meta_emb=M, user_emb=user, centers=C)
    b = select(strategy, R * 1e3, 50, meta_emb=M * 0.01, user_emb=None if user is None else user * 7.0, centers=C)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-9)
    # and it is the base strategy on the combined features
    base = select(strategy.split("_")[-1], F, 50, centers=C)
    np.testing.assert_array_equal(a.indices, base.indices)
    assert a.params["weights"]["review"] == 1.0


def test_variants_use_extra_blocks(blocks):
    R, M, U = blocks
    a = select("FISHER", build_features(R), 40)
    b = select("METADATA_FISHER", R, 40, meta_emb=M)
    c = select("USER_FISHER", R, 40, meta_emb=M, user_emb=U)
    assert not np.array_equal(a.indices, b.indices)
    assert not np.array_equal(b.indices, c.indices)
    # still the reference criterion on the combined matrix
    assert_same(c, *ref_select_fisher(build_features(R, M, U), 40))


# --------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------


def test_selection_summary(blob_data):
    X, y = blob_data
    C = kmeans_centers(X, 6, seed=0)
    labels = assign_clusters(X, C)
    np.testing.assert_array_equal(labels, ref_probabilities(X, C).argmax(axis=1))
    items = np.arange(X.shape[0]) // 4  # 100 items, 4 rows each
    users = [[f"u{i % 7}", f"u{(i * 3) % 11 + 7}"] for i in range(X.shape[0])]
    r = select("JS", X, 60, centers=C)
    s = selection_summary(X, r.indices, labels, item_ids=items, user_ids_per_row=users)
    hit = np.unique(labels[r.indices])
    assert s["clusters_hit"] == hit.size and s["n_clusters"] == np.unique(labels).size
    assert s["cluster_coverage"] == pytest.approx(hit.size / np.unique(labels).size)
    f = np.bincount(labels[r.indices]) / 60
    f = f[f > 0]
    assert s["cluster_entropy"] == pytest.approx(-(f * np.log(f)).sum())
    assert 0 <= s["cluster_entropy_norm"] <= 1
    assert s["item_coverage"] == pytest.approx(np.unique(items[r.indices]).size / 100)
    picked_users = {u for i in r.indices for u in users[i]}
    all_users = {u for row in users for u in row}
    assert s["user_coverage"] == pytest.approx(len(picked_users) / len(all_users))
    Z = X[r.indices]
    dists = [np.linalg.norm(Z[a] - Z[b]) for a in range(60) for b in range(a + 1, 60)]
    assert s["mean_pairwise_distance"] == pytest.approx(np.mean(dists), rel=1e-9)
    assert s["n_selected"] == 60 and sum(s["cluster_histogram"].values()) == 60
    assert s["mean_pairwise_distance_all"] > 0


def test_selection_summary_samples_large_selections():
    X = unit_rows(3000, 8, 2)
    labels = np.zeros(3000, dtype=int)
    idx = np.arange(2500)
    a = selection_summary(X, idx, labels, seed=1)
    b = selection_summary(X, idx, labels, seed=1)
    assert a["mean_pairwise_distance"] == b["mean_pairwise_distance"]
    assert a["item_coverage"] is None and a["user_coverage"] is None
    assert a["cluster_coverage"] == 1.0 and a["cluster_entropy"] == 0.0
    empty = selection_summary(X, [], labels)
    assert empty["n_selected"] == 0 and empty["mean_pairwise_distance"] is None


# --------------------------------------------------------------------------
# bad input: clear errors, raised before any work
# --------------------------------------------------------------------------


def test_error_types():
    assert issubclass(SelectionError, ValueError) and issubclass(SelectionError, CRSError)


def _err(match, *args, **kwargs):
    with pytest.raises(SelectionError, match=match):
        select(*args, **kwargs)


def test_bad_budget(small):
    _err("budget must be >= 1", "FISHER", small, 0)
    _err("budget must be >= 1", "FISHER", small, -3)
    _err("larger than the 60 rows left", "FISHER", small, 61)
    _err("larger than the 50 rows left", "FISHER", small, 51, already_selected=range(10))
    _err("budget must be an integer", "FISHER", small, 2.5)


def test_bad_strategy(small):
    with pytest.raises(SelectionError) as e:
        select("KMEANS", small, 3)
    for name in strategy_names():
        assert name in str(e.value)


def test_bad_lambda(small):
    C = kmeans_centers(small, 3)
    _err("lam must be finite and >= 0", "JS", small, 3, centers=C, lam=-0.1)
    _err("lam must be finite and >= 0", "JS", small, 3, centers=C, lam=float("nan"))


def test_bad_embeddings_name_rows(small):
    X = small.copy()
    X[4, 1] = np.nan
    X[9, 0] = np.inf
    _err(r"NaN or infinite values in rows 4, 9", "FISHER", X, 3)
    Z = small.copy()
    Z[[2, 30]] = 0.0
    _err(r"zero-norm rows 2, 30", "FISHER", Z, 3)
    _err("2-D", "FISHER", small[0], 1)
    _err("numeric", "FISHER", np.array([["a", "b"]]), 1)
    with pytest.raises(SelectionError, match=r"meta_emb has zero-norm rows 7"):
        M = np.ones((60, 3))
        M[7] = 0
        select("METADATA_FISHER", small, 3, meta_emb=M)


def test_bad_centers(small):
    C = kmeans_centers(small, 3)
    _err("needs centers", "JS", small, 3)
    _err("centers have 4 columns but the JS features have 5", "JS", small, 3, centers=np.ones((3, 4)))
    _err("more centres .61. than rows .60.", "JS", small, 3, centers=np.random.default_rng(0).standard_normal((61, 5)))
    _err("at least 2 centres", "JS", small, 3, centers=C[:1])
    _err("only used by the JS strategies", "FISHER", small, 3, centers=C)
    bad = C.copy()
    bad[1, 2] = np.nan
    _err("centers has NaN or infinite values in rows 1", "JS", small, 3, centers=bad)
    with pytest.raises(SelectionError, match=r"k \(61\) is larger than the number of rows \(60\)"):
        kmeans_centers(small, 61)
    M = np.ones((60, 3)) + np.arange(3)
    _err("compute them on build_features", "METADATA_JS", small, 3, meta_emb=M, centers=C)


def test_bad_blocks(small):
    rng = np.random.default_rng(0)
    M = rng.standard_normal((59, 3))
    _err("meta_emb has 59 rows but review_emb has 60", "METADATA_FISHER", small, 3, meta_emb=M)
    _err("needs meta_emb", "METADATA_FISHER", small, 3)
    _err("needs user_emb", "USER_FISHER", small, 3, meta_emb=rng.standard_normal((60, 3)))
    _err("only used by METADATA_", "FISHER", small, 3, meta_emb=rng.standard_normal((60, 3)))
    _err("weights must be finite and >= 0", "METADATA_FISHER", small, 3, meta_emb=rng.standard_normal((60, 3)), weights=(1, -1, 0))
    _err("weights must be three numbers", "METADATA_FISHER", small, 3, meta_emb=rng.standard_normal((60, 3)), weights=(1, 1))
    with pytest.raises(SelectionError, match="all 0"):
        build_features(small, weights=(0.0, 1.0, 1.0))


def test_bad_already_selected(small):
    _err("outside 0..59: 60", "FISHER", small, 3, already_selected=[1, 60])
    _err("repeats rows 4", "FISHER", small, 3, already_selected=[4, 2, 4])
    _err("integers", "FISHER", small, 3, already_selected=[0.5])


def test_validation_happens_before_work(small):
    calls = []
    with pytest.raises(SelectionError):
        select("FISHER", small, 61, progress=lambda d, t: calls.append(d))
    assert calls == []
    _err("progress must be a callable", "FISHER", small, 3, progress=5)


def test_summary_bad_input(small):
    with pytest.raises(SelectionError, match="one label per row"):
        selection_summary(small, [0, 1], np.zeros(10))
    with pytest.raises(SelectionError, match="outside"):
        selection_summary(small, [0, 99], np.zeros(60))
    with pytest.raises(SelectionError, match="item_ids must have one entry per row"):
        selection_summary(small, [0, 1], np.zeros(60), item_ids=[1, 2])
