"""The pipeline's steps and their state: what `init` builds on first start and Home shows.

Each step is skipped when its output is already in the workspace, so a second start reuses
everything and an interrupted first start resumes (embeddings are cached per text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .progress import ProgressFn
from .store import Workspace

DEFAULT_MODEL = "minilm"
DEFAULT_K = 20
REVIEW_SET = f"review:{DEFAULT_MODEL}"

ProgressFactory = Callable[[str], ProgressFn | None]


@dataclass(frozen=True)
class StepState:
    key: str
    title: str
    done: bool
    detail: str
    hint: str  # what to run when it is not done yet


def _count(ws: Workspace, sql: str, params: list | None = None) -> int:
    return int(ws.scalar(sql, params) or 0)


def pipeline_status(ws: Workspace) -> list[StepState]:
    """Steps in order, with counts, for the Home page and `status`."""
    items, reviews = ws.count("items"), ws.count("reviews")
    sets = _count(ws, "SELECT count(*) FROM embedding_sets")
    clusterings = _count(ws, "SELECT count(*) FROM clusterings")
    projected = _count(ws, "SELECT count(DISTINCT set_id) FROM projections")
    selections = ws.count("selections")
    queries = ws.count("synthetic_queries")
    reviewed = _count(ws, "SELECT count(*) FROM synthetic_queries WHERE status <> 'pending'")
    augmented = ws.count("augmented_labels")
    runs = ws.count("runs")
    return [
        StepState("seeds", "Seed data", items > 0 and reviews > 0,
                  f"{items:,} items, {reviews:,} reviews", "python -m crs_core init"),
        StepState("embed", "Embeddings", sets > 0, f"{sets} embedding set(s)", "python -m crs_core embed"),
        StepState("cluster", "Clusters & map", clusterings > 0 and projected > 0,
                  f"{clusterings} clustering(s), {projected} map(s)", "python -m crs_core cluster"),
        StepState("select", "Selection", selections > 0, f"{selections} selection(s)",
                  "python -m crs_core select"),
        StepState("synth", "Synthesis", queries > 0, f"{queries:,} synthetic queries",
                  "python -m crs_core synth"),
        StepState("review", "Human review", reviewed > 0, f"{reviewed:,} of {queries:,} reviewed",
                  "the Review page"),
        StepState("augment", "Label augmentation", augmented > 0, f"{augmented:,} augmented labels",
                  "python -m crs_core augment"),
        StepState("evaluate", "Training & evaluation", runs > 0, f"{runs} evaluated run(s)",
                  "python -m crs_core eval"),
    ]


def review_texts(ws: Workspace) -> tuple[list[str], list[str]]:
    frame = ws.df("SELECT review_id, text FROM reviews ORDER BY review_id")
    return frame["review_id"].tolist(), frame["text"].tolist()


def embed_reviews(ws: Workspace, model: str = DEFAULT_MODEL, progress: ProgressFn | None = None) -> str:
    from .embed import build_embedding_set, get_encoder

    ids, texts = review_texts(ws)
    return build_embedding_set(ws, "review", ids, texts, get_encoder(model), progress=progress)


def seed_shipped_vectors(ws: Workspace, model: str = DEFAULT_MODEL):
    """Seed the embedding cache with the bundled reviews' shipped vectors (see prebuilt.py)."""
    from .embed import get_encoder
    from .prebuilt import seed_embedding_cache

    _, texts = review_texts(ws)
    return seed_embedding_cache(ws, texts, lambda: get_encoder(model), encoder_name=model)


def init_default(ws: Workspace, progress_for: ProgressFactory = lambda label: None, *,
                 k: int = DEFAULT_K, seed: int = 0,
                 note: Callable[[str], None] = lambda line: None) -> list[str]:
    """Ingest the bundled data, embed the reviews, cluster and project them — each once.

    Shipped vectors and map (data/bundled/review_vectors) are used when they verify, so a first
    build takes about a minute instead of half an hour; ``note`` receives one line saying
    whether they were used and why.
    """
    from .cluster import run_kmeans, run_projection
    from .ingest import ingest_default
    from .prebuilt import store_shipped_projection

    done: list[str] = []
    if ws.count("items") == 0 or ws.count("reviews") == 0:
        ingest_default(ws, progress=progress_for("Ingesting bundled data"))
        done.append("ingest")
    if not _count(ws, "SELECT count(*) FROM embedding_sets WHERE set_id = ?", [REVIEW_SET]):
        shipped = seed_shipped_vectors(ws)
        note(shipped.reason)
        embed_reviews(ws, progress=progress_for("Embedding reviews"))
        done.append("embed (shipped vectors)" if shipped.used else "embed")
    if not _count(ws, "SELECT count(*) FROM clusterings WHERE set_id = ? AND k = ?", [REVIEW_SET, k]):
        run_kmeans(ws, REVIEW_SET, k=k, seed=seed)
        done.append("cluster")
    if not _count(ws, "SELECT count(*) FROM projections WHERE set_id = ?", [REVIEW_SET]):
        if seed == 0 and store_shipped_projection(ws, REVIEW_SET):
            done.append("map (shipped)")
        else:
            run_projection(ws, REVIEW_SET, seed=seed, progress=progress_for("Projecting to 2-D (UMAP)"))
            done.append("project")
    return done


def default_build_pending(ws: Workspace) -> bool:
    """Seeds, embeddings, clusters or the map of the default build are still missing."""
    steps = {s.key: s.done for s in pipeline_status(ws)}
    return not (steps["seeds"] and steps["embed"] and steps["cluster"])
