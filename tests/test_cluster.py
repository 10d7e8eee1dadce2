"""K-means, the UMAP map and cluster terms over a real (small) embedded review set."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from crs_core.cluster import (
    cluster_top_terms,
    kmeans_fit,
    list_clusterings,
    load_clustering,
    load_projection,
    run_kmeans,
    run_projection,
    umap_2d,
)
from crs_core.embed import build_embedding_set, get_encoder, load_embedding_set
from crs_core.errors import CRSError, WorkspaceError
from crs_core.store import Workspace

ROOT = Path(__file__).resolve().parent.parent
N = 160


def short_reviews(n: int) -> tuple[list[str], list[str]]:
    """n short real IMDb reviews (ids, texts): shortest of the first 2,000 of the bundled file."""
    files = sorted((ROOT / "data" / "bundled" / "imdb_reviews").glob("*.jsonl.gz"))
    if not files:
        shared = Path("/work/shared/data/reviews/imdb_reviews.jsonl.gz")
        files = [shared] if shared.exists() else []
    if not files:
        pytest.skip("no IMDb review file available")
    rows = []
    with gzip.open(files[0], "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= 2000:
                break
            rec = json.loads(line)
            rows.append((len(rec["text"]), rec["review_id"], rec["text"]))
    rows.sort()
    return [r[1] for r in rows[:n]], [r[2] for r in rows[:n]]


@pytest.fixture(scope="module")
def corpus():
    return short_reviews(N)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, corpus):
    ids, texts = corpus
    w = Workspace(tmp_path_factory.mktemp("cluster") / "w.duckdb")
    build_embedding_set(w, "review", ids, texts, get_encoder("minilm"))
    yield w
    w.close()


SET = "review:minilm"


def test_kmeans_is_deterministic_and_stored(ws, corpus):
    ids, _ = corpus
    cid = run_kmeans(ws, SET, k=6, seed=0)
    assert cid == "review:minilm:k6"
    units, labels, centers = load_clustering(ws, cid)
    assert units == ids  # in the set's order
    assert labels.shape == (N,) and set(labels.tolist()) == set(range(6))
    assert centers.shape == (6, 384) and centers.dtype == np.float32
    info = list_clusterings(ws, SET).set_index("clustering_id").loc[cid]
    assert info["k"] == 6 and info["seed"] == 0 and info["inertia"] > 0
    # same seed -> same clustering; the rerun replaces the old rows
    run_kmeans(ws, SET, k=6, seed=0)
    units2, labels2, centers2 = load_clustering(ws, cid)
    assert units2 == units and np.array_equal(labels2, labels) and np.array_equal(centers2, centers)
    assert ws.scalar("SELECT count(*) FROM cluster_assignments WHERE clustering_id = ?", [cid]) == N
    assert ws.scalar("SELECT count(*) FROM clusterings WHERE clustering_id = ?", [cid]) == 1
    # centres are the means of their members
    _, X = load_embedding_set(ws, SET)
    assert np.allclose(centers[2], X[labels == 2].mean(axis=0), atol=1e-4)


def test_minibatch_path_is_deterministic_too(ws):
    _, X = load_embedding_set(ws, SET)
    a = kmeans_fit(X, 5, seed=3, method="minibatch")
    b = kmeans_fit(X, 5, seed=3, method="minibatch")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[1].shape == (5, 384) and a[2] > 0


def test_kmeans_errors(ws):
    with pytest.raises(CRSError, match="k must be between 2 and the number of vectors"):
        run_kmeans(ws, SET, k=N + 1)
    with pytest.raises(CRSError, match="k must be"):
        run_kmeans(ws, SET, k=1)
    with pytest.raises(WorkspaceError, match="no embedding set"):
        run_kmeans(ws, "review:missing", k=3)
    with pytest.raises(WorkspaceError, match="does not exist"):
        load_clustering(ws, "review:minilm:k99")


def test_projection_covers_every_unit(ws, corpus):
    ids, _ = corpus
    seen = []
    assert run_projection(ws, SET, seed=0, progress=lambda d, t: seen.append((d, t))) == N
    frame = load_projection(ws, SET)
    assert frame["unit_id"].tolist() == ids
    assert np.isfinite(frame[["x", "y"]].to_numpy()).all()
    assert frame[["x", "y"]].std().min() > 0  # a real 2-D spread, not a point
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)
    # replacing keeps one row per unit
    run_projection(ws, SET, seed=0)
    assert ws.scalar("SELECT count(*) FROM projections WHERE set_id = ?", [SET]) == N
    with pytest.raises(WorkspaceError, match="no embedding set"):
        run_projection(ws, "review:missing")


def test_projection_fitted_on_a_sample_places_the_rest(ws):
    _, X = load_embedding_set(ws, SET)
    xy = umap_2d(X, seed=0, fit_max=100)  # 100 fitted, 60 placed with .transform
    assert xy.shape == (N, 2) and np.isfinite(xy).all()


def test_rebuilding_a_set_with_other_rows_drops_its_clusterings_and_map(tmp_path, corpus):
    ids, texts = corpus
    w = Workspace(tmp_path / "w.duckdb")
    enc = get_encoder("minilm")
    build_embedding_set(w, "review", ids[:30], texts[:30], enc)
    run_kmeans(w, SET, k=3)
    run_projection(w, SET)
    build_embedding_set(w, "review", ids[:30], texts[:30], enc)  # same rows: kept
    assert w.count("clusterings") == 1 and w.count("projections") == 30
    build_embedding_set(w, "review", ids[:25], texts[:25], enc)  # other rows: stale, removed
    assert w.count("clusterings") == 0 and w.count("cluster_assignments") == 0
    assert w.count("projections") == 0
    w.close()


def test_cluster_top_terms():
    texts = (
        ["Zombies everywhere! The zombie apocalypse gore is great.<br /><br />More zombies please."] * 3
        + ["A tender romance; the love story and the wedding made me cry."] * 3
        + ["Spaceships, aliens and a galactic war in deep space."] * 3
    )
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    terms = cluster_top_terms(texts, labels, n_terms=6)
    assert set(terms) == {0, 1, 2}
    assert terms[0][0] == "zombies"  # the most frequent word of its cluster leads
    assert "romance" in terms[1] and "space" in terms[2] and "zombies" not in terms[1] + terms[2]
    assert all(len(t) <= 6 for t in terms.values())
    assert not {"br", "the", "and"} & {w for t in terms.values() for w in t}


def test_cluster_top_terms_on_real_reviews(ws, corpus):
    _, texts = corpus
    _, labels, _ = load_clustering(ws, run_kmeans(ws, SET, k=4, seed=1))
    terms = cluster_top_terms(texts, labels, n_terms=8)
    assert set(terms) == set(range(4))
    assert all(1 <= len(t) <= 8 for t in terms.values())
    assert "br" not in {w for t in terms.values() for w in t}
