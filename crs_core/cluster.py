"""K-means clusters and the 2-D UMAP map of an embedding set, stored in the workspace.

- ``run_kmeans``: scikit-learn K-means, seeded and with a fixed ``n_init``, so the same set,
  k and seed give the same clusters. Full Lloyd K-means while it is cheap (n*k up to
  ``FULL_KMEANS_MAX_NK``); above that MiniBatchKMeans (3 seeded inits on 4096-row batches,
  labels and inertia computed on all rows), which keeps 50k x 384 at k=100 to seconds.
- ``run_projection``: UMAP (15 neighbours, min_dist 0.1, cosine), seeded. Up to
  ``UMAP_FIT_MAX`` points are fitted directly; a larger set is fitted on a seeded sample of
  that size and the rest placed with ``.transform`` (the exact fit grows superlinearly and
  runs single-threaded when seeded).
- ``cluster_top_terms``: the words that set each cluster apart (TF-IDF mean inside the
  cluster minus outside it), for the map's legend.

Each run replaces an older one of the same id in one transaction.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa

from .embed import embedding_set_info, load_embedding_set, registered, write
from .errors import CRSError, WorkspaceError
from .progress import ProgressFn, report
from .store import Workspace

FULL_KMEANS_MAX_NK = 1_000_000  # n * k above which MiniBatchKMeans is used
KMEANS_N_INIT = 3
UMAP_FIT_MAX = 12_000  # fit UMAP on at most this many points; the rest are placed by .transform
UMAP_PARAMS = dict(n_neighbors=15, min_dist=0.1, metric="cosine")


def clustering_id(set_id: str, k: int) -> str:
    return f"{set_id}:k{k}"


# ------------------------------------------------------------------------------ K-means
def kmeans_fit(X: np.ndarray, k: int, seed: int = 0, method: str = "auto"):
    """(labels int32 (n,), centers float32 (k, dim), inertia) of K-means on the rows of X."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    n = len(X)
    if method == "auto":
        method = "full" if n * k <= FULL_KMEANS_MAX_NK else "minibatch"
    if method == "full":
        km = KMeans(n_clusters=k, n_init=KMEANS_N_INIT, max_iter=300, random_state=seed).fit(X)
    elif method == "minibatch":
        km = MiniBatchKMeans(
            n_clusters=k, n_init=KMEANS_N_INIT, batch_size=4096, max_iter=100,
            random_state=seed, compute_labels=True,
        ).fit(X)
    else:
        raise CRSError(f"unknown K-means method {method!r}; use auto, full or minibatch")
    return km.labels_.astype(np.int32), km.cluster_centers_.astype(np.float32), float(km.inertia_)


def run_kmeans(ws: Workspace, set_id: str, k: int = 20, seed: int = 0, *, method: str = "auto") -> str:
    """Cluster an embedding set into k groups; returns the clustering id ``<set_id>:k<k>``.

    Deterministic for a given set, k and seed; replaces an older clustering of the same id.
    """
    embedding_set_info(ws, set_id)  # a clear error when the set does not exist
    unit_ids, X = load_embedding_set(ws, set_id)
    k = int(k)
    if k < 2 or k > len(unit_ids):
        raise CRSError(
            f"k must be between 2 and the number of vectors in {set_id} ({len(unit_ids)}), got {k}"
        )
    labels, centers, inertia = kmeans_fit(X, k, seed, method)
    cid = clustering_id(set_id, k)
    rows = pa.table(
        {
            "clustering_id": pa.array([cid] * len(unit_ids), pa.string()),
            "unit_id": pa.array(unit_ids, pa.string()),
            "cluster": pa.array(labels, pa.int32()),
        }
    )
    with ws.transaction() as cur:
        write(cur, "DELETE FROM cluster_assignments WHERE clustering_id = ?", [cid])
        write(cur, "DELETE FROM clusterings WHERE clustering_id = ?", [cid])
        write(
            cur,
            "INSERT INTO clusterings (clustering_id, set_id, k, seed, inertia, centers) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [cid, set_id, k, int(seed), inertia, np.ascontiguousarray(centers, "<f4").tobytes()],
        )
        with registered(cur, rows) as view:
            write(
                cur,
                f"INSERT INTO cluster_assignments (clustering_id, unit_id, cluster) "
                f"SELECT clustering_id, unit_id, cluster FROM {view}",
            )
    return cid


def load_clustering(ws: Workspace, cid: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(unit ids, int32 labels, float32 (k, dim) centres), units in the set's order."""
    row = ws.cursor().execute(
        "SELECT c.k, c.centers, s.dim, c.set_id FROM clusterings c "
        "LEFT JOIN embedding_sets s ON s.set_id = c.set_id WHERE c.clustering_id = ?",
        [cid],
    ).fetchone()
    if row is None:
        raise WorkspaceError(
            f"clustering {cid!r} does not exist; run `python -m crs_core cluster` first"
        )
    k, raw, dim, set_id = int(row[0]), bytes(row[1]), row[2], row[3]
    dim = int(dim) if dim else len(raw) // 4 // k
    centers = np.frombuffer(raw, dtype="<f4").reshape(k, dim).astype(np.float32)
    frame = ws.df(
        "SELECT a.unit_id, a.cluster FROM cluster_assignments a "
        "LEFT JOIN embedding_rows r ON r.set_id = ? AND r.unit_id = a.unit_id "
        "WHERE a.clustering_id = ? ORDER BY r.pos, a.unit_id",
        [set_id, cid],
    )
    return frame["unit_id"].tolist(), frame["cluster"].to_numpy(dtype=np.int32), centers


def list_clusterings(ws: Workspace, set_id: str | None = None) -> pd.DataFrame:
    sql = "SELECT clustering_id, set_id, k, seed, inertia, created_at FROM clusterings"
    if set_id is None:
        return ws.df(sql + " ORDER BY created_at, clustering_id")
    return ws.df(sql + " WHERE set_id = ? ORDER BY k", [set_id])


# ------------------------------------------------------------------------------- UMAP map
def umap_2d(X: np.ndarray, seed: int = 0, progress: ProgressFn | None = None,
            fit_max: int = UMAP_FIT_MAX) -> np.ndarray:
    """float32 (n, 2) UMAP coordinates; fitted on a seeded sample of ``fit_max`` rows if larger."""
    import warnings

    import umap

    n = len(X)
    report(progress, 0, 3)
    if n > fit_max:
        rng = np.random.default_rng(seed)
        fit_rows = np.sort(rng.choice(n, fit_max, replace=False))
    else:
        fit_rows = np.arange(n)
    params = dict(UMAP_PARAMS)
    params["n_neighbors"] = min(params["n_neighbors"], len(fit_rows) - 1)
    reducer = umap.UMAP(n_components=2, random_state=seed, low_memory=True, **params)
    xy = np.zeros((n, 2), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state", spectral init notes
        xy[fit_rows] = reducer.fit_transform(X[fit_rows])
        report(progress, 2 if len(fit_rows) < n else 3, 3)
        if len(fit_rows) < n:
            rest = np.setdiff1d(np.arange(n), fit_rows)
            xy[rest] = reducer.transform(X[rest])
    report(progress, 3, 3)
    return xy


def run_projection(ws: Workspace, set_id: str, seed: int = 0, progress: ProgressFn | None = None) -> int:
    """Store a 2-D UMAP map of every unit of the set (replacing an older one); returns n."""
    embedding_set_info(ws, set_id)
    unit_ids, X = load_embedding_set(ws, set_id)
    if len(unit_ids) < 4:
        raise CRSError(f"a map needs at least 4 points; {set_id!r} has {len(unit_ids)}")
    xy = umap_2d(X, seed=seed, progress=progress)
    store_projection(ws, set_id, unit_ids, xy)
    return len(unit_ids)


def store_projection(ws: Workspace, set_id: str, unit_ids: list[str], xy: np.ndarray) -> None:
    """Replace the set's 2-D map with ``xy`` (float (n, 2), one row per unit) in one transaction."""
    rows = pa.table(
        {
            "set_id": pa.array([set_id] * len(unit_ids), pa.string()),
            "unit_id": pa.array(list(unit_ids), pa.string()),
            "x": pa.array(np.asarray(xy[:, 0], np.float32), pa.float32()),
            "y": pa.array(np.asarray(xy[:, 1], np.float32), pa.float32()),
        }
    )
    with ws.transaction() as cur:
        write(cur, "DELETE FROM projections WHERE set_id = ?", [set_id])
        with registered(cur, rows) as view:
            write(cur, f"INSERT INTO projections (set_id, unit_id, x, y) SELECT set_id, unit_id, x, y FROM {view}")


def load_projection(ws: Workspace, set_id: str) -> pd.DataFrame:
    """DataFrame(unit_id, x, y) in the set's order (empty if the set has no map yet)."""
    return ws.df(
        "SELECT p.unit_id, p.x, p.y FROM projections p "
        "LEFT JOIN embedding_rows r ON r.set_id = p.set_id AND r.unit_id = p.unit_id "
        "WHERE p.set_id = ? ORDER BY r.pos, p.unit_id",
        [set_id],
    )


# --------------------------------------------------------------------------- cluster terms
_TAG = re.compile(r"<[^>]*>")


def _preprocess(text: str) -> str:
    return _TAG.sub(" ", text).lower()


def cluster_top_terms(texts: list[str], labels, n_terms: int = 8) -> dict[int, list[str]]:
    """Distinctive words per cluster: mean TF-IDF inside the cluster minus outside it.

    English stop words and HTML tags (``<br />``) are dropped; words of 3+ letters. Clusters
    are keyed by their label; a term is listed only if it is more frequent inside than outside.
    """
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfVectorizer

    labels = np.asarray(labels)
    texts = ["" if t is None else str(t) for t in texts]
    if len(texts) != len(labels):
        raise CRSError(f"{len(texts)} texts but {len(labels)} labels")
    if not texts:
        return {}
    vectorizer = TfidfVectorizer(
        preprocessor=_preprocess, stop_words="english", token_pattern=r"(?u)\b[^\W\d_]{3,}\b",
        min_df=2 if len(texts) > 50 else 1, max_df=0.5 if len(texts) > 50 else 1.0,
        sublinear_tf=True, max_features=50_000, dtype=np.float32,
    )
    try:
        tfidf = vectorizer.fit_transform(texts)
    except ValueError:  # empty vocabulary (only stop words / numbers)
        return {int(c): [] for c in np.unique(labels)}
    vocab = vectorizer.get_feature_names_out()
    clusters, inverse = np.unique(labels, return_inverse=True)
    member = sparse.csr_matrix(
        (np.ones(len(labels), dtype=np.float32), (inverse, np.arange(len(labels)))),
        shape=(len(clusters), len(labels)),
    )
    sums = np.asarray((member @ tfidf).todense())  # (k, vocab) TF-IDF sums per cluster
    counts = np.bincount(inverse, minlength=len(clusters)).astype(np.float64)[:, None]
    total = sums.sum(axis=0, keepdims=True)
    mean_in = sums / counts
    rest = np.maximum(len(labels) - counts, 1.0)
    mean_out = (total - sums) / rest
    score = mean_in - mean_out
    terms: dict[int, list[str]] = {}
    for row, cluster in enumerate(clusters):
        top = np.argsort(-score[row], kind="stable")[:n_terms]
        terms[int(cluster)] = [str(vocab[j]) for j in top if score[row, j] > 0]
    return terms
