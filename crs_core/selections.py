"""Selections in the workspace: run a strategy of `select` over stored embeddings, store the picks.

Units. A selection picks `review`s (rows of the review embedding set) or `item`s (the mean of an
item's review embeddings, for items with reviews). Synthesis (Algorithm 2) always consumes
items with their reviews: from a review selection it takes the distinct items of the picked
reviews in pick order, so both units feed it the same way.

Every row is scaled to unit length (in float64) before selection: the sentence encoder's
vectors are meant to be unit vectors, and an item's vector is the direction of the mean of its
reviews' vectors.

Feature blocks of the variants (the paper leaves them open; see `select.build_features` for the
weighting, and `strategies` for which strategy reads which): the metadata block is an embedding
of the item's text (title, year, genres, plot, cast) with the same sentence encoder; the user
block is the item's collaborative factors, the right singular vectors of the mean-centred
user x item rating matrix (MovieLens interactions, `USER_FACTORS` dimensions, scaled by the
singular values). An item without interactions gets the mean factor vector, a neutral signal,
rather than a zero row (which has no direction).

Rounds (Algorithm 1): `run_selection(..., parent_id=...)` continues an earlier selection: the
parent's picks count as already selected, the greedy state continues from them, and the new
selection stores all picks (the parent's with their round numbers, then the new round).
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pandas as pd

from . import strategies
from .accounts import acting_name
from .errors import CRSError
from .progress import ProgressFn
from .select import SelectionError, assign_clusters, build_features, kmeans_centers, select, \
    selection_summary
from .store import Workspace

USER_FACTORS = 32
UNITS = ("review", "item")


def _embedding_rows(ws: Workspace, set_id: str) -> tuple[list[str], np.ndarray]:
    from .embed import load_embedding_set

    if not ws.scalar("SELECT count(*) FROM embedding_sets WHERE set_id = ?", [set_id]):
        raise SelectionError(f"embedding set {set_id!r} does not exist yet; run `python -m crs_core embed` "
                             "(or `init`) first")
    return load_embedding_set(ws, set_id)


def unit_matrix(ws: Workspace, set_id: str, unit: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(unit ids, embedding matrix, item id of each row) for a review embedding set."""
    if unit not in UNITS:
        raise SelectionError(f"unit must be one of {UNITS}, got {unit!r}")
    review_ids, X = _embedding_rows(ws, set_id)
    items = ws.df("SELECT r.item_id FROM embedding_rows e LEFT JOIN reviews r ON r.review_id = e.unit_id "
                  "WHERE e.set_id = ? ORDER BY e.pos", [set_id])["item_id"].astype(object)
    items = items.where(items.notna(), None).tolist()
    if unit == "review":
        return review_ids, _unit_rows(X), items
    frame = pd.DataFrame({"item": items, "row": np.arange(len(items))}).dropna()
    groups = frame.groupby("item", sort=True)["row"].apply(list)
    means = np.stack([X[rows].mean(axis=0) for rows in groups]) if len(groups) else np.zeros((0, X.shape[1]))
    return list(groups.index), _unit_rows(means), list(groups.index)


def _unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in float64 (encoders normalise only to float32 precision,
    which would otherwise decide Fisher's first pick among rows that all score log 2)."""
    X = X.astype(np.float64)  # a copy, so it is scaled in place: one float64 matrix, not two, at 1 M rows
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, norms, out=X, where=norms > 0)  # zero rows stay zero


def item_text_matrix(ws: Workspace, item_ids: list[str], model: str = "minilm") -> np.ndarray:
    from .catalog import item_text
    from .embed import embed_texts, get_encoder

    items = ws.df("SELECT * FROM items").set_index("item_id", drop=False)
    texts = [item_text(items.loc[i].to_dict()) for i in item_ids]
    return embed_texts(ws, get_encoder(model), texts)


def item_factors(ws: Workspace, item_ids: list[str], dims: int = USER_FACTORS) -> np.ndarray:
    """Collaborative item factors from the interactions (mean factor for items without any)."""
    from scipy.sparse import csr_matrix
    from sklearn.decomposition import TruncatedSVD

    inter = ws.df("SELECT user_id, item_id, rating FROM interactions WHERE rating IS NOT NULL")
    if inter.empty:
        raise SelectionError(f"{', '.join(strategies.with_block('user'))} need user-item interactions; "
                             "the workspace has none")
    users = {u: i for i, u in enumerate(inter["user_id"].unique())}
    cols = {it: j for j, it in enumerate(inter["item_id"].unique())}
    centred = inter["rating"] - inter.groupby("user_id")["rating"].transform("mean")
    matrix = csr_matrix((centred.to_numpy(dtype=np.float64),
                         (inter["user_id"].map(users), inter["item_id"].map(cols))),
                        shape=(len(users), len(cols)))
    dims = max(1, min(dims, min(matrix.shape) - 1))
    svd = TruncatedSVD(n_components=dims, random_state=0).fit(matrix)
    factors = (svd.components_.T * svd.singular_values_).astype(np.float64)
    mean = factors.mean(axis=0)
    out = np.stack([factors[cols[i]] if i in cols else mean for i in item_ids])
    zero = np.linalg.norm(out, axis=1) == 0
    out[zero] = mean
    return out


def variant_blocks(ws: Workspace, strategy: str, row_items: list[str]
                   ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The metadata and collaborative blocks a strategy adds to the review embedding."""
    strat = strategies.get(strategy)
    if not strat.uses_metadata:
        return None, None
    distinct = sorted(set(row_items))
    position = {item: k for k, item in enumerate(distinct)}
    rows = [position[i] for i in row_items]
    meta = item_text_matrix(ws, distinct)[rows]
    user = item_factors(ws, distinct)[rows] if strat.uses_users else None
    return meta, user


def run_selection(ws: Workspace, strategy: str, budget: int, *, unit: str = "review",
                  set_id: str = "review:minilm", k: int = 20, lam: float = 1.0, seed: int = 0,
                  weights: tuple[float, float, float] | None = None, name: str | None = None,
                  parent_id: str | None = None, progress: ProgressFn | None = None) -> str:
    """Select `budget` units with `strategy` and store them; returns the selection id."""
    strategy = str(strategy).upper()
    if strategy not in strategies.names():
        raise SelectionError(f"unknown strategy {strategy!r}; choose one of {', '.join(strategies.names())}")
    parent = None
    if parent_id is not None:
        parent = load_selection(ws, parent_id)
        meta = selection_info(ws, parent_id)
        unit, set_id, strategy = meta["unit"], meta["set_id"], meta["strategy"]
        params = meta["params"]
        k, lam, seed = params["k"], params["lam"], params["seed"]
        weights = tuple(params["weights"]) if params.get("weights") else None
    unit_ids, X, row_items = unit_matrix(ws, set_id, unit)
    if len(unit_ids) == 0:
        raise SelectionError(f"no {unit}s to select from in {set_id!r}")
    index = {u: i for i, u in enumerate(unit_ids)}
    already = [index[u] for u in parent["unit_id"]] if parent is not None else []
    remaining = len(unit_ids) - len(already)
    if not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise SelectionError(f"budget must be a positive whole number, got {budget!r}")
    if budget > remaining:
        raise SelectionError(f"budget {budget} is larger than the {remaining:,} {unit}s left to select")
    needs_centres = strategies.get(strategy).needs_centres
    if needs_centres and k > len(unit_ids):
        raise SelectionError(f"k ({k}) is larger than the number of {unit}s ({len(unit_ids)})")
    meta, user = variant_blocks(ws, strategy, row_items)
    weights = tuple(weights) if weights else (1.0, 1.0, 1.0)
    features = build_features(X, meta, user, weights) if meta is not None else X
    centers = kmeans_centers(features, k, seed, max_samples=20_000) if needs_centres else None
    result = select(strategy, X, budget, centers=centers, lam=lam, seed=seed, already_selected=already,
                    meta_emb=meta, user_emb=user, weights=weights if meta is not None else None,
                    progress=progress)
    picks = np.concatenate([np.asarray(already, dtype=np.int64), result.indices])
    labels = assign_clusters(features, centers if centers is not None
                             else kmeans_centers(features, min(k, len(unit_ids)), seed, max_samples=20_000))
    users = _users_by_item(ws)
    summary = selection_summary(features, picks, labels, item_ids=row_items,
                                user_ids_per_row=[users.get(i, ()) for i in row_items], seed=seed)
    round_no = (int(parent["round"].max()) + 1) if parent is not None else 1
    rounds = (list(parent["round"]) if parent is not None else []) + [round_no] * len(result)
    scores = (list(parent["score"]) if parent is not None else []) + result.scores.tolist()
    selection_id = f"sel-{uuid.uuid4().hex[:10]}"
    params = {"k": k, "lam": lam, "seed": seed, "weights": list(weights) if meta is not None else None,
              "rounds": round_no}
    frame = pd.DataFrame({"selection_id": selection_id, "rank": np.arange(1, len(picks) + 1),
                          "unit_id": [unit_ids[i] for i in picks], "score": scores, "round": rounds})
    with ws.transaction() as cur:
        cur.execute("INSERT INTO selections (selection_id, name, strategy, unit, set_id, budget, params, "
                    "summary, parent_id, created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [selection_id, name or f"{strategy} B={len(picks)}", strategy, unit, set_id,
                     int(len(picks)), json.dumps(params), json.dumps(_jsonable(summary)), parent_id,
                     acting_name()])
        cur.register("_picks", frame)
        cur.execute("INSERT INTO selection_picks SELECT selection_id, rank, unit_id, score, round FROM _picks")
        cur.unregister("_picks")
    return selection_id


def _users_by_item(ws: Workspace) -> dict[str, set[str]]:
    inter = ws.df("SELECT DISTINCT item_id, user_id FROM interactions")
    return inter.groupby("item_id")["user_id"].apply(set).to_dict() if len(inter) else {}


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def selection_info(ws: Workspace, selection_id: str) -> dict:
    row = ws.df("SELECT * FROM selections WHERE selection_id = ?", [selection_id])
    if row.empty:
        raise CRSError(f"selection {selection_id!r} does not exist")
    info = row.iloc[0].to_dict()
    for key in ("params", "summary"):
        info[key] = json.loads(info[key]) if info.get(key) else {}
    return info


def load_selection(ws: Workspace, selection_id: str) -> pd.DataFrame:
    selection_info(ws, selection_id)
    return ws.df("SELECT rank, unit_id, score, round FROM selection_picks WHERE selection_id = ? ORDER BY rank",
                 [selection_id])


def list_selections(ws: Workspace) -> pd.DataFrame:
    return ws.df("SELECT * FROM selections ORDER BY created_at DESC")
