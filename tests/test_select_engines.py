"""The lazy machinery of crs_core.select_engines, stressed with tiny pools and tiers so every
path runs: the picks stay exactly the literal reference's, and the bounds behind that exactness
(float32 error per row in every Fisher tier, the JS outside bound) hold at every step.
"""

from __future__ import annotations

import numpy as np
import pytest

from crs_core import select_engines
from crs_core.select import TIE_ATOL, cluster_probabilities, kmeans_centers, select
from select_reference import (_single_threaded_blas, assert_same, blob_data, ref_entropy,  # noqa: F401 (fixtures)
                              ref_js, ref_probabilities, ref_select_fisher, ref_select_js, unit384, unit_rows)


@pytest.fixture
def tiny_pools(monkeypatch):
    """Force the lazy machinery to work hard: tiny tiers and pools, short blocks, every path."""
    monkeypatch.setattr(select_engines._FisherEngine, "M_START", 4)
    monkeypatch.setattr(select_engines._FisherEngine, "M_MIN", 2)
    monkeypatch.setattr(select_engines._FisherEngine, "TOP_START", 2)
    monkeypatch.setattr(select_engines._FisherEngine, "TOP_MIN", 1)
    monkeypatch.setattr(select_engines._FisherEngine, "BLOCK_MAX", 9)
    monkeypatch.setattr(select_engines._FisherEngine, "CHUNK", 64)
    monkeypatch.setattr(select_engines._FisherEngine, "LAM_FLUSH", 5)
    monkeypatch.setattr(select_engines._JSEngine, "POOL_START", 2)
    monkeypatch.setattr(select_engines._JSEngine, "POOL_FLOOR", 1)



@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fisher_lazy_paths_match_reference(blob_data, tiny_pools, dtype):
    X = blob_data[0].astype(dtype)
    fast = select("FISHER", X, 150)
    assert_same(fast, *ref_select_fisher(X, 150))
    st = fast.stats
    assert st["blocks"] > 10 and st["top_blocks"] > st["blocks"]
    assert st["bulk_macs"] > 0 and st["mid_macs"] > 0 and st["exact_rows"] > 0 and st["compactions"] > 0


def test_fisher_lazy_paths_unit384(unit384, tiny_pools):
    fast = select("FISHER", unit384, 100)  # d > picks: U-path refreshes; float64 input -> float32 bulk
    assert_same(fast, *ref_select_fisher(unit384, 100))


def test_fisher_lambda_path_and_continuation(tiny_pools):
    # d small vs budget: bounds older than d picks are recomputed exactly through Lambda
    X = unit_rows(500, 6, 4)
    fast = select("FISHER", X, 120)
    assert_same(fast, *ref_select_fisher(X, 120))
    first = select("FISHER", X, 50)
    rest = select("FISHER", X, 70, already_selected=first.indices)
    np.testing.assert_array_equal(np.concatenate([first.indices, rest.indices]), fast.indices)


def test_fisher_all_ties_tiny_scale(blob_data, tiny_pools):
    X, _ = blob_data
    # every score is ~1e-34: all tie under the tie rule -> rows in index order
    tiny = select("FISHER", X * 1e-17, 20)
    assert_same(tiny, *ref_select_fisher(X * 1e-17, 20))
    np.testing.assert_array_equal(tiny.indices, np.arange(20))


@pytest.mark.parametrize("lam", [0.0, 1.0, 4.0])
def test_js_lazy_paths_match_reference(blob_data, tiny_pools, lam):
    X, _ = blob_data
    C = kmeans_centers(X, 6, seed=2)
    fast = select("JS", X, 150, centers=C, lam=lam)
    assert_same(fast, *ref_select_js(X, C, 150, lam=lam))
    assert fast.stats["rebuilds"] > 10


def test_js_lazy_paths_unit384_and_continuation(unit384, tiny_pools):
    C = kmeans_centers(unit384, 10, seed=0)
    fast = select("JS", unit384, 100, centers=C)
    assert_same(fast, *ref_select_js(unit384, C, 100))
    first = select("JS", unit384, 37, centers=C)
    rest = select("JS", unit384, 63, centers=C, already_selected=first.indices)
    np.testing.assert_array_equal(np.concatenate([first.indices, rest.indices]), fast.indices)


def _true_q(X64, picked):
    Lam = np.linalg.inv(np.eye(X64.shape[1]) + X64[picked].T @ X64[picked])
    return np.einsum("ij,ij->i", X64 @ Lam, X64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fisher_bounds_hold_in_every_tier(tiny_pools, dtype):
    # invariant behind exactness: in every tier |estimate - x^T Lambda x| <= E at the
    # tier's step (float32 rounding included), and E == 0 means exact
    X = unit_rows(400, 24, 9).astype(dtype)
    X64 = X.astype(np.float64)
    eng = select_engines._FisherEngine(X, np.zeros(0, dtype=np.int64), 80)
    picked = []
    checked = 0
    for _ in range(80):
        w, _ = eng.step()
        picked.append(w)
        tiers = [(eng.bulk, eng.bidx)]
        if eng.mid is not None:
            tiers.append((eng.mid, eng.bidx[eng.mid_pos]))
        for tier, rows in tiers:
            live = np.isfinite(tier.qt)
            if tier is eng.bulk and eng.mid is None:
                assert not np.isin(rows[live], picked).any()
            live &= ~np.isin(rows, picked)  # a pick reaches lower tiers when the tier above ends
            q = _true_q(X64, picked[: tier.s])[rows[live]]
            assert np.all(np.abs(tier.qt[live] - q) <= tier.E[live] + 1e-12)
            exact = tier.E[live] == 0
            np.testing.assert_allclose(tier.qt[live][exact], q[exact], rtol=1e-10, atol=1e-13)
            checked += int(live.sum())
        if eng.top is not None:
            top = eng.top
            live = np.isfinite(top["q"])
            q = _true_q(X64, picked)[eng.bidx[eng.mid_pos[top["pos"]]]][live]
            assert np.all(np.abs(top["q"][live] - q) <= top["E"][live] + 1e-12)
    assert checked > 0 and eng.stats["exact_rows"] > 0
    assert eng.bulk.E.max() > 0  # float32 work happened and was accounted for


@pytest.mark.parametrize("scale", [1.0, 1e-15, 1e14])
def test_float32_dot_error_factor_is_a_bound(scale):
    # e_i bounds |z_i . v - fl32(z32_i . fl32(v))| for unit v, also for rows stored scaled
    rng = np.random.default_rng(3)
    X = rng.standard_normal((300, 384)) * scale
    X[:5] *= rng.uniform(0.5, 2.0, size=(5, 1))
    eng = select_engines._FisherEngine(X, np.zeros(0, dtype=np.int64), 1)
    b = eng.bulk
    Z = X / (np.sqrt(b.rho)[:, None] if b.rho is not None else 1.0)
    assert (b.rho is None) == (scale == 1.0)
    V = rng.standard_normal((64, 384))
    V[:4] = np.eye(384)[:4]  # axis-aligned directions too
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    err = np.abs(Z @ V.T - (b.Z32 @ V.T.astype(np.float32)).astype(np.float64))
    assert np.all(err <= b.e[:, None])
    assert (b.e / np.linalg.norm(Z, axis=1)).max() < 1e-4  # and not uselessly loose


def _float32_twin(X, r, Lam, size):
    """Row r rounded to few mantissa bits plus ``size`` along mask * (Lam x_r), orthogonal to x_r.

    The twin equals row r after rounding to float32 (|perturbation| < half an ulp
    of every coordinate it touches), but x^T Lam x differs by ~2 size x_r^T Lam v.
    """
    x = X[r]
    mask = np.abs(x) >= 0.25  # float32 half-ulp there >= 2^-26 > 1.4e-8
    v = mask * (Lam @ x)
    xm = x * mask
    v -= (v @ xm) / (xm @ xm) * xm
    return x + size * v / np.abs(v).max()


def test_float32_near_tie_is_decided_in_float64(tiny_pools):
    # row 178 is a float32-identical twin of row 47 whose score is higher by ~1e-9
    # (10x the tie tolerance, far below float32 resolution): it must be picked, not 47;
    # row 262 is a twin of row 230 within the tie tolerance: the lower index wins
    X = unit_rows(300, 12, 11)
    X[[47, 230]] = np.round(X[[47, 230]] * 4096) / 4096
    first, _ = ref_select_fisher(X, 30)
    Lam = np.linalg.inv(np.eye(12) + X[first].T @ X[first])
    X[178] = _float32_twin(X, 47, Lam, 1.4e-8)
    X[262] = _float32_twin(X, 230, Lam, 1e-15)
    assert np.array_equal(X[[47, 230]].astype(np.float32), X[[178, 262]].astype(np.float32))
    ref_idx, ref_scores = ref_select_fisher(X, 60)
    order = ref_idx.tolist()
    assert 178 in order and 47 not in order[: order.index(178)]
    assert 230 in order and 262 not in order[: order.index(230)]
    q = np.einsum("ij,ij->i", X @ Lam, X)
    assert 5 * TIE_ATOL < (q[178] - q[47]) / (1 + q[47]) < 1e-7  # a real near-tie, unresolvable in float32
    fast = select("FISHER", X, 60)
    assert_same(fast, ref_idx, ref_scores)
    assert fast.stats["mid_macs"] > 0 and fast.stats["exact_rows"] > 0


def test_js_outside_bound_is_an_upper_bound(blob_data, tiny_pools):
    X, _ = blob_data
    C = kmeans_centers(X, 6, seed=0)
    P = ref_probabilities(X, C)
    H = ref_entropy(P)
    eng = select_engines._JSEngine(cluster_probabilities(X, C), np.zeros(0, dtype=np.int64), 1.5)
    picked = []
    for _ in range(120):
        w, _ = eng.step()
        picked.append(w)
        if eng.pool is None:
            continue
        m = P[picked].mean(axis=0)
        true = H + 1.5 * ref_js(P, m)
        outside = np.ones(X.shape[0], dtype=bool)
        outside[picked] = False
        outside[eng.pool["idx"]] = False
        if outside.any():
            assert true[outside].max() <= eng._outside_bound(eng.m) + 1e-12

