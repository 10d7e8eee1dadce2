"""Selection's numerics below the strategies: constants, input validation, feature blocks, K-means
centres, cluster probabilities, entropy and the Jensen-Shannon divergence (arXiv 2504.15476,
§3.2). Used through `crs_core.select`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import ThreadpoolController  # BLAS thread control (a dependency of scikit-learn)

from crs_core import strategies
from crs_core.errors import CRSError
from crs_core.strategies import Strategy


#: default block weights (review, metadata, user) for :func:`build_features`
DEFAULT_WEIGHTS: tuple[float, float, float] = (1.0, 1.0, 1.0)
#: scores within TIE_ATOL * max(1, |best|) of the best count as ties (lowest index wins)
TIE_ATOL = 1e-10
#: K-means restarts used by :func:`kmeans_centers` (fixed so results are reproducible)
KMEANS_N_INIT = 4

_LOG2 = math.log(2.0)
# numerical slack (absolute) added when comparing an upper bound with a score
_SAFETY = 1e-12
# slack inside the square root of a candidate's cached JS (entropy formula,
# absolute rounding error ~1e-15); distances between reference distributions
# use the relative-accuracy js_divergence and a relative slack instead
_EPS_JS = 1e-13
_REL_JS = 1e-12
_CHUNK = 8192  # rows per block when converting X to float64 on the fly
_BIG_GEMM = 20_000_000  # multiply-adds from which a GEMM may use all BLAS threads

_THREADS = {"ctl": None, "max": None}


def _blas_threads(n: int | None):
    """Context limiting BLAS threads (None: the number in effect when select() started).

    The greedy loop does thousands of tiny matrix-vector products; multi-threaded
    BLAS only adds synchronisation there (and thrashes on a busy machine), so
    select() runs single-threaded and lets only the large refresh GEMMs use all
    threads.
    """
    if _THREADS["ctl"] is None:
        try:
            ctl = ThreadpoolController()
            _THREADS["max"] = max([i["num_threads"] for i in ctl.info() if i["user_api"] == "blas"] or [1])
            _THREADS["ctl"] = ctl
        except Exception:  # pragma: no cover
            return contextlib.nullcontext()
    return _THREADS["ctl"].limit(limits=n if n is not None else _THREADS["max"], user_api="blas")


class SelectionError(CRSError, ValueError):
    """Invalid selection request (raised before any work is done)."""


@dataclass(frozen=True)
class SelectionResult:
    """Ordered picks of one :func:`select` call.

    ``indices``: row indices in pick order (int64); ``scores``: objective value
    of each pick when it was picked (float64); ``strategy``: canonical name;
    ``params``: everything needed to reproduce the call; ``stats``: counters
    about the lazy evaluation (informative only).
    """

    indices: np.ndarray
    scores: np.ndarray
    strategy: str
    params: dict
    stats: dict = field(default_factory=dict, compare=False)

    def __len__(self) -> int:
        return int(self.indices.shape[0])


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------


def _rows_text(rows: np.ndarray, limit: int = 10) -> str:
    rows = [int(r) for r in rows]
    shown = ", ".join(str(r) for r in rows[:limit])
    if len(rows) > limit:
        shown += f", ... ({len(rows)} rows)"
    return shown


def _as_matrix(A, name: str, *, check_zero: bool = True) -> np.ndarray:
    """2-D finite float matrix (float32 kept, everything else -> float64)."""
    if A is None:
        raise SelectionError(f"{name} is missing")
    A = np.asarray(A)
    if A.dtype == object or not (np.issubdtype(A.dtype, np.floating) or np.issubdtype(A.dtype, np.integer)):
        raise SelectionError(f"{name} must be a numeric matrix, got dtype {A.dtype}")
    if A.ndim != 2:
        raise SelectionError(f"{name} must be a 2-D matrix (rows x dims), got shape {A.shape}")
    if A.shape[0] == 0 or A.shape[1] == 0:
        raise SelectionError(f"{name} is empty (shape {A.shape})")
    if A.dtype != np.float32 and A.dtype != np.float64:
        A = A.astype(np.float64)
    A = np.ascontiguousarray(A)
    bad = ~np.isfinite(A).all(axis=1)
    if bad.any():
        raise SelectionError(f"{name} has NaN or infinite values in rows {_rows_text(np.flatnonzero(bad))}")
    if check_zero:
        zero = ~(A != 0).any(axis=1)
        if zero.any():
            raise SelectionError(
                f"{name} has zero-norm rows {_rows_text(np.flatnonzero(zero))} "
                "(an all-zero embedding carries no information; drop or re-embed these rows)"
            )
    return A


def _strategy(strategy) -> Strategy:
    name = str(strategy).strip().upper() if isinstance(strategy, str) else None
    try:
        return strategies.get(name or "")
    except KeyError:
        raise SelectionError(f"unknown strategy {strategy!r}; valid strategies: "
                             f"{', '.join(strategies.names())}") from None


def _as_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise SelectionError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _as_weights(weights) -> tuple[float, float, float]:
    if weights is None:
        return DEFAULT_WEIGHTS
    try:
        w = tuple(float(v) for v in weights)
    except (TypeError, ValueError):
        raise SelectionError(f"weights must be three numbers (review, metadata, user), got {weights!r}") from None
    if len(w) != 3:
        raise SelectionError(f"weights must be three numbers (review, metadata, user), got {len(w)}")
    if any(not math.isfinite(v) or v < 0 for v in w):
        raise SelectionError(f"weights must be finite and >= 0, got {w}")
    return w  # type: ignore[return-value]


# --------------------------------------------------------------------------
# features, clustering, probabilities
# --------------------------------------------------------------------------


def build_features(
    review_emb, meta_emb=None, user_emb=None, weights=DEFAULT_WEIGHTS, *, dtype=np.float64
) -> np.ndarray:
    """Combined features ``concat_b sqrt(w_b / W) * e_b / ||e_b||`` (unit rows).

    Blocks: review embedding (required), item-metadata embedding and
    collaborative (user) factors (optional); all must have the same number of
    rows.  ``weights = (w_review, w_meta, w_user)``; a block with weight 0 is
    left out; ``W`` is the sum of the weights of the blocks present.  With only
    the review block the result is the unit-normalised review embedding.
    """
    w = _as_weights(weights)
    blocks = [("review_emb", review_emb, w[0]), ("meta_emb", meta_emb, w[1]), ("user_emb", user_emb, w[2])]
    present = []
    n_rows = None
    for name, emb, wb in blocks:
        if emb is None:
            continue
        E = _as_matrix(emb, name)
        if n_rows is None:
            n_rows = E.shape[0]
        elif E.shape[0] != n_rows:
            raise SelectionError(
                f"{name} has {E.shape[0]} rows but review_emb has {n_rows}; blocks must align row by row"
            )
        present.append((name, E, wb))
    if not present or present[0][0] != "review_emb":
        raise SelectionError("review_emb is missing")
    total = sum(wb for _, _, wb in present)
    if total <= 0:
        raise SelectionError(f"the weights of the blocks given are all 0: {w}")
    parts = []
    for _, E, wb in present:
        if wb == 0:
            continue
        E64 = E.astype(np.float64)
        E64 /= np.linalg.norm(E64, axis=1, keepdims=True)
        E64 *= math.sqrt(wb / total)
        parts.append(E64.astype(dtype, copy=False))
    return np.ascontiguousarray(np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])


def kmeans_centers(X, k: int, seed: int = 0, *, max_samples: int | None = None) -> np.ndarray:
    """K-means centres (float64, k x d) with scikit-learn, ``n_init`` fixed.

    ``max_samples``: fit on a seeded uniform subsample of at most this many rows
    (K-means on 100k x 384 is slow; centres from a subsample are fine for JS).
    """
    from sklearn.cluster import KMeans

    X = _as_matrix(X, "X", check_zero=False)
    k = _as_int(k, "k")
    n = X.shape[0]
    if k < 1:
        raise SelectionError(f"k must be >= 1, got {k}")
    rows = X
    if max_samples is not None:
        max_samples = _as_int(max_samples, "max_samples")
        if max_samples < k:
            raise SelectionError(f"max_samples ({max_samples}) must be >= k ({k})")
        if n > max_samples:
            idx = np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))
            rows = X[idx]
    if k > rows.shape[0]:
        raise SelectionError(f"k ({k}) is larger than the number of rows ({rows.shape[0]})")
    km = KMeans(n_clusters=k, n_init=KMEANS_N_INIT, random_state=seed)
    km.fit(rows.astype(np.float64))
    return np.ascontiguousarray(km.cluster_centers_, dtype=np.float64)


def _center_distances(X: np.ndarray, C: np.ndarray, rows: slice) -> np.ndarray:
    """Exact-enough Euclidean distances ||x_i - c_j|| for one block of rows (float64)."""
    Xc = X[rows].astype(np.float64)
    xx = np.einsum("ij,ij->i", Xc, Xc)
    cc = np.einsum("ij,ij->i", C, C)
    D2 = xx[:, None] + cc[None, :] - 2.0 * (Xc @ C.T)
    # the Gram expansion loses relative accuracy when a row is close to a
    # centre; recompute those distances directly
    close = D2 < 1e-4 * (xx[:, None] + cc[None, :])
    if close.any():
        ii, jj = np.nonzero(close)
        diff = Xc[ii] - C[jj]
        D2[ii, jj] = np.einsum("ij,ij->i", diff, diff)
    np.maximum(D2, 0.0, out=D2)
    return np.sqrt(D2)


def cluster_probabilities(X, centers) -> np.ndarray:
    """``p_ij = softmax_j(-||x_i - c_j||)`` (N x K float64)."""
    X = _as_matrix(X, "X", check_zero=False)
    C = _as_matrix(centers, "centers", check_zero=False).astype(np.float64)
    if C.shape[1] != X.shape[1]:
        raise SelectionError(f"centers have {C.shape[1]} columns but X has {X.shape[1]}")
    return _cluster_probabilities(X, C)


def _cluster_probabilities(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    n = X.shape[0]
    P = np.empty((n, C.shape[0]), dtype=np.float64)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(n, start + _CHUNK))
        D = _center_distances(X, C, sl)
        D -= D.min(axis=1, keepdims=True)
        np.exp(-D, out=D)
        D /= D.sum(axis=1, keepdims=True)
        P[sl] = D
    return P


def _xlogx_rowsum(A: np.ndarray) -> np.ndarray:
    """sum_j a_j log a_j per row, with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        L = np.log(A)
    if not np.all(A > 0):
        L[A <= 0] = 0.0
    return np.einsum("ij,ij->i", A, L) if A.ndim == 2 else np.dot(A, L)


def entropy(P) -> np.ndarray | float:
    """Shannon entropy ``-sum p log p`` (natural log, 0 log 0 = 0) of each row (or of a vector)."""
    P = np.asarray(P, dtype=np.float64)
    if P.ndim == 1:
        return float(-_xlogx_rowsum(P[None, :])[0])
    return -_xlogx_rowsum(P)


def js_divergence(P, Q) -> np.ndarray | float:
    """Jensen-Shannon divergence ``KL(P||M)/2 + KL(Q||M)/2``, ``M=(P+Q)/2``, natural log.

    Rows of P against Q (Q a vector or a matrix of the same shape).  Computed
    with relative (not only absolute) accuracy, also for nearly equal
    distributions: per component, with ``s = p+q`` and ``r = (p-q)/s``,
    ``p log(2p/s) + q log(2q/s) = (s/2) * (2 r atanh(r) + log1p(-r^2))``
    (``= s log 2`` when one of p, q is 0; ``0 log 0 = 0``).
    """
    P = np.asarray(P, dtype=np.float64)
    Q = np.asarray(Q, dtype=np.float64)
    vec = P.ndim == 1 and Q.ndim == 1
    P2 = np.atleast_2d(P)
    Q2 = np.broadcast_to(np.atleast_2d(Q), P2.shape) if Q.ndim == 1 else np.atleast_2d(Q)
    if Q2.shape != P2.shape:
        raise SelectionError(f"js_divergence: shapes {P2.shape} and {Q2.shape} differ")
    S = P2 + Q2
    with np.errstate(divide="ignore", invalid="ignore"):
        R = np.where(S > 0, (P2 - Q2) / S, 0.0)
        edge = np.abs(R) >= 1.0
        G = 2.0 * R * np.arctanh(np.where(edge, 0.0, R)) + np.log1p(-np.where(edge, 0.0, R * R))
    G[edge] = 2.0 * _LOG2
    out = 0.25 * np.einsum("ij,ij->i", S, G)
    np.clip(out, 0.0, _LOG2, out=out)
    return float(out[0]) if vec else out


def _js_vec(p: np.ndarray, q: np.ndarray) -> float:
    """js_divergence for two 1-D distributions, without the broadcasting overhead."""
    sm = p + q
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(sm > 0, (p - q) / sm, 0.0)
    edge = np.abs(r) >= 1.0
    if edge.any():
        rr = np.where(edge, 0.0, r)
        g = 2.0 * rr * np.arctanh(rr) + np.log1p(-rr * rr)
        g[edge] = 2.0 * _LOG2
    else:
        g = 2.0 * r * np.arctanh(r) + np.log1p(-r * r)
    return min(max(0.25 * float(sm @ g), 0.0), _LOG2)


def assign_clusters(X, centers) -> np.ndarray:
    """Index of the nearest centre (Euclidean) for every row (int64)."""
    X = _as_matrix(X, "X", check_zero=False)
    C = _as_matrix(centers, "centers", check_zero=False).astype(np.float64)
    if C.shape[1] != X.shape[1]:
        raise SelectionError(f"centers have {C.shape[1]} columns but X has {X.shape[1]}")
    out = np.empty(X.shape[0], dtype=np.int64)
    for start in range(0, X.shape[0], _CHUNK):
        sl = slice(start, min(X.shape[0], start + _CHUNK))
        out[sl] = _center_distances(X, C, sl).argmin(axis=1)
    return out
