"""Non-generative conversational recommenders behind one interface.

Every recommender has a `name`, `fit(train)` and a batched
`recommend(contexts, k, exclude=None) -> list[list[item_id]]`; contexts are lists of
utterances (oldest first), results are catalog item ids, best first, never an excluded item.

- `Popularity`: most-interacted items (distinct users in `interactions`) or most frequent
  training labels.
- `NBCRS` (Xie et al. 2024, "Neighborhood-Based Collaborative Filtering for Conversational
  Recommendation"): embed the training contexts; for a test context take the `n_neighbors`
  (default 50) most cosine-similar training contexts and score an item by the summed
  similarity of the neighbours that list it as ground truth. A neighbour's list is ranked
  (synthetic lists put the best match first), so by default an item at rank r in it counts
  sim / log2(r + 1) (rank 1: full weight, rank 20: 0.23); `rank_weight="none"` counts sim.
  Items with equal votes, and items with no vote, follow training-label popularity, then
  interaction popularity.
- `DenseRetrieval` (zero-shot): cosine between the embedded context and embedded item texts
  "Title (Year). Genres: a, b. Plot Directed by X. Starring: A, B, C."
  With `encoder=load_retriever(folder)` the same ranking uses a bi-encoder fine-tuned by
  `crs_core.train`: the query text (`dialogue_query`), its truncation side and the token
  lengths are the ones training used, read from the model's crs_model.json. Every consumer
  (CLI, pages, jobs, benches) loads a trained retriever through `load_retriever`.

Context text (NBCRS and dense retrieval): the last 3 non-empty utterances joined with
spaces, then cut from the START to its last 1,000 characters. The latest turns carry the
request; MiniLM reads at most 256 word pieces (about 1,000 characters of English) and its
tokenizer would otherwise drop the END of a long text. On ReDial (zero-shot dense, whole
catalog) the last 3 utterances gave Recall@20 .039, against .021 / .036 / .037 for the last
1 / 2 / 5 (INSPIRED, 163 turns, cannot tell 2 from 3 apart).

`recommend` also takes `candidates=` (item ids the ranking is limited to, e.g. a dataset's
item set; `crs_core.evaluate.evaluate` passes it). Scoring is batched matrix algebra over the
whole catalog (no Python loop over items).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .progress import ProgressFn
from .recommenders_base import (CONTEXT_MAX_CHARS, CONTEXT_TURNS, Catalog, DEFAULT_ENCODER, QUERY_SPEAKERS,
    Recommender, RecommenderError, RetrieverEncoder, TrainingExample, TrainingSet, context_text, default_encoder,
    dialogue_query, embed_cached, item_embeddings, load_retriever, training_set_from_synthetic,
    training_set_from_turns, _encode, _encoder_name, _normalise, _resolve_catalog, _top_k)

if TYPE_CHECKING:  # pragma: no cover
    from .store import Workspace

__all__ = [
    "Recommender", "RecommenderError", "TrainingExample", "TrainingSet", "Catalog", "Popularity", "NBCRS",
    "DenseRetrieval", "Hybrid", "RetrieverEncoder", "load_retriever", "dialogue_query",
    "training_set_from_synthetic", "training_set_from_turns", "context_text", "item_embeddings",
    "embed_cached", "default_encoder", "make_recommender", "RecommenderKind", "RECOMMENDERS",
    "register_recommender", "recommender_labels", "CONTEXT_MAX_CHARS", "CONTEXT_TURNS", "DEFAULT_ENCODER",
    "QUERY_SPEAKERS",
]

# ----------------------------------------------------------------------------- popularity


class Popularity:
    """Most popular items first, the same list for every context (minus exclusions).

    source="interactions": distinct users per item in `interactions`;
    source="labels": how many training examples list the item (interaction counts break ties).
    Items without any count follow in catalog order.
    """

    batch_size = 4096

    def __init__(self, ws: "Workspace | None" = None, *, source: str = "interactions",
                 catalog: Catalog | None = None):
        if source not in ("interactions", "labels"):
            raise RecommenderError(f"popularity source must be 'interactions' or 'labels', got {source!r}")
        self.source = source
        self.name = f"popularity-{source}"
        self.catalog = _resolve_catalog(ws, catalog)
        self._order: np.ndarray | None = None
        if source == "interactions":
            self._set_scores(np.zeros(len(self.catalog)))

    def _set_scores(self, primary: np.ndarray) -> None:
        secondary = self.catalog.interaction_counts
        if self.source == "interactions" and not secondary.any():
            raise RecommenderError(
                "the workspace has no interactions to count; import ratings (e.g. MovieLens) "
                "or use Popularity(source='labels') with a training set"
            )
        # descending by primary, then secondary, then catalog position
        self._order = np.lexsort((np.arange(len(primary)), -secondary, -primary))

    def fit(self, train: "TrainingSet | None" = None) -> None:
        if self.source == "interactions":
            return
        train = TrainingSet.coerce(train)
        counts = np.zeros(len(self.catalog))
        for ex in train:
            for item in set(ex.labels):
                i = self.catalog.index.get(item)
                if i is not None:
                    counts[i] += 1
        if not counts.any():
            raise RecommenderError("popularity from labels: no training label is in the catalog")
        self._set_scores(counts)

    def ranking(self) -> list[str]:
        if self._order is None:
            raise RecommenderError(f"{self.name} is not fitted; call fit(train) first")
        return self.catalog.item_ids[self._order].tolist()

    def recommend(self, contexts: list[list[str]], k: int,
                  exclude: list[set[str]] | None = None,
                  candidates: Iterable[str] | None = None) -> list[list[str]]:
        ranking = self.ranking()
        if candidates is not None:
            allowed = candidates if isinstance(candidates, (set, frozenset)) else set(candidates)
            ranking = [i for i in ranking if i in allowed]
        if exclude is not None and len(exclude) != len(contexts):
            raise RecommenderError(f"exclude has {len(exclude)} sets for {len(contexts)} contexts")
        out = []
        for r in range(len(contexts)):
            ex = exclude[r] if exclude is not None else None
            if not ex:
                out.append(ranking[:k])
                continue
            row = []
            for item in ranking:  # stops after k + |exclude| items at most
                if item not in ex:
                    row.append(item)
                    if len(row) >= k:
                        break
            out.append(row)
        return out


# ----------------------------------------------------------------------------- NBCRS


class _ScoreRanker:
    """`recommend` for recommenders that score every catalog item per context."""

    catalog: Catalog

    def ranking_scores(self, contexts: list[list[str]]) -> np.ndarray:
        return self.scores(contexts)

    def recommend(self, contexts: list[list[str]], k: int,
                  exclude: list[set[str]] | None = None,
                  candidates: Iterable[str] | None = None) -> list[list[str]]:
        if not contexts:
            return []
        excl = self.catalog.exclude_indices(exclude, len(contexts))
        return _top_k(self.ranking_scores(contexts), k, excl, self.catalog.item_ids,
                      self.catalog.candidate_mask(candidates))


class NBCRS(_ScoreRanker):
    """Neighbourhood-based CRS (Xie et al. 2024); see the module docstring for the scoring."""

    batch_size = 256

    def __init__(self, ws: "Workspace | None" = None, *, n_neighbors: int = 50,
                 rank_weight: str = "log", encoder: Any = None, context_turns: int = CONTEXT_TURNS,
                 max_chars: int = CONTEXT_MAX_CHARS, catalog: Catalog | None = None):
        if n_neighbors < 1:
            raise RecommenderError(f"n_neighbors must be >= 1, got {n_neighbors}")
        if rank_weight not in ("log", "none"):
            raise RecommenderError(f"rank_weight must be 'log' or 'none', got {rank_weight!r}")
        self.n_neighbors = n_neighbors
        self.rank_weight = rank_weight
        self.context_turns = context_turns
        self.max_chars = max_chars
        self.catalog = _resolve_catalog(ws, catalog)
        self._ws = ws
        self._encoder = encoder
        self.name = f"nbcrs-n{n_neighbors}"
        self._train_vecs: np.ndarray | None = None
        self._labels = None  # scipy.sparse CSR (n_train, N)
        self._prior: np.ndarray | None = None
        self.n_train = 0
        self.n_labels_dropped = 0

    @property
    def encoder(self) -> Any:
        if self._encoder is None or isinstance(self._encoder, str):
            self._encoder = default_encoder(self._encoder or DEFAULT_ENCODER)
        return self._encoder

    def fit(self, train: "TrainingSet", progress: ProgressFn | None = None) -> None:
        from scipy import sparse

        train = TrainingSet.coerce(train)
        rows, cols, vals = [], [], []
        keep_ctx: list[str] = []
        dropped = 0
        freq = np.zeros(len(self.catalog))
        for ex in train:
            labels = [self.catalog.index.get(x) for x in dict.fromkeys(ex.labels)]
            dropped += sum(1 for i in labels if i is None)
            labels = [i for i in labels if i is not None]
            if not labels:
                continue
            r = len(keep_ctx)
            keep_ctx.append(context_text(ex.context, self.context_turns, self.max_chars))
            for rank, i in enumerate(labels, start=1):
                rows.append(r)
                cols.append(i)
                vals.append(1.0 / math.log2(rank + 1) if self.rank_weight == "log" else 1.0)
                freq[i] += 1
        if not keep_ctx:
            raise RecommenderError(
                "NBCRS needs training examples whose labels are catalog items; the training set "
                f"has {len(train)} examples and none qualifies"
            )
        self._train_vecs = embed_cached(self._ws, self.encoder, keep_ctx, progress)
        self._labels = sparse.csr_matrix(
            (np.asarray(vals, np.float32), (rows, cols)), shape=(len(keep_ctx), len(self.catalog))
        )
        # popularity prior in [0, 1): training-label frequency, then interaction counts
        inter = self.catalog.interaction_counts
        prior = freq / (freq.max() + 1.0)
        if inter.any():
            prior = prior + (inter / (inter.max() + 1.0)) / (freq.max() + 1.0)
        self._prior = prior / (prior.max() + 1e-9) * 0.999 if prior.any() else prior
        self.n_train = len(keep_ctx)
        self.n_labels_dropped = dropped

    def scores(self, contexts: list[list[str]]) -> np.ndarray:
        """(B, N) neighbour votes (before the popularity tie-break)."""
        from scipy import sparse

        if self._train_vecs is None:
            raise RecommenderError(f"{self.name} is not fitted; call fit(train) first")
        q = _encode(self.encoder, [context_text(c, self.context_turns, self.max_chars)
                                   for c in contexts])
        sims = q @ self._train_vecs.T                                  # (B, n_train)
        n = min(self.n_neighbors, sims.shape[1])
        if n < sims.shape[1]:
            nb = np.argpartition(-sims, n - 1, axis=1)[:, :n]
        else:
            nb = np.tile(np.arange(sims.shape[1]), (len(contexts), 1))
        w = np.clip(np.take_along_axis(sims, nb, axis=1), 0.0, None)  # cosine < 0: no vote
        weights = sparse.csr_matrix(
            (w.ravel(), (np.repeat(np.arange(len(contexts)), n), nb.ravel())),
            shape=sims.shape,
        )
        return np.asarray((weights @ self._labels).todense(), dtype=np.float64)

    def ranking_scores(self, contexts: list[list[str]]) -> np.ndarray:
        # votes of real neighbours are >= ~1e-2; the prior (< 1e-6) only orders equal votes
        return self.scores(contexts) + 1e-6 * self._prior


# ----------------------------------------------------------------------------- dense retrieval


class DenseRetrieval(_ScoreRanker):
    """Zero-shot: rank items by cosine(context embedding, item-text embedding)."""

    batch_size = 512

    def __init__(self, ws: "Workspace | None" = None, *, encoder: Any = None,
                 context_turns: int = CONTEXT_TURNS, max_chars: int = CONTEXT_MAX_CHARS,
                 catalog: Catalog | None = None):
        self.catalog = _resolve_catalog(ws, catalog)
        self._ws = ws
        self._encoder = encoder
        self.context_turns = context_turns
        self.max_chars = max_chars
        self._items: np.ndarray | None = None
        label = encoder if isinstance(encoder, str) else (
            DEFAULT_ENCODER if encoder is None else _encoder_name(encoder))
        self.name = f"dense-{label}"

    @property
    def encoder(self) -> Any:
        if self._encoder is None or isinstance(self._encoder, str):
            self._encoder = default_encoder(self._encoder or DEFAULT_ENCODER)
        return self._encoder

    def fit(self, train: "TrainingSet | None" = None, progress: ProgressFn | None = None) -> None:
        """Zero-shot: nothing is learned; embeds (or loads cached) item texts."""
        if self._items is None:
            self._items = item_embeddings(self.catalog, self.encoder, self._ws, progress)

    def scores(self, contexts: list[list[str]]) -> np.ndarray:
        self.fit()
        as_query = getattr(self.encoder, "query_text", None)  # trained retrievers: the query text of training
        texts = [as_query(c) if as_query is not None else context_text(c, self.context_turns, self.max_chars)
                 for c in contexts]
        queries = getattr(self.encoder, "encode_queries", None)  # asymmetric (fine-tuned) encoders
        q = _encode(self.encoder, texts) if queries is None else _normalise(np.asarray(queries(texts), np.float32), len(texts))
        return q @ self._items.T


# ----------------------------------------------------------------------------- hybrid


HYBRID_GRID_POP = (0.0, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5)
HYBRID_GRID_CF = (0.0, 0.02, 0.05, 0.1, 0.2)


class Hybrid(_ScoreRanker):
    """Dense score + item-to-item collaborative similarity + popularity prior, weights fitted
    on TRAINING data only.

    score(i) = cos(query, item i)                      (a `DenseRetrieval`: zero-shot MiniLM, or a
                                                        trained retriever via `encoder=load_retriever(..)`)
             + w_cf  * mean over the items m mentioned earlier in the dialogue of cos_CF(i, m)
                       (cosine of the items' binary user vectors in `interactions`, MovieLens)
             + w_pop * log(1 + n_i) / log(1 + max n)   (n_i: training examples that list item i)

    The items mentioned earlier are the `exclude` sets `recommend` gets (the evaluation passes
    exactly those). `fit(train)` holds out whole dialogues of `train` (`val_fraction`), counts
    popularity on the rest, picks (w_cf, w_pop) on a grid by Recall@10 on the held-out turns
    (ties: the smaller weights), then recounts popularity on all of `train`. It reads only
    `train`, the catalog and the interactions: never a dialogue of a test set. A training set
    named like a test split ("*_test") is refused."""

    batch_size = 256

    def __init__(self, ws: "Workspace | None" = None, *, encoder: Any = None, catalog: Catalog | None = None,
                 val_fraction: float = 0.2, seed: int = 13, weights: tuple[float, float] | None = None):
        self.catalog = _resolve_catalog(ws, catalog)
        self._ws = ws
        self.dense = DenseRetrieval(ws, encoder=encoder, catalog=self.catalog)
        self.val_fraction, self.seed = val_fraction, seed
        self.weights = weights  # (w_cf, w_pop); None until fitted
        self._pop: np.ndarray | None = None
        self._cf = None  # (N, U) L2-normalised sparse user vectors of the catalog items
        self.fit_report: dict[str, Any] = {}
        self.name = f"hybrid-{self.dense.name}"

    def _interaction_vectors(self):
        from scipy import sparse

        if self._cf is None:
            frame = (self._ws.df("SELECT DISTINCT item_id, user_id FROM interactions")
                     if self._ws is not None else None)
            rows, cols, users = [], [], {}
            if frame is not None and not frame.empty:
                for item, user in zip(frame["item_id"].astype(str), frame["user_id"].astype(str)):
                    i = self.catalog.index.get(item)
                    if i is not None:
                        rows.append(i)
                        cols.append(users.setdefault(user, len(users)))
            m = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                                  shape=(len(self.catalog), max(1, len(users))))
            norms = np.sqrt(np.asarray(m.multiply(m).sum(1)).ravel())
            self._cf = sparse.diags(1.0 / np.maximum(norms, 1e-12)).astype(np.float32) @ m
        return self._cf

    def cf_scores(self, mentioned: Sequence[Iterable[str]]) -> np.ndarray:
        """(B, N): mean CF cosine of each item to the context's mentioned items (0 without any)."""
        vecs = self._interaction_vectors()
        out = np.zeros((len(mentioned), len(self.catalog)), np.float32)
        for r, items in enumerate(mentioned):
            idx = [self.catalog.index[i] for i in (items or ()) if i in self.catalog.index]
            if idx:
                out[r] = np.asarray((vecs[idx] @ vecs.T).mean(0)).ravel()
        return out

    def _popularity(self, examples: Sequence[TrainingExample]) -> np.ndarray:
        counts = np.zeros(len(self.catalog))
        for ex in examples:
            for item in set(ex.labels):
                i = self.catalog.index.get(item)
                if i is not None:
                    counts[i] += 1
        return np.log1p(counts) / max(np.log1p(counts.max()), 1e-12)

    def fit(self, train: "TrainingSet", progress: ProgressFn | None = None) -> None:
        from .train_data import Example
        from .train_retriever import _validation_split

        train = TrainingSet.coerce(train)
        if str(train.name).endswith("_test"):
            raise RecommenderError(f"{train.name} is a test split: the hybrid is fitted on training data only")
        examples = [e for e in train if any(lab in self.catalog.index for lab in e.labels)]
        if not examples:
            raise RecommenderError("the hybrid needs training examples whose labels are catalog items")
        self.dense.fit(None, progress)
        if self.weights is None:
            fit_idx, val_idx = _validation_split([Example(list(e.context) or [""], list(e.labels)) for e in examples],
                                                 self.val_fraction, self.seed)
            val = [examples[i] for i in val_idx if examples[i].context]
            self._pop = self._popularity([examples[i] for i in fit_idx])
            dense = self.dense.scores([e.context for e in val]).astype(np.float64)
            cf = self.cf_scores([e.mentioned for e in val])
            excl = self.catalog.exclude_indices([set(e.mentioned) for e in val], len(val))
            labels = [{self.catalog.index[x] for x in e.labels if x in self.catalog.index} for e in val]
            best, table = None, []
            for w_cf in HYBRID_GRID_CF:
                for w_pop in HYBRID_GRID_POP:
                    scores = dense + w_cf * cf + w_pop * self._pop[None, :]
                    for r, idx in enumerate(excl):
                        if idx:
                            scores[r, idx] = -np.inf
                    top = np.argsort(-scores, axis=1)[:, :10]
                    r10 = float(np.mean([len(set(t.tolist()) & lab) / len(lab) for t, lab in zip(top, labels)]))
                    table.append({"w_cf": w_cf, "w_pop": w_pop, "recall@10": round(r10, 4)})
                    if best is None or r10 > best[0] + 1e-12:
                        best = (r10, w_cf, w_pop)
            self.weights = (best[1], best[2])
            self.fit_report = {"validation_turns": len(val), "fit_turns": len(fit_idx),
                               "best_recall@10": round(best[0], 4), "grid": table}
        self._pop = self._popularity(examples)
        self.name = f"hybrid(cf={self.weights[0]:g},pop={self.weights[1]:g})-{self.dense.name}"

    def recommend(self, contexts: list[list[str]], k: int,
                  exclude: list[set[str]] | None = None,
                  candidates: Iterable[str] | None = None) -> list[list[str]]:
        if not contexts:
            return []
        if self._pop is None or self.weights is None:
            raise RecommenderError(f"{self.name} is not fitted; call fit(train) first")
        mentioned = exclude if exclude is not None else [set() for _ in contexts]
        w_cf, w_pop = self.weights
        scores = self.dense.scores(contexts).astype(np.float64) + w_pop * self._pop[None, :]
        if w_cf:
            scores = scores + w_cf * self.cf_scores(mentioned)
        excl = self.catalog.exclude_indices(exclude, len(contexts))
        return _top_k(scores, k, excl, self.catalog.item_ids, self.catalog.candidate_mask(candidates))


# ----------------------------------------------------------------------------- factory

@dataclass(frozen=True)
class RecommenderKind:
    """A recommender the CLI's `eval --model` and the Evaluation page can build by name."""

    name: str
    label: str
    build: Callable[..., Recommender]   # build(ws, **kwargs) -> an unfitted Recommender
    fits_on_dialogues: bool = False     # fit() on a training set (synthetic or a train split) before use


RECOMMENDERS: dict[str, RecommenderKind] = {}


def register_recommender(entry: RecommenderKind) -> RecommenderKind:
    RECOMMENDERS[entry.name] = entry
    return entry


for _entry in (
    RecommenderKind("popularity", "Popularity (interactions: distinct users per item)",
                    lambda ws, **kw: Popularity(ws, source="interactions", **kw)),
    RecommenderKind("popularity-labels", "Popularity (training-label frequency)",
                    lambda ws, **kw: Popularity(ws, source="labels", **kw), fits_on_dialogues=True),
    RecommenderKind("nbcrs", "NBCRS: similarity-weighted votes of the nearest training contexts",
                    lambda ws, **kw: NBCRS(ws, **kw), fits_on_dialogues=True),
    RecommenderKind("dense", "Zero-shot dense retrieval (MiniLM, context vs item text)",
                    lambda ws, **kw: DenseRetrieval(ws, **kw)),
    RecommenderKind("hybrid", "Hybrid: dense score + MovieLens item-item similarity to mentioned items + label "
                    "popularity", lambda ws, **kw: Hybrid(ws, **kw), fits_on_dialogues=True),
):
    register_recommender(_entry)


def recommender_labels() -> dict[str, str]:
    return {name: entry.label for name, entry in RECOMMENDERS.items()}


def make_recommender(kind: str, ws: "Workspace | None" = None, **kwargs: Any) -> Recommender:
    """Build a recommender by kind name (see RECOMMENDERS)."""
    try:
        entry = RECOMMENDERS[kind]
    except KeyError:
        raise RecommenderError(f"unknown recommender {kind!r}; choose from {', '.join(RECOMMENDERS)}") from None
    return entry.build(ws, **kwargs)
