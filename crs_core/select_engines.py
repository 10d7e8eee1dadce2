"""The exact greedy engines: JS (entropy + λ · JS divergence to the picks, with certified upper
bounds so most rows are never rescored) and Fisher (log(1 + xᵀ Λ⁻¹ x), Sherman-Morrison updates,
float32 tiers checked in float64). Used through `crs_core.select`.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from .select_features import (TIE_ATOL, entropy, js_divergence, _BIG_GEMM, _CHUNK, _EPS_JS, _LOG2, _REL_JS,
    _SAFETY, _blas_threads, _js_vec, _xlogx_rowsum)


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
