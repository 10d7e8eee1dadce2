"""Active sample selection (section 3.2 of "From Reviews to Dialogues: Active
Synthesis for Zero-Shot LLM-based CRS", arXiv 2504.15476).

Selection works over the rows of a matrix ``X`` (N x d); the caller decides
what a row is (a review, an item, ...).  Pure numpy; no Streamlit, no storage.

Strategies
----------
``RANDOM_UNIFORM``
    Seeded uniform sampling without replacement: ``default_rng(seed)`` draws
    one permutation of all N rows; picks are the first rows of that permutation
    that are not already selected.  There is no objective, so scores are 0.

``JS`` (section 3.2.1)
    ``p_i = softmax_j(-||x_i - c_j||)`` over the K centres ``c_j`` (Euclidean
    distance, not squared).  The first pick is ``argmax_i H(p_i)``; every later
    pick maximises ``H(p_i) + lam * JS(p_i || m)`` over the remaining rows, where
    ``m`` is the mean of ``p`` over the rows selected so far.
    The paper prints ``H(p) = sum_j p_j log p_j``; that is the *negative*
    entropy (maximising it would prefer one-hot, certain rows, contradicting
    the text "choosing the review with maximum entropy").  We implement the
    entropy ``H(p) = -sum_j p_j log p_j``.  ``JS(P||Q) = KL(P||M)/2 + KL(Q||M)/2``
    with ``M = (P+Q)/2``, natural log, and ``0 log 0 = 0``; so
    ``0 <= JS <= log 2`` and ``0 <= H <= log K``.

``FISHER`` (section 3.2.2)
    ``Lambda_0 = I_d``; pick ``argmax_i log(1 + x_i^T Lambda_t x_i)`` over the
    remaining rows, then the rank-1 Sherman-Morrison update
    ``Lambda <- Lambda - (Lambda x)(Lambda x)^T / (1 + x^T Lambda x)``, so that
    ``Lambda_t = (I + sum_{selected} x x^T)^{-1}``.

``METADATA_JS`` / ``METADATA_FISHER`` / ``USER_JS`` / ``USER_FISHER``
    The same criteria over combined features (see :func:`build_features`):
    review embedding + item-metadata embedding (``METADATA_*``), and in
    addition collaborative factors, e.g. item factors of a truncated SVD of the
    user-item rating matrix (``USER_*``).  The paper does not say how the
    signals are combined; our construction is::

        x_i = concat_b( sqrt(w_b / W) * e_{b,i} / ||e_{b,i}|| ),  W = sum_b w_b

    over the blocks b in (review, metadata, user) with weight ``w_b > 0``
    (blocks with weight 0 are left out).  Consequences:

    * every block is L2-normalised, so scaling a block (or using an embedding
      model with a different output scale) does not change the selection;
    * ``||x_i - x_j||^2 = sum_b (w_b / W) ||e_b,i/|e_b,i| - e_b,j/|e_b,j| ||^2``:
      squared distances are the weight-averaged block distances, so the weights
      say directly how much each signal counts in the K-means / JS geometry;
    * every row has unit norm whatever the weights, so the Fisher prior
      ``Lambda_0 = I`` and the softmax temperature of JS act on the same scale
      as for unit-normalised review embeddings, and with the extra weights set
      to 0 the variant is exactly the base strategy on unit-normalised reviews.

    Default weights ``DEFAULT_WEIGHTS = (1.0, 1.0, 1.0)``: each signal counts
    equally (no prior reason to prefer one).  For the JS variants, the K-means
    centres must be computed on the combined features (the caller passes them;
    see :func:`kmeans_centers`).

Budget, scores, rounds
----------------------
:func:`select` returns the ordered picks and their scores (the objective of
each pick at the time it was picked: ``H`` for the first JS pick,
``H + lam*JS`` after; ``log(1 + x^T Lambda x)`` for Fisher).  Algorithm 1's
rounds (select, synthesise, remove, select again) are supported without
starting over: pass the indices selected so far as ``already_selected`` (in
pick order) and the call continues the greedy sequence, i.e.
``select(B1)`` followed by ``select(B2, already_selected=first.indices)``
picks exactly what ``select(B1 + B2)`` picks.  The state is rebuilt from the
indices (the JS mean distribution; ``Lambda = (I + X_S^T X_S)^{-1}`` for
Fisher), so nothing but the indices has to be stored between rounds.

Tie-breaking
------------
Among candidates whose score is within ``TIE_ATOL * max(1, |best|)`` of the
best score, the one with the lowest row index wins (like ``np.argmax`` for
exact ties).  The tolerance makes the order independent of floating-point
summation order: e.g. all unit-normalised rows have Fisher score ``log 2`` at
the first step up to the last bit, and every correct implementation must then
pick row 0.  It is far below any meaningful score difference.

Speed (exact, not approximate)
------------------------------
Both greedy criteria are evaluated lazily with provable bounds; the picks are
the ones a from-scratch evaluation of every candidate at every step would
make (the tests compare against a literal reference implementation).  A
*pool* of the most promising rows is evaluated exactly at every pick; while
its best score beats a bound on every row outside it by more than the tie
tolerance, its argmax is the global argmax; otherwise it is rebuilt.  Pool
sizes adapt to how long pools live (this affects speed only, never picks).

* Fisher: ``q_i = x_i^T Lambda x_i`` only decreases, so an older value is an
  upper bound.  On isotropic data (the random-unit-vector benchmark) nearly
  every row comes within reach of the maximum every ~100 picks, so lazy
  evaluation saves almost nothing and the work is ``N * d`` multiply-adds
  per pick whatever the schedule.  It is therefore done as large float32
  GEMMs over all rows once per block of picks, with a rigorous bound on the
  float32 error kept per row; only rows whose bound reaches the best score
  are computed in float64 (see :class:`_FisherEngine`).  The picks stay
  those of the float64 reference.
* JS: ``sqrt(JS)`` is a metric (Endres & Schindelin 2003), so a value
  ``c_i = JS(p_i || m_s)`` computed at step s bounds the current one:
  ``sqrt(JS(p_i || m_t)) <= sqrt(c_i) + sqrt(JS(m_s || m_t))``.  Rows outside
  the pool are bounded per bin of that radius with one K-vector JS per pick
  (computed with relative accuracy, see :func:`js_divergence`).

``select`` runs BLAS single-threaded for the thousands of tiny per-pick
products (threads only add synchronisation there) and lets the bulk GEMMs
use all threads.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from crs_core import strategies
from crs_core.errors import CRSError
from crs_core.strategies import Strategy

try:  # BLAS thread control (a dependency of scikit-learn)
    from threadpoolctl import ThreadpoolController
except Exception:  # pragma: no cover
    ThreadpoolController = None

__all__ = [
    "DEFAULT_WEIGHTS",
    "TIE_ATOL",
    "KMEANS_N_INIT",
    "SelectionError",
    "SelectionResult",
    "select",
    "build_features",
    "kmeans_centers",
    "assign_clusters",
    "cluster_probabilities",
    "entropy",
    "js_divergence",
    "selection_summary",
]

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
    if ThreadpoolController is None:
        return contextlib.nullcontext()
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


# --------------------------------------------------------------------------
# greedy engines
# --------------------------------------------------------------------------


def _tie_tol(best: float) -> float:
    return TIE_ATOL * max(1.0, abs(best))


def _pick(scores: np.ndarray) -> tuple[int, float]:
    """Index of the winner under the tie rule (scores of removed rows are -inf)."""
    best = float(scores.max())
    return int(np.flatnonzero(scores >= best - _tie_tol(best))[0]), best


class _Progress:
    def __init__(self, callback, total: int):
        self.callback = callback
        self.total = total
        self.every = max(1, total // 100)

    def __call__(self, done: int) -> None:
        if self.callback is not None and (done % self.every == 0 or done == self.total):
            self.callback(done, self.total)


class _Sizer:
    """Adaptive pool size target (performance only: the picks never depend on it).

    A pool is rebuilt when it can no longer prove its argmax ("expires").  The
    target doubles when pools expire young and halves when they live long.  A
    rebuild may have to take more rows than the target (while bounds are
    loose, e.g. in the first picks); such an oversized pool is rebuilt
    voluntarily after a few picks, when exact values have spread out.
    """

    def __init__(self, n: int, start: int, floor: int, life_lo: int = 6, life_hi: int = 24):
        self.n = n
        self.floor = min(floor, n)
        self.m = min(max(start, self.floor), n)
        self.born = 0
        self.lo, self.hi = life_lo, life_hi

    def expired(self, step: int) -> None:
        life = step - self.born
        if life < self.lo:
            self.m = min(self.n, self.m * 2)
        elif life > self.hi:
            self.m = max(self.floor, self.m // 2)

    def rebuilt(self, step: int, size: int, voluntary: bool) -> None:
        self.born = step
        if voluntary and size > 2 * self.m:
            self.m = min(self.n, size // 2)  # could not shrink: accept a larger target

    def should_shrink(self, step: int, size: int) -> bool:
        """Rebuild voluntarily: the pool is far above target, or has lived long (probe a smaller one)."""
        age = step - self.born
        if age >= 4 and size > 4 * self.m:
            return True
        if age > self.hi and size > self.floor:
            self.m = max(self.floor, min(self.m, size) // 4)
            return True
        return False


# float32 rounding unit
_U32 = 2.0**-24


def _gamma32(d: int) -> float:
    """gamma_d = d u / (1 - d u): relative error bound of any float32 d-term dot product."""
    return d * _U32 / (1.0 - d * _U32)


class _Tier:
    """Rows kept as float32 copies with estimates ``qt`` and error bounds ``E``, all current at step ``s``.

    ``|qt_i - q_i(s)| <= E_i``; ``e_i`` bounds the float32 error of ``z_i . v``
    for unit vectors ``v`` (see :meth:`_FisherEngine._init_float32`); ``q0_i``
    (>= every value of the row) scales the float64 rounding slack; ``rho_i``
    is the squared row scale (None: rows stored unscaled).
    """

    def __init__(self, Z32, qt, E, e, q0, rho, s):
        self.Z32, self.qt, self.E, self.e, self.q0, self.rho, self.s = Z32, qt, E, e, q0, rho, s

    def take(self, pos: np.ndarray) -> "_Tier":
        return _Tier(
            self.Z32[pos], self.qt[pos], self.E[pos], self.e[pos], self.q0[pos],
            None if self.rho is None else self.rho[pos], self.s,
        )

    def advance(self, Uh: np.ndarray, w: np.ndarray, k: int, chunk: int) -> int:
        """Bring every row from step s to k with float32 GEMMs; returns the multiply-adds.

        With ``h = fl32(z32 . fl32(u/|u|))`` (off by at most ``e_i`` from the true
        ``z . u/|u|``), the decrease ``sum_k (x.u_k)^2`` is estimated as
        ``r^2 sum_k |u_k|^2 h_k^2`` (float32 sums, relative error below ``c_b``)
        and ``E`` grows by ``r^2 [e (2 sqrt(sum|u|^2 * D) + e sum|u|^2) + c_b D]``
        (``sum_k eps_k (2|g_k| + eps_k)`` with Cauchy-Schwarz), plus float64
        rounding.
        """
        s = self.s
        if k <= s:
            return 0
        b = k - s
        W = Uh[s:k]
        wv = w[s:k]
        wmax = float(wv.max())
        sv = np.sqrt(wv / wmax).astype(np.float32)  # column weights in (0, 1]: no overflow
        sw = float(wv.sum())
        c_b = 1.1 * (_gamma32(b) + 8 * _U32)
        tiny = wmax * 2 * b * 2.0**-126  # float32 underflow: a square below 2^-126 may be lost entirely
        rel = 2 * (b + 4) * 2.0**-50
        n = self.qt.shape[0]
        for start in range(0, n, chunk):
            sl = slice(start, min(n, start + chunk))
            G = self.Z32[sl] @ W.T
            G *= sv
            D = np.einsum("ij,ij->i", G, G).astype(np.float64)
            D *= wmax
            Dup = D * (1.0 + 2 * c_b) + tiny
            e = self.e[sl]
            inc = e * (2.0 * np.sqrt(sw * Dup) + e * sw) + (Dup - D)
            if self.rho is not None:
                D *= self.rho[sl]
                inc *= self.rho[sl]
            inc += rel * (self.q0[sl] + D)
            self.qt[sl] -= D
            self.E[sl] += inc
        self.s = k
        return n * W.shape[0] * W.shape[1]


def _top_by_bound(qt: np.ndarray, E: np.ndarray, m: int, alive: int) -> tuple[np.ndarray, float]:
    """Positions of the ``m`` unpicked rows with the largest upper bound ``qt + E`` (sorted), and
    the largest bound left out (-inf when every unpicked row is taken); picked rows have qt = -inf."""
    if m >= alive:
        return np.flatnonzero(qt > -np.inf), -np.inf
    ub = qt + E
    part = np.argpartition(-ub, m)
    return np.sort(part[:m]), float(ub[part[m]])


class _FisherEngine:
    """Exact greedy ``argmax log(1 + x^T Lambda x)``: float32 bulk, float64 finalists.

    ``q_i = x_i^T Lambda x_i`` only decreases.  With the Sherman-Morrison
    vectors ``u_k = Lambda_k x_k / sqrt(1 + q_k)``,
    ``q_i(t) = q_i(s) - sum_{s<=k<t} (x_i^T u_k)^2``.  Three tiers of rows:

    * **bulk** (every remaining row): estimate ``qt`` and a rigorous error bound
      ``E`` (``|qt_i - q_i| <= E_i``), brought forward once per *block* of
      picks with float32 GEMMs over all remaining rows (``N * d`` multiply-adds
      per pick at the float32 rate).  One float32 dot product of d terms is off
      by at most ``gamma_d sum_j |z_j v_j|`` in any summation order (Higham,
      *Accuracy and Stability of Numerical Algorithms*, 2002, eq. 3.5), plus
      the rounding of the operands to float32; see :class:`_Tier`.
    * **mid** (the top rows of the bulk by ``qt + E`` when a block starts):
      the same float32 updates every few picks over a gathered copy.
    * **top** (the top rows of mid by ``qt + E``): gathered in float64 and
      updated at every pick with one float64 matrix-vector product (which
      leaves ``E`` unchanged).  Every top row whose upper bound reaches the
      tie band of the best lower bound is computed exactly (float64
      ``x^T Lambda x``, ``E = 0``, passed back down to mid and bulk).

    A pick is certified when the best exact score beats, by more than the tie
    tolerance, the largest upper bound outside the top tier (taken when each
    tier started: values only decrease).  Otherwise the top tier ends (mid
    catches up) or, when the bulk's bound is the one that binds, the block
    ends (the bulk catches up; at the latest after ``BLOCK_MAX`` picks).
    Tier sizes adapt to a cost model (:meth:`_resize`): speed only, never picks.  Picked rows are
    dropped from the bulk now and then.  ``Lambda`` is kept as
    ``Lambda_base - U_recent^T U_recent``, folded every ``LAM_FLUSH`` picks.
    """

    M_START, M_MIN = 4096, 32
    TOP_START, TOP_MIN = 256, 8
    BLOCK_MAX = 384
    BLOCK_WORK, TOP_WORK = 4.8, 0.8  # targets of life * size, per row below (see _resize)
    LAM_FLUSH = 32
    CHUNK = 8192  # rows per float32 GEMM (bounds the temporary)

    def __init__(self, X: np.ndarray, already: np.ndarray, budget: int):
        n, d = X.shape
        self.n, self.d = n, d
        self.X = X  # exact rows for the float64 work (float32 converts exactly)
        if already.size:
            Xs = X[already].astype(np.float64)
            lam = np.linalg.inv(np.eye(d) + Xs.T @ Xs)
            self.lam = np.asfortranarray(0.5 * (lam + lam.T))
            qt = np.empty(n)
            with _blas_threads(None):
                for start in range(0, n, _CHUNK):
                    Xc = X[start : start + _CHUNK].astype(np.float64)
                    qt[start : start + _CHUNK] = np.einsum("ij,ij->i", Xc @ self.lam, Xc)
        else:
            self.lam = np.asfortranarray(np.eye(d))
            qt = None
        # float64 values count as exact (E = 0): the _SAFETY slack covers their rounding
        self.bulk = self._init_float32(X, qt)
        self.bulk.qt[already] = -np.inf
        self.bidx = np.arange(n, dtype=np.int64)  # bulk position -> row of X
        self.alive = n - already.size
        self.dead_in_bulk = int(already.size)
        self.U = np.empty((budget, d))  # float64 u_k
        self.Uh = np.empty((budget, d), dtype=np.float32)  # float32 u_k / |u_k|
        self.w = np.empty(budget)  # |u_k|^2
        self.k = 0
        self.kb = 0  # self.lam is Lambda after the first kb picks of this call
        self.m = min(self.M_START, n)
        self.m_top = self.TOP_START
        self.mid = None
        self.top = None
        self.stats = {
            "blocks": 0,
            "top_blocks": 0,
            "bulk_macs": 0,
            "mid_macs": 0,
            "top_row_updates": 0,
            "exact_rows": 0,
            "direct_picks": 0,
            "compactions": 0,
            "max_mid": 0,
            "max_top": 0,
        }

    def _init_float32(self, X: np.ndarray, qt) -> _Tier:
        """Bulk tier: rows ``z_i = x_i / r_i`` in float32 and their error factors ``e_i``.

        ``r_i = 1`` when all row norms are moderate (no float32 overflow or
        underflow to fear), else ``r_i = ||x_i||``.  For every unit vector v,
        ``|z_i . v - fl32(z32_i . fl32(v))| <= e_i``.
        """
        n, d = X.shape
        nx = np.empty(n)
        for start in range(0, n, _CHUNK):
            Xc = X[start : start + _CHUNK].astype(np.float64)
            nx[start : start + _CHUNK] = np.sqrt(np.einsum("ij,ij->i", Xc, Xc))
        if qt is None:
            qt = nx**2
        moderate = bool(nx.min() >= 2.0**-40 and nx.max() <= 2.0**40)
        if X.dtype == np.float32 and moderate:
            Z32, rho = X, None  # the rows as given: no rounding
            dz, nz, nz32 = 0.0, nx, nx
        else:
            Z32 = np.empty((n, d), dtype=np.float32)
            rho = None if moderate else nx**2
            dz, nz32 = np.empty(n), np.empty(n)
            nz = nx if moderate else 1.0
            for start in range(0, n, _CHUNK):
                sl = slice(start, min(n, start + _CHUNK))
                Zc = X[sl].astype(np.float64)
                if not moderate:
                    Zc /= nx[sl, None]
                Z32[sl] = Zc.astype(np.float32)
                Z64 = Z32[sl].astype(np.float64)
                nz32[sl] = np.sqrt(np.einsum("ij,ij->i", Z64, Z64))
                Zc -= Z64
                dz[sl] = np.sqrt(np.einsum("ij,ij->i", Zc, Zc))
        # dot error gamma_d |z32| |fl32(v)| with |fl32(v)| <= 1 + u; rounding of v: u |z|;
        # rounding of z: |z - z32| |fl32(v)|; underflow (even flushed to zero): 2d 2^-126;
        # 1% for the float64 arithmetic
        gam = _gamma32(d) * (1.0 + 2 * _U32)
        e = 1.01 * (gam * nz32 + (_U32 + 2.0**-50) * nz + (1.0 + 2 * _U32) * dz + d * 2.0**-125)
        return _Tier(Z32, qt, np.zeros(n), e, qt.copy(), rho, 0)

    # -- Lambda ---------------------------------------------------------------
    def _flush_lam(self) -> None:
        if self.kb < self.k:
            W = self.U[self.kb : self.k]
            G = W.T @ W
            self.lam -= 0.5 * (G + G.T)
            self.kb = self.k

    def _lam_x(self, x: np.ndarray) -> np.ndarray:
        v = self.lam @ x
        if self.kb < self.k:
            W = self.U[self.kb : self.k]
            v -= W.T @ (W @ x)
        return v

    def _exact(self, Xr: np.ndarray) -> np.ndarray:
        """``x^T Lambda_k x`` in float64 for the rows of Xr (float64)."""
        q = np.einsum("ij,ij->i", Xr @ self.lam, Xr)
        if self.kb < self.k:
            G = Xr @ self.U[self.kb : self.k].T
            q -= np.einsum("ij,ij->i", G, G)
        self.stats["exact_rows"] += int(Xr.shape[0])
        return q

    def _rows64(self, bulk_pos: np.ndarray) -> np.ndarray:
        return self.X[self.bidx[bulk_pos]].astype(np.float64)

    @staticmethod
    def _band_threshold(lb_max: float) -> float:
        """Smallest q whose score could tie with (or beat) the score of q = lb_max."""
        s = math.log1p(max(lb_max, 0.0))
        return math.expm1(s - _tie_tol(s) - 2 * _SAFETY)

    @staticmethod
    def _score(q: float) -> float:
        return math.log1p(max(q, 0.0)) if q > -np.inf else -np.inf

    # -- tiers ----------------------------------------------------------------
    @staticmethod
    def _resize(m: int, life: int, failed: bool, target: float, floor: int) -> int:
        """Next size of a tier that lived ``life`` picks with ``m`` rows: aim at ``life * m ~ target``.

        Cost model: a tier of m rows costs ~m per pick; the tier below it
        catches up once per life of this one, with GEMMs whose efficiency grows
        with the life (width), so longer lives save there.  With life ~ m^0.6
        the sum is smallest near ``life * m = target``.  Speed only.
        """
        if failed and life * m < target / 2:
            return 2 * m
        if not failed or life * m > 2 * target:
            return max(floor, m * 3 // 4)
        return m

    def _advance(self, tier: _Tier, key: str) -> None:
        big = tier.qt.shape[0] * self.d * (self.k - tier.s) >= _BIG_GEMM
        with _blas_threads(None) if big else contextlib.nullcontext():
            self.stats[key] += tier.advance(self.Uh, self.w, self.k, self.CHUNK)

    def _huge_band(self) -> int | None:
        """Bulk position to pick directly when the tie band is larger than a block's pool.

        Happens when very many rows have (nearly) the same score, e.g. the first
        pick on exactly unit-normalised rows.  The band's rows are made exact
        (float64) first.  Returns None when the band is small (and makes the
        next block's pool large enough to hold it).
        """
        b = self.bulk
        thr = self._band_threshold(float((b.qt - b.E).max()))
        band = np.flatnonzero(b.qt + b.E >= thr)
        if band.size <= max(self.M_START, self.m // 2):
            self.m = max(self.m, 2 * band.size)
            return None
        loose = band[b.E[band] > 0]
        for start in range(0, loose.size, _CHUNK):
            rows = loose[start : start + _CHUNK]
            b.qt[rows] = self._exact(self._rows64(rows))
            b.E[rows] = 0.0
        scores = np.full(b.qt.shape[0], -np.inf)
        scores[band] = np.log1p(np.maximum(b.qt[band], 0.0))
        j, _ = _pick(scores)  # rows outside the band are below the tie band of the exact best
        self.stats["direct_picks"] += 1
        return j

    def _start_mid(self) -> None:
        b = self.bulk
        pos, tau = _top_by_bound(b.qt, b.E, self.m, self.alive)
        self.mid = b.take(pos)
        self.mid_pos = pos
        self.mid_tau = self._score(tau)
        self.mid_start = self.k
        self.stats["blocks"] += 1
        self.stats["max_mid"] = max(self.stats["max_mid"], int(pos.size))

    def _end_mid(self, failed: bool) -> None:
        if self.top is not None:
            self._end_top(failed=None)
        self._advance(self.bulk, "bulk_macs")
        mid = self.mid
        self.bulk.qt[self.mid_pos] = mid.qt
        self.bulk.E[self.mid_pos] = mid.E
        self.m = self._resize(self.m, self.k - self.mid_start, failed, self.BLOCK_WORK * self.alive, self.M_MIN)
        self.mid = None
        if self.dead_in_bulk * 32 > self.bulk.qt.shape[0]:  # picked rows cost GEMM work until dropped
            keep = np.flatnonzero(self.bulk.qt > -np.inf)
            self.bulk = self.bulk.take(keep)
            self.bidx = self.bidx[keep]
            self.dead_in_bulk = 0
            self.stats["compactions"] += 1

    def _start_top(self) -> None:
        mid = self.mid  # current at step k
        pos, tau = _top_by_bound(mid.qt, mid.E, self.m_top, int(np.count_nonzero(mid.qt > -np.inf)))
        self.top = {
            "pos": pos,
            "X": self._rows64(self.mid_pos[pos]),
            "q": mid.qt[pos],
            "E": mid.E[pos],
            "tau": max(self.mid_tau, self._score(tau)),
            "start": self.k,
        }
        self.stats["top_blocks"] += 1
        self.stats["max_top"] = max(self.stats["max_top"], int(pos.size))

    def _end_top(self, failed: bool | None) -> None:
        """Write the top tier back into mid (brought to the current step); failed=None: the block ends."""
        top = self.top
        self._advance(self.mid, "mid_macs")
        self.mid.qt[top["pos"]] = top["q"]
        self.mid.E[top["pos"]] = top["E"]
        if failed is not None:
            self.m_top = self._resize(
                self.m_top, self.k - top["start"], failed, self.TOP_WORK * self.mid.qt.shape[0], self.TOP_MIN
            )
        self.top = None

    def _certify(self) -> tuple[int, float]:
        """Best exact top row under the tie rule (top position, score); the caller checks the bound."""
        top = self.top
        q, E = top["q"], top["E"]
        while True:
            need = np.flatnonzero((E > 0) & (q + E >= self._band_threshold(float((q - E).max()))))
            if need.size == 0:
                break
            q[need] = self._exact(top["X"][need])
            E[need] = 0.0
        # the row with the best lower bound is exact now, and every inexact row
        # is below the tie band of the best exact score
        scores = np.where(E == 0, np.log1p(np.maximum(q, 0.0)), -np.inf)
        scores[q == -np.inf] = -np.inf  # picked rows
        return _pick(scores)

    # -- one pick ------------------------------------------------------------
    def _commit(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        v = self._lam_x(x)
        qw = float(x @ v)
        u = v / math.sqrt(1.0 + qw)
        k = self.k
        self.U[k] = u
        nu = float(np.sqrt(u @ u))
        self.w[k] = nu * nu
        self.Uh[k] = u / nu
        self.k += 1
        if self.k - self.kb >= self.LAM_FLUSH:
            self._flush_lam()
        self.alive -= 1
        self.dead_in_bulk += 1
        return u, math.log1p(qw)

    def step(self) -> tuple[int, float]:
        while True:
            if self.mid is None:
                j = self._huge_band()
                if j is not None:
                    _, score = self._commit(self._rows64(np.array([j]))[0])
                    self.bulk.qt[j] = -np.inf
                    self._advance(self.bulk, "bulk_macs")
                    return int(self.bidx[j]), score
                self._start_mid()
            if self.top is None:
                self._start_top()
            j, best = self._certify()
            margin = best - _tie_tol(best) - _SAFETY
            if margin > self.top["tau"]:
                break
            if margin > self.mid_tau:
                self._end_top(failed=True)
            else:
                self._end_mid(failed=True)
        top = self.top
        u, score = self._commit(top["X"][j])
        if top["pos"].size > 1:
            g = top["X"] @ u
            top["q"] -= g * g
            self.stats["top_row_updates"] += int(top["pos"].size)
        top["q"][j] = -np.inf
        top["E"][j] = 0.0
        w = int(self.bidx[self.mid_pos[top["pos"][j]]])
        if self.k - self.mid_start >= self.BLOCK_MAX:
            self._end_mid(failed=False)
        return w, score


class _JSEngine:
    """Exact greedy ``argmax H(p_i) + lam * JS(p_i || m)`` with metric bounds.

    ``sqrt(JS)`` is a metric, so with ``c_i = JS(p_i || m_s)`` computed at a
    rebuild, ``sqrt(JS(p_i || m_t)) <= sqrt(c_i) + sqrt(JS(m_s || m_t))``.
    The pool (rows with the highest bounds) is evaluated exactly at every
    pick; the rest is bounded per bin of ``a_i = sqrt(c_i) + dist`` by
    ``max_bin(c_max + 2 lam a_max D) + lam D^2`` with ``D`` the distance the
    mean distribution moved since the rebuild (one K-vector per pick).
    """

    _NBINS = 24
    POOL_START, POOL_FLOOR = 256, 64

    def __init__(self, P: np.ndarray, already: np.ndarray, lam: float):
        n, K = P.shape
        self.P, self.n, self.K, self.lam = P, n, K, lam
        self.H = -_xlogx_rowsum(P)
        self.t = int(already.size)
        self.S = P[already].sum(axis=0) if already.size else np.zeros(K)
        self.removed = np.zeros(n, dtype=bool)
        self.removed[already] = True
        self.remaining = n - already.size
        # cache: c[i] = JS(p_i || refs[ref[i]]) exact; ref -1 = nothing known
        self.c = np.zeros(n)
        self.ref = np.full(n, -1, dtype=np.int64)
        self.refs: list[np.ndarray] = []
        self.sizer = _Sizer(n, self.POOL_START, self.POOL_FLOOR)
        self.pool = None
        self.stats = {"rebuilds": 0, "refreshed_rows": 0, "pool_row_updates": 0}

    @property
    def m(self) -> np.ndarray:
        return self.S / self.t

    @staticmethod
    def _js_rows(rows_P: np.ndarray, Hrows: np.ndarray, m: np.ndarray, Hm: float, m_pos: bool) -> np.ndarray:
        # JS(p||m) = H((p+m)/2) - H(p)/2 - H(m)/2  (one log per element)
        mix = rows_P + m
        mix *= 0.5
        if m_pos:  # every entry of the mixture is > 0
            xlx = np.einsum("ij,ij->i", mix, np.log(mix))
        else:
            xlx = _xlogx_rowsum(mix)
        js = -xlx
        js -= 0.5 * Hrows
        js -= 0.5 * Hm
        np.maximum(js, 0.0, out=js)
        return js

    def _rebuild(self, voluntary: bool = False) -> None:
        self.stats["rebuilds"] += 1
        m = self.m
        Hm = entropy(m)
        m_pos = bool((m > 0).all())
        refs_id = len(self.refs)
        self.refs.append(m.copy())
        if self.pool is not None:
            P_, js, alive = self.pool["idx"], self.pool["js"], self.pool["alive"]
            self.c[P_[alive]] = js[alive]
            self.ref[P_[alive]] = refs_id
            if not voluntary:
                self.sizer.expired(self.t)
        # distance (sqrt JS, relative accuracy) from every reference distribution to m
        dref = np.sqrt(js_divergence(np.array(self.refs), m)) * (1.0 + _REL_JS)
        sqrt_l2 = math.sqrt(_LOG2)
        a = np.full(self.n, sqrt_l2)
        has = self.ref >= 0
        a[has] = np.minimum(np.sqrt(self.c[has] + _EPS_JS) + dref[self.ref[has]], sqrt_l2)
        ub = self.H + self.lam * (a * a)
        ub[self.removed] = -np.inf
        msize = self.sizer.m
        while True:
            if msize >= self.remaining:
                R = np.flatnonzero(~self.removed)
                tau = -np.inf
            else:
                part = np.argpartition(-ub, msize)
                R = part[:msize]
                tau = float(ub[part[msize]])
            fresh = R[self.ref[R] != refs_id]
            if fresh.size:
                self.stats["refreshed_rows"] += int(fresh.size)
                for start in range(0, fresh.size, _CHUNK):
                    rr = fresh[start : start + _CHUNK]
                    self.c[rr] = self._js_rows(self.P[rr], self.H[rr], m, Hm, m_pos)
                self.ref[fresh] = refs_id
                a[fresh] = np.minimum(np.sqrt(self.c[fresh] + _EPS_JS), sqrt_l2)
                ub[fresh] = self.H[fresh] + self.lam * (a[fresh] * a[fresh])
            best = float((self.H[R] + self.lam * self.c[R]).max())
            if tau == -np.inf or best - _tie_tol(best) - _SAFETY > tau:
                break
            msize *= 2
        self.sizer.rebuilt(self.t, R.size, voluntary)
        Pidx = np.sort(R)
        # bound outside the pool, per bin of a: max_i (ub_i + 2 lam a_i D) + lam D^2
        out = np.ones(self.n, dtype=bool)
        out[self.removed] = False
        out[Pidx] = False
        if out.any():
            ao, uo = a[out], ub[out]
            lo, hi = float(ao.min()), float(ao.max())
            nb = self._NBINS
            if hi > lo:
                b = ((ao - lo) * (nb / (hi - lo))).astype(np.intp)
                np.minimum(b, nb - 1, out=b)
            else:
                b = np.zeros(ao.size, dtype=np.intp)
            cmax = np.full(nb, -np.inf)
            amax = np.zeros(nb)
            np.maximum.at(cmax, b, uo)
            np.maximum.at(amax, b, ao)
            keep = cmax > -np.inf
            bins = (cmax[keep], amax[keep], float(self.H[out].max()))
        else:
            bins = None
        self.pool = {
            "idx": Pidx,
            "P": self.P[Pidx],
            "H": self.H[Pidx],
            "js": self.c[Pidx].copy(),
            "alive": np.ones(Pidx.size, dtype=bool),
            "bins": bins,
            "mref": m,
        }

    def _outside_bound(self, m: np.ndarray) -> float:
        bins = self.pool["bins"]
        if bins is None:
            return -np.inf
        cmax, amax, hmax = bins
        D = math.sqrt(_js_vec(self.pool["mref"], m)) * (1.0 + _REL_JS)
        lam = self.lam
        b1 = float((cmax + (2.0 * lam * D) * amax).max()) + lam * D * D
        return min(b1, hmax + lam * _LOG2)

    def step(self) -> tuple[int, float]:
        if self.t == 0:
            scores = np.where(self.removed, -np.inf, self.H)
            w, best = _pick(scores)
            score = float(self.H[w])
        else:
            if self.pool is None:
                self._rebuild()
            m = self.m
            Hm = entropy(m)
            m_pos = bool((m > 0).all())
            rebuilt = False
            while True:
                pool = self.pool
                js = self._js_rows(pool["P"], pool["H"], m, Hm, m_pos)
                pool["js"] = js
                if not rebuilt and self.sizer.should_shrink(self.t, pool["idx"].size):
                    self._rebuild(voluntary=True)  # needs the pool exact at the current m (just computed)
                    rebuilt = True
                    continue
                scores = pool["H"] + self.lam * js
                scores[~pool["alive"]] = -np.inf
                j, best = _pick(scores)
                if best - _tie_tol(best) - _SAFETY > self._outside_bound(m):
                    break
                self._rebuild()
                rebuilt = True
            self.stats["pool_row_updates"] += int(pool["idx"].size)
            w = int(pool["idx"][j])
            score = float(scores[j])
            pool["alive"][j] = False
        self.removed[w] = True
        self.remaining -= 1
        self.S = self.S + self.P[w]
        self.t += 1
        return w, score


# --------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------


def select(
    strategy: str,
    X,
    budget: int,
    *,
    centers=None,
    lam: float = 1.0,
    seed: int = 0,
    already_selected: Sequence[int] | np.ndarray = (),
    meta_emb=None,
    user_emb=None,
    weights=None,
    progress: Callable[[int, int], None] | None = None,
) -> SelectionResult:
    """Pick ``budget`` rows of ``X`` with ``strategy`` (greedy, exact).

    ``X``: N x d review embeddings (rows = units chosen by the caller).
    ``centers``: K x D K-means centres, required by the JS strategies; D is the
    dimension of the features the strategy uses (``X``'s for ``JS``,
    ``build_features(X, meta_emb[, user_emb], weights)``'s for the variants).
    ``lam``: JS trade-off (>= 0).  ``seed``: RANDOM_UNIFORM permutation seed.
    ``already_selected``: rows picked in earlier rounds, in pick order; they are
    never picked again and the greedy state continues from them.
    ``meta_emb`` / ``user_emb`` / ``weights``: blocks for METADATA_* (meta) and
    USER_* (meta and user) strategies, see :func:`build_features`.
    ``progress(done, total)``: called about 100 times at most.

    Everything is validated before any work; errors are :class:`SelectionError`.
    """
    strat = _strategy(strategy)
    name = strat.name
    Xr = _as_matrix(X, "X")
    n = Xr.shape[0]
    budget = _as_int(budget, "budget")
    seed = _as_int(seed, "seed")
    try:
        lam = float(lam)
    except (TypeError, ValueError):
        raise SelectionError(f"lam must be a number, got {lam!r}") from None
    if not math.isfinite(lam) or lam < 0:
        raise SelectionError(f"lam must be finite and >= 0, got {lam}")
    if progress is not None and not callable(progress):
        raise SelectionError("progress must be a callable(done, total) or None")

    already = np.asarray(list(already_selected) if not isinstance(already_selected, np.ndarray) else already_selected)
    if already.size == 0:
        already = np.zeros(0, dtype=np.int64)
    if already.ndim != 1 or not np.issubdtype(already.dtype, np.integer):
        raise SelectionError("already_selected must be a 1-D sequence of row indices (integers)")
    already = already.astype(np.int64)
    if already.size and (already.min() < 0 or already.max() >= n):
        bad = already[(already < 0) | (already >= n)]
        raise SelectionError(f"already_selected has indices outside 0..{n - 1}: {_rows_text(bad)}")
    uniq, counts = np.unique(already, return_counts=True)
    if (counts > 1).any():
        raise SelectionError(f"already_selected repeats rows {_rows_text(uniq[counts > 1])}")

    remaining = n - already.size
    if budget <= 0:
        raise SelectionError(f"budget must be >= 1, got {budget}")
    if budget > remaining:
        raise SelectionError(
            f"budget {budget} is larger than the {remaining} rows left "
            f"({n} rows, {already.size} already selected)"
        )

    needs_meta = strat.uses_metadata
    needs_user = strat.uses_users
    w = _as_weights(weights)
    if needs_meta and meta_emb is None:
        raise SelectionError(f"{name} needs meta_emb (item-metadata embeddings, one row per row of X)")
    if needs_user and user_emb is None:
        raise SelectionError(f"{name} needs user_emb (collaborative factors, one row per row of X)")
    if not needs_meta and meta_emb is not None:
        raise SelectionError(f"meta_emb is only used by METADATA_* and USER_* strategies, not {name}")
    if not needs_user and user_emb is not None:
        raise SelectionError(f"user_emb is only used by USER_* strategies, not {name}")
    if needs_meta:
        F = build_features(Xr, meta_emb, user_emb if needs_user else None, w)
    else:
        F = Xr

    params: dict = {"n_rows": n, "already_selected": int(already.size), "budget": budget, "tie_atol": TIE_ATOL}
    if strat.engine == "random":
        params["seed"] = seed
    if needs_meta:
        params["weights"] = {"review": w[0], "meta": w[1], "user": w[2] if needs_user else 0.0}
    params["feature_dim"] = int(F.shape[1])

    uses_js = strat.needs_centres
    if uses_js:
        if centers is None:
            raise SelectionError(f"{name} needs centers (K-means centres of its features; see kmeans_centers)")
        C = _as_matrix(centers, "centers", check_zero=False).astype(np.float64)
        if C.shape[1] != F.shape[1]:
            hint = " (compute them on build_features(...) of the same blocks and weights)" if needs_meta else ""
            raise SelectionError(f"centers have {C.shape[1]} columns but the {name} features have {F.shape[1]}{hint}")
        if C.shape[0] < 2:
            raise SelectionError(f"JS needs at least 2 centres, got {C.shape[0]}")
        if C.shape[0] > n:
            raise SelectionError(f"more centres ({C.shape[0]}) than rows ({n})")
        params["k"] = int(C.shape[0])
        params["lam"] = lam
    elif centers is not None:
        raise SelectionError(f"centers are only used by the JS strategies, not {name}")

    # ---- work starts here (all input validated) ----
    tick = _Progress(progress, budget)
    idx = np.empty(budget, dtype=np.int64)
    scores = np.zeros(budget, dtype=np.float64)
    stats: dict = {}
    if strat.engine == "random":
        perm = np.random.default_rng(seed).permutation(n)
        if already.size:
            perm = perm[~np.isin(perm, already)]
        idx[:] = perm[:budget]
        tick(budget)
    else:
        if uses_js:
            engine = _JSEngine(_cluster_probabilities(F, C), already, lam)
        else:
            engine = _FisherEngine(F, already, budget)
        with _blas_threads(1):
            for t in range(budget):
                idx[t], scores[t] = engine.step()
                tick(t + 1)
        stats = dict(engine.stats)
    return SelectionResult(indices=idx, scores=scores, strategy=name, params=params, stats=stats)


# --------------------------------------------------------------------------
# summary for charts
# --------------------------------------------------------------------------


def _distinct(values: Iterable) -> set:
    out: set = set()
    for v in values:
        if isinstance(v, (list, tuple, set, frozenset, np.ndarray)):
            out.update(np.asarray(v).ravel().tolist() if isinstance(v, np.ndarray) else v)
        elif v is not None:
            out.add(v.item() if isinstance(v, np.generic) else v)
    return out


def selection_summary(
    X,
    indices,
    cluster_labels,
    item_ids=None,
    user_ids_per_row=None,
    *,
    max_pairs_sample: int = 2000,
    seed: int = 0,
) -> dict:
    """Diversity / coverage numbers of a selection (for charts).

    * ``cluster_coverage``: share of the clusters present in ``cluster_labels``
      (one label per row of X) that the picks hit; ``cluster_entropy``: entropy
      (natural log) of the cluster histogram of the picks, and
      ``cluster_entropy_norm`` = that / log(number of clusters);
    * ``mean_pairwise_distance``: mean Euclidean distance between picks (on a
      seeded sample of at most ``max_pairs_sample`` picks), and
      ``mean_pairwise_distance_all`` the same for a sample of all rows (baseline);
    * ``item_coverage`` / ``user_coverage``: share of the distinct items /
      users of the whole data that the picks cover (None when not given).
      ``user_ids_per_row`` entries may be single ids or collections of ids.
    """
    Xm = _as_matrix(X, "X", check_zero=False)
    n = Xm.shape[0]
    idx = np.asarray(indices)
    if idx.size == 0:
        idx = np.zeros(0, dtype=np.int64)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise SelectionError("indices must be a 1-D sequence of row indices (integers)")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise SelectionError(f"indices outside 0..{n - 1}: {_rows_text(idx[(idx < 0) | (idx >= n)])}")
    labels = np.asarray(cluster_labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise SelectionError(f"cluster_labels must have one label per row of X ({n}), got shape {labels.shape}")
    for name, arr in (("item_ids", item_ids), ("user_ids_per_row", user_ids_per_row)):
        if arr is not None and len(arr) != n:
            raise SelectionError(f"{name} must have one entry per row of X ({n}), got {len(arr)}")

    all_clusters = np.unique(labels)
    picked_labels = labels[idx]
    hit, counts = np.unique(picked_labels, return_counts=True)
    if idx.size:
        f = counts / counts.sum()
        h = float(-(f * np.log(f)).sum())
    else:
        h = 0.0
    nclu = all_clusters.size
    rng = np.random.default_rng(seed)

    def mean_pdist(rows: np.ndarray) -> float | None:
        if rows.size < 2:
            return None
        if rows.size > max_pairs_sample:
            rows = rng.choice(rows, size=max_pairs_sample, replace=False)
        Z = Xm[np.sort(rows)].astype(np.float64)
        sq = np.einsum("ij,ij->i", Z, Z)
        D2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (Z @ Z.T), 0.0)
        iu = np.triu_indices(Z.shape[0], 1)
        return float(np.sqrt(D2[iu]).mean())

    out = {
        "n_selected": int(idx.size),
        "n_rows": n,
        "n_clusters": int(nclu),
        "clusters_hit": int(hit.size),
        "cluster_coverage": float(hit.size / nclu) if nclu else 0.0,
        "cluster_entropy": h,
        "cluster_entropy_norm": float(h / math.log(nclu)) if nclu > 1 else 0.0,
        "cluster_histogram": {(k.item() if isinstance(k, np.generic) else k): int(c) for k, c in zip(hit, counts)},
        "mean_pairwise_distance": mean_pdist(idx),
        "mean_pairwise_distance_all": mean_pdist(np.arange(n)),
        "item_coverage": None,
        "user_coverage": None,
    }
    if item_ids is not None:
        items = np.asarray(item_ids, dtype=object)
        all_items = _distinct(items)
        out["item_coverage"] = len(_distinct(items[idx])) / len(all_items) if all_items else 0.0
    if user_ids_per_row is not None:
        users = list(user_ids_per_row)
        all_users = _distinct(users)
        out["user_coverage"] = len(_distinct(users[i] for i in idx.tolist())) / len(all_users) if all_users else 0.0
    return out
