"""The literal reference of active selection (arXiv 2504.15476, section 3.2): every score
recomputed from scratch at every step, straight from the formulas (explicit
Lambda = inv(I + sum x x^T), explicit KL-based JS), the data the tests draw, and their shared
fixtures. tests/test_select.py and tests/test_select_engines.py hold crs_core.select to it, and
bench/select_bench.py times it.
"""

from __future__ import annotations

import numpy as np
import pytest

from crs_core.select import TIE_ATOL, SelectionResult

# --------------------------------------------------------------------------
# literal reference implementation
# --------------------------------------------------------------------------


def ref_pick(scores: np.ndarray) -> int:
    """Documented tie rule: lowest index among scores within TIE_ATOL*max(1,|best|) of the best."""
    best = scores.max()
    tol = TIE_ATOL * max(1.0, abs(best))
    for i in range(scores.shape[0]):
        if scores[i] >= best - tol:
            return i
    raise AssertionError("unreachable")


def ref_probabilities(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    """p_ij = exp(-||x_i - c_j||) / sum_k exp(-||x_i - c_k||), distances computed directly."""
    X = np.asarray(X, dtype=np.float64)
    C = np.asarray(C, dtype=np.float64)
    D = np.empty((X.shape[0], C.shape[0]))
    for j in range(C.shape[0]):
        D[:, j] = np.linalg.norm(X - C[j], axis=1)
    logits = -D
    logits -= logits.max(axis=1, keepdims=True)  # same value, avoids overflow
    E = np.exp(logits)
    return E / E.sum(axis=1, keepdims=True)


def ref_entropy(P: np.ndarray) -> np.ndarray:
    """H(p) = -sum_j p_j log p_j with 0 log 0 = 0 (the paper prints the sign wrong)."""
    P = np.atleast_2d(P)
    out = np.zeros(P.shape[0])
    for j in range(P.shape[1]):
        pj = P[:, j]
        out -= np.where(pj > 0, pj * np.log(np.where(pj > 0, pj, 1.0)), 0.0)
    return out


def ref_kl(P: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """KL(P||Q) = sum_j p_j log(p_j / q_j), 0 log 0 = 0 (Q > 0 wherever P > 0 here)."""
    P = np.atleast_2d(P)
    Q = np.broadcast_to(np.atleast_2d(Q), P.shape)
    out = np.zeros(P.shape[0])
    for j in range(P.shape[1]):
        pj, qj = P[:, j], Q[:, j]
        safe = pj > 0
        out += np.where(safe, pj * np.log(np.where(safe, pj, 1.0) / np.where(safe, qj, 1.0)), 0.0)
    return out


def ref_js(P: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """JS(P||Q) = KL(P||M)/2 + KL(Q||M)/2, M = (P+Q)/2."""
    P = np.atleast_2d(P)
    Q = np.broadcast_to(np.atleast_2d(Q), P.shape)
    M = 0.5 * (P + Q)
    return 0.5 * ref_kl(P, M) + 0.5 * ref_kl(Q, M)


def _ref_greedy(scores_of, budget, already):
    """Greedy picks: at every step score every row from scratch (`scores_of(selected)`) and
    take the best row not selected yet under the tie rule."""
    selected = list(already)
    picks, scores = [], []
    for _ in range(budget):
        s = scores_of(selected)
        s[selected] = -np.inf
        i = ref_pick(s)
        picks.append(i)
        scores.append(s[i])
        selected.append(i)
    return np.array(picks), np.array(scores)


def ref_select_js(X, C, budget, lam=1.0, already=()):
    P = ref_probabilities(X, C)
    H = ref_entropy(P)

    def scores_of(selected):
        if not selected:
            return H.copy()
        m = P[selected].mean(axis=0)
        return H + lam * ref_js(P, m)

    return _ref_greedy(scores_of, budget, already)


def ref_select_fisher(X, budget, already=()):
    X = np.asarray(X, dtype=np.float64)
    d = X.shape[1]

    def scores_of(selected):
        Xs = X[selected]
        Lam = np.linalg.inv(np.eye(d) + Xs.T @ Xs)  # (I + sum_{selected} x x^T)^-1
        q = np.einsum("ij,ij->i", X @ Lam, X)
        return np.log(1.0 + q)

    return _ref_greedy(scores_of, budget, already)


def sherman_morrison_lambda(X, order):
    """Lambda after rank-1 updates in pick order (the paper's update, literally)."""
    X = np.asarray(X, dtype=np.float64)
    Lam = np.eye(X.shape[1])
    for i in order:
        v = Lam @ X[i]
        Lam = Lam - np.outer(v, v) / (1.0 + X[i] @ v)
    return Lam


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


def unit_rows(n, d, seed):
    X = np.random.default_rng(seed).standard_normal((n, d))
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def blobs(n, d, centers, seed):
    from sklearn.datasets import make_blobs

    X, y = make_blobs(n_samples=n, n_features=d, centers=centers, cluster_std=2.0, random_state=seed)
    X = X - X.mean(axis=0)  # centred, then unit-normalised like sentence embeddings
    return X / np.linalg.norm(X, axis=1, keepdims=True), y


@pytest.fixture(scope="module", autouse=True)
def _single_threaded_blas():
    """Tiny matrices: thread pools only add overhead (and thrash on a busy machine)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(1)
    return rng.standard_normal((60, 5))


@pytest.fixture(scope="module")
def unit384():
    return unit_rows(300, 384, 7)


@pytest.fixture(scope="module")
def blob_data():
    X, y = blobs(400, 16, 6, 3)
    return X, y


def assert_same(fast: SelectionResult, ref_idx, ref_scores):
    np.testing.assert_array_equal(fast.indices, ref_idx)
    np.testing.assert_allclose(fast.scores, ref_scores, rtol=1e-9, atol=1e-12)
