"""K-means clusters and the 2-D UMAP map of an embedding set, stored in the workspace."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .embed import load_embedding_set
from .errors import CRSError
from .progress import ProgressFn, report
from .store import Workspace, blobs_to_vectors

UMAP_FIT_MAX = 20_000  # fit UMAP on at most this many points; the rest are placed by .transform


def clustering_id(set_id: str, k: int) -> str:
    return f"{set_id}:k{k}"


def run_kmeans(ws: Workspace, set_id: str, k: int = 20, seed: int = 0) -> str:
    """K-means (scikit-learn, fixed n_init, seeded) over a set; replaces an older run of the same k."""
    from sklearn.cluster import KMeans

    unit_ids, X = load_embedding_set(ws, set_id)
    if k < 2 or k > len(unit_ids):
        raise CRSError(f"k must be between 2 and the number of vectors ({len(unit_ids)}), got {k}")
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(X)
    cid = clustering_id(set_id, k)
    assignments = pd.DataFrame({"clustering_id": cid, "unit_id": unit_ids, "cluster": km.labels_.astype(int)})
    with ws.transaction() as cur:
        cur.execute("DELETE FROM cluster_assignments WHERE clustering_id = ?", [cid])
        cur.execute("DELETE FROM clusterings WHERE clustering_id = ?", [cid])
        cur.execute("INSERT INTO clusterings (clustering_id, set_id, k, seed, inertia, centers) VALUES (?, ?, ?, ?, ?, ?)",
                    [cid, set_id, k, seed, float(km.inertia_), km.cluster_centers_.astype("<f4").tobytes()])
        cur.register("_assign", assignments)
        cur.execute("INSERT INTO cluster_assignments SELECT clustering_id, unit_id, cluster FROM _assign")
        cur.unregister("_assign")
    return cid


def load_clustering(ws: Workspace, cid: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(unit ids, labels, centres) of a stored clustering."""
    info = ws.df("SELECT k, centers FROM clusterings WHERE clustering_id = ?", [cid])
    if info.empty:
        raise CRSError(f"clustering {cid!r} does not exist; run `python -m crs_core cluster` first")
    k = int(info.iloc[0]["k"])
    raw = bytes(info.iloc[0]["centers"])
    centers = blobs_to_vectors([raw], len(raw) // 4).reshape(k, -1)
    frame = ws.df("SELECT unit_id, cluster FROM cluster_assignments WHERE clustering_id = ? ORDER BY unit_id", [cid])
    return frame["unit_id"].tolist(), frame["cluster"].to_numpy(), centers


def list_clusterings(ws: Workspace) -> pd.DataFrame:
    return ws.df("SELECT clustering_id, set_id, k, seed, inertia, created_at FROM clusterings ORDER BY created_at")


def run_projection(ws: Workspace, set_id: str, seed: int = 0, progress: ProgressFn | None = None) -> int:
    """2-D UMAP (cosine, 15 neighbours) of a set; large sets are fitted on a seeded sample of
    UMAP_FIT_MAX points and the rest placed with `transform`. Returns the number of points."""
    import umap

    unit_ids, X = load_embedding_set(ws, set_id)
    if len(unit_ids) < 4:
        raise CRSError(f"a map needs at least 4 points; {set_id!r} has {len(unit_ids)}")
    report(progress, 0, 3)
    rng = np.random.default_rng(seed)
    fit_rows = np.sort(rng.choice(len(X), UMAP_FIT_MAX, replace=False)) if len(X) > UMAP_FIT_MAX \
        else np.arange(len(X))
    reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(fit_rows) - 1), min_dist=0.1,
                        metric="cosine", random_state=seed, low_memory=True)
    xy = np.zeros((len(X), 2), dtype=np.float32)
    xy[fit_rows] = reducer.fit_transform(X[fit_rows])
    report(progress, 2, 3)
    rest = np.setdiff1d(np.arange(len(X)), fit_rows)
    if len(rest):
        xy[rest] = reducer.transform(X[rest])
    frame = pd.DataFrame({"set_id": set_id, "unit_id": unit_ids, "x": xy[:, 0], "y": xy[:, 1]})
    with ws.transaction() as cur:
        cur.execute("DELETE FROM projections WHERE set_id = ?", [set_id])
        cur.register("_xy", frame)
        cur.execute("INSERT INTO projections SELECT set_id, unit_id, x, y FROM _xy")
        cur.unregister("_xy")
    report(progress, 3, 3)
    return len(frame)


def load_projection(ws: Workspace, set_id: str) -> pd.DataFrame:
    return ws.df("SELECT unit_id, x, y FROM projections WHERE set_id = ?", [set_id])


def cluster_top_terms(texts: list[str], labels: np.ndarray, n_terms: int = 8) -> dict[int, list[str]]:
    """Distinctive words per cluster: mean TF-IDF inside the cluster minus outside it."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    labels = np.asarray(labels)
    if len(texts) == 0:
        return {}
    vectorizer = TfidfVectorizer(stop_words="english", max_features=20_000, min_df=2 if len(texts) > 50 else 1,
                                 token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]{2,}\b")
    tfidf = vectorizer.fit_transform(texts)
    vocab = np.array(vectorizer.get_feature_names_out())
    overall = np.asarray(tfidf.mean(axis=0)).ravel()
    terms = {}
    for cluster in np.unique(labels):
        inside = labels == cluster
        mean_in = np.asarray(tfidf[inside].mean(axis=0)).ravel()
        terms[int(cluster)] = vocab[np.argsort(-(mean_in - overall))[:n_terms]].tolist()
    return terms
