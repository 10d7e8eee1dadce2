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

import math
from typing import Callable, Iterable, Sequence

import numpy as np

from . import strategies
from .select_engines import (_FisherEngine, _JSEngine, _Progress)
from .select_features import (DEFAULT_WEIGHTS, KMEANS_N_INIT, SelectionError, SelectionResult, TIE_ATOL,
    assign_clusters, build_features, cluster_probabilities, entropy, js_divergence, kmeans_centers, _as_int,
    _as_matrix, _as_weights, _blas_threads, _cluster_probabilities, _rows_text, _strategy)

__all__ = [
    "DEFAULT_WEIGHTS", "TIE_ATOL", "KMEANS_N_INIT", "SelectionError", "SelectionResult", "select",
    "build_features", "kmeans_centers", "assign_clusters", "cluster_probabilities", "entropy",
    "js_divergence", "selection_summary",
]

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
        raise SelectionError(f"meta_emb is only used by {', '.join(strategies.with_block('metadata'))}, not {name}")
    if not needs_user and user_emb is not None:
        raise SelectionError(f"user_emb is only used by {', '.join(strategies.with_block('user'))}, not {name}")
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
