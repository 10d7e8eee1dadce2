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

import hashlib
import math
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import numpy as np

from .catalog import item_text
from .errors import CRSError
from .llm_output import json_list
from .progress import ProgressFn, report

if TYPE_CHECKING:  # pragma: no cover
    from .store import Workspace

__all__ = [
    "Recommender",
    "RecommenderError",
    "TrainingExample",
    "TrainingSet",
    "Catalog",
    "Popularity",
    "NBCRS",
    "DenseRetrieval",
    "Hybrid",
    "RetrieverEncoder",
    "load_retriever",
    "dialogue_query",
    "training_set_from_synthetic",
    "training_set_from_turns",
    "context_text",
    "item_embeddings",
    "embed_cached",
    "default_encoder",
    "make_recommender",
    "RecommenderKind",
    "RECOMMENDERS",
    "register_recommender",
    "recommender_labels",
]

CONTEXT_TURNS = 3
CONTEXT_MAX_CHARS = 1000


class RecommenderError(CRSError):
    """A recommender cannot run as asked (not fitted, empty training set, no catalog, ...)."""


# ----------------------------------------------------------------------------- interface


@runtime_checkable
class Recommender(Protocol):
    """What `evaluate` and the app need from a recommender (generative ones included).

    `recommend` gets a batch of contexts and returns, per context, up to k catalog item ids,
    best first, none of them in that context's `exclude` set. It may also accept a keyword
    `candidates` (a set of item ids to rank within); `evaluate` passes it when it does.
    """

    name: str

    def fit(self, train: "TrainingSet") -> None: ...

    def recommend(self, contexts: list[list[str]], k: int,
                  exclude: list[set[str]] | None = None) -> list[list[str]]: ...


@dataclass(frozen=True)
class TrainingExample:
    context: list[str]      # utterances, oldest first (a synthetic query is one utterance)
    labels: list[str]       # ground-truth catalog item ids, best first
    example_id: str = ""    # query_id or turn_id
    mentioned: tuple[str, ...] = ()  # items mentioned earlier in the dialogue (dialogue turns)


@dataclass
class TrainingSet:
    """(context utterances, ground-truth item ids) pairs, with where they came from."""

    examples: list[TrainingExample] = field(default_factory=list)
    name: str = ""
    n_dropped: int = 0      # candidates left out because they had no usable label

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):
        return iter(self.examples)

    def __getitem__(self, i: int) -> TrainingExample:
        return self.examples[i]

    @property
    def contexts(self) -> list[list[str]]:
        return [e.context for e in self.examples]

    @property
    def labels(self) -> list[list[str]]:
        return [e.labels for e in self.examples]

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str | Sequence[str], Sequence[str]]],
                   name: str = "") -> "TrainingSet":
        """Build from (context, labels) pairs; a context may be a single string."""
        out = []
        for i, (ctx, labels) in enumerate(pairs):
            ctx_list = [ctx] if isinstance(ctx, str) else [str(u) for u in ctx]
            out.append(TrainingExample(ctx_list, [str(x) for x in labels], str(i)))
        return cls(out, name=name)

    @classmethod
    def coerce(cls, train: Any) -> "TrainingSet":
        if train is None:
            return cls()
        if isinstance(train, TrainingSet):
            return train
        items = list(train)
        if items and isinstance(items[0], TrainingExample):
            return cls(items)
        return cls.from_pairs(items)




def training_set_from_synthetic(ws: "Workspace", statuses: Sequence[str] = ("approved",),
                                selection_id: str | None = None) -> TrainingSet:
    """Synthetic queries with the given review statuses: context = [query], labels = the
    query's ground-truth items that are matched to the catalog and not flagged, in rank order.
    Queries left without labels are dropped (counted in `n_dropped`)."""
    if not statuses:
        raise RecommenderError("no review status selected for the training set")
    params: list[Any] = list(statuses)
    where = f"q.status IN ({', '.join('?' * len(statuses))})"
    if selection_id is not None:
        where += " AND q.selection_id = ?"
        params.append(selection_id)
    df = ws.df(
        "SELECT q.query_id, q.query, g.rank, g.item_id FROM synthetic_queries q "
        "LEFT JOIN ground_truth g ON g.query_id = q.query_id AND NOT g.flagged "
        "  AND g.item_id IN (SELECT item_id FROM items) "
        f"WHERE {where} ORDER BY q.created_at, q.query_id, g.rank",
        params,
    )
    examples: list[TrainingExample] = []
    dropped = 0
    for qid, group in df.groupby("query_id", sort=False):
        labels = [str(x) for x in dict.fromkeys(group["item_id"].dropna())]
        query = str(group["query"].iloc[0] or "").strip()
        if not labels or not query:
            dropped += 1
            continue
        examples.append(TrainingExample([query], labels, str(qid)))
    return TrainingSet(examples, name=f"synthetic[{','.join(statuses)}]", n_dropped=dropped)


def training_set_from_turns(ws: "Workspace", dataset: str, *,
                            exclude_mentioned: bool = True) -> TrainingSet:
    """Recommendation turns of a dialogue dataset: context = the turn's context, labels =
    rec_items (without items mentioned earlier, as in evaluation; turns left empty dropped)."""
    df = ws.df(
        "SELECT turn_id, context, rec_items, mentioned_items FROM dialogue_turns "
        "WHERE dataset = ? ORDER BY dialog_id, turn_id",
        [dataset],
    )
    if df.empty:
        raise RecommenderError(f"dataset {dataset!r} has no dialogue turns in the workspace")
    examples: list[TrainingExample] = []
    dropped = 0
    for row in df.itertuples(index=False):
        mentioned = {str(x) for x in json_list(row.mentioned_items)} if exclude_mentioned else set()
        labels = [str(x) for x in dict.fromkeys(json_list(row.rec_items)) if str(x) not in mentioned]
        if not labels:
            dropped += 1
            continue
        ctx = [str(u) if u is not None else "" for u in json_list(row.context)]
        examples.append(TrainingExample(ctx, labels, str(row.turn_id),
                                        tuple(str(x) for x in json_list(row.mentioned_items))))
    return TrainingSet(examples, name=dataset, n_dropped=dropped)


# ----------------------------------------------------------------------------- texts


def context_text(context: str | Sequence[str], turns: int = CONTEXT_TURNS,
                 max_chars: int = CONTEXT_MAX_CHARS) -> str:
    """The text embedded for a dialogue context: last `turns` non-empty utterances, joined,
    keeping the last `max_chars` characters (cut at a word boundary)."""
    if isinstance(context, str):
        context = [context]
    utts = [" ".join(str(u).split()) for u in context if u is not None and str(u).strip()]
    if turns and turns > 0:
        utts = utts[-turns:]
    text = " ".join(utts)
    if max_chars and len(text) > max_chars:
        text = text[-max_chars:]
        cut = text.find(" ")
        if 0 <= cut < 40:
            text = text[cut + 1 :]
    return text


QUERY_SPEAKERS = ("all", "seeker")


def dialogue_query(context: str | Sequence[str], turns: int | None = CONTEXT_TURNS,
                   speaker: str = "all", max_chars: int | None = CONTEXT_MAX_CHARS) -> str:
    """The query text of a dialogue context for a dense retriever, the ONE function that both
    training (`crs_core.train.train_retriever`) and every consumer of a trained retriever
    (`RetrieverEncoder.query_text`) call, with the settings saved in the model's crs_model.json.

    `speaker="seeker"` keeps the seeker's utterances only: in a recommendation turn's context
    the last utterance is the seeker's and speakers alternate (consecutive utterances of one
    speaker are merged at ingest), so those are the utterances at -1, -3, -5, ...; `turns`
    then counts the seeker's utterances. `turns=None` (or 0) keeps every utterance. The text is
    `context_text` of the kept utterances (joined by spaces, the last `max_chars` characters)."""
    if isinstance(context, str):
        context = [context]
    if speaker not in QUERY_SPEAKERS:
        raise RecommenderError(f"query speaker must be one of {QUERY_SPEAKERS}, got {speaker!r}")
    utts = [str(u) for u in context if u is not None and str(u).strip()]
    if speaker == "seeker":
        utts = utts[::-1][0::2][::-1]
    return context_text(utts, turns or 0, max_chars or 0)


# ----------------------------------------------------------------------------- catalog


class Catalog:
    """The workspace's items in a fixed order, with their texts and interaction counts."""

    def __init__(self, item_ids: Sequence[str], texts: Sequence[str] | None = None,
                 interaction_counts: Sequence[float] | None = None):
        self.item_ids = np.asarray([str(i) for i in item_ids], dtype=object)
        if len(set(self.item_ids)) != len(self.item_ids):
            raise RecommenderError("the catalog has duplicate item ids")
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        self.texts = list(texts) if texts is not None else [str(i) for i in self.item_ids]
        counts = np.zeros(len(self.item_ids)) if interaction_counts is None else np.asarray(
            interaction_counts, dtype=np.float64)
        if len(counts) != len(self.item_ids) or len(self.texts) != len(self.item_ids):
            raise RecommenderError("catalog texts / counts do not match the item ids")
        self.interaction_counts = counts

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def from_workspace(cls, ws: "Workspace") -> "Catalog":
        items = ws.df(
            "SELECT item_id, title, year, genres, plot, directors, cast_names FROM items "
            "ORDER BY item_id"
        )
        if items.empty:
            raise RecommenderError("the workspace has no items; import a catalog first")
        counts = ws.df(
            "SELECT item_id, count(DISTINCT user_id) AS n FROM interactions GROUP BY item_id"
        )
        n = dict(zip(counts["item_id"].astype(str), counts["n"].astype(float)))
        texts = [item_text(r) for r in items.to_dict("records")]
        ids = items["item_id"].astype(str).tolist()
        return cls(ids, texts, [n.get(i, 0.0) for i in ids])

    def subset(self, item_ids: Iterable[str]) -> "Catalog":
        """The catalog restricted to `item_ids` (unknown ids ignored), in catalog order."""
        keep = self.candidate_mask(item_ids)
        idx = np.flatnonzero(keep)
        if not len(idx):
            raise RecommenderError("none of the given item ids is in the catalog")
        return Catalog(self.item_ids[idx].tolist(), [self.texts[i] for i in idx],
                       self.interaction_counts[idx])

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for item, text in zip(self.item_ids, self.texts):
            h.update(item.encode())
            h.update(b"\0")
            h.update(text.encode())
            h.update(b"\1")
        return h.hexdigest()

    def candidate_mask(self, candidates: Iterable[str] | None) -> np.ndarray | None:
        """Boolean mask over the catalog (None: every item is a candidate)."""
        if candidates is None:
            return None
        mask = np.zeros(len(self.item_ids), dtype=bool)
        idx = [self.index[i] for i in candidates if i in self.index]
        mask[idx] = True
        return mask

    def exclude_indices(self, exclude: list[set[str]] | None, n_rows: int) -> list[list[int]]:
        if exclude is None:
            return [[] for _ in range(n_rows)]
        if len(exclude) != n_rows:
            raise RecommenderError(f"exclude has {len(exclude)} sets for {n_rows} contexts")
        out = []
        for ex in exclude:
            out.append([self.index[i] for i in (ex or ()) if i in self.index])
        return out


def _resolve_catalog(ws: "Workspace | None", catalog: Catalog | None) -> Catalog:
    if catalog is not None:
        return catalog
    if ws is None:
        raise RecommenderError("a recommender needs a workspace or a Catalog")
    return Catalog.from_workspace(ws)


def _top_k(scores: np.ndarray, k: int, exclude_idx: list[list[int]],
           item_ids: np.ndarray, mask: np.ndarray | None = None) -> list[list[str]]:
    """Top-k item ids per row of a (B, N) score matrix; excluded items (and items outside
    `mask`) never appear. Ties are broken by catalog position, so results are deterministic.
    """
    n_rows, n_items = scores.shape
    scores = scores.astype(np.float64, copy=True)
    if mask is not None:
        scores[:, ~mask] = -np.inf
    for r, idx in enumerate(exclude_idx):
        if idx:
            scores[r, idx] = -np.inf
    k_eff = min(k, n_items)
    if k_eff <= 0:
        return [[] for _ in range(n_rows)]
    if k_eff < n_items:
        part = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
    else:
        part = np.tile(np.arange(n_items), (n_rows, 1))
    part_scores = np.take_along_axis(scores, part, axis=1)
    # sort by score desc, then by catalog position asc
    order = np.lexsort((part, -part_scores), axis=1)
    top = np.take_along_axis(part, order, axis=1)
    top_scores = np.take_along_axis(part_scores, order, axis=1)
    out = []
    for r in range(n_rows):
        valid = np.isfinite(top_scores[r])
        out.append(item_ids[top[r][valid]].tolist())
    return out


# ----------------------------------------------------------------------------- encoders


DEFAULT_ENCODER = "minilm"


def default_encoder(name: str = DEFAULT_ENCODER) -> Any:
    """A project encoder by name (`crs_core.embed.get_encoder`, shared per process). The
    default "minilm" is the app's (int8) MiniLM, whose vectors the workspace cache holds;
    "minilm-fp32" gives the exact sentence-transformers vectors."""
    from .embed import get_encoder

    return get_encoder(name)


class RetrieverEncoder:
    """A bi-encoder fine-tuned by `crs_core.train.train_retriever` (a job's ``model/`` folder).

    Encodes as in training: mean pooling over the last hidden state, L2-normalised; item texts
    cut from the right at ``item_max_len`` tokens, queries (`encode_queries`) cut from the LEFT
    at ``query_max_len`` (the latest turns are kept), both read from the folder's
    crs_model.json. `name` is "retriever-" + a digest of the weights file, so the workspace
    embedding cache keeps item vectors per fine-tuned model and never mixes two models.
    """

    def __init__(self, model_dir: str | os.PathLike, *, batch_size: int = 32):
        import json
        from pathlib import Path

        folder = Path(model_dir)
        weights = [f for f in (folder / "model.safetensors", folder / "pytorch_model.bin") if f.is_file()]
        if not folder.is_dir() or not (folder / "config.json").is_file() or not weights:
            raise RecommenderError(
                f"{folder} is not a trained retriever folder (config.json and model weights expected); "
                "give the model/ folder of a finished train_retriever job"
            )
        info_file = folder / "crs_model.json"
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        if info.get("type") not in (None, "dense_retriever"):
            raise RecommenderError(f"{folder} holds a {info['type']!r} model, not a dense retriever")
        h = hashlib.sha1()
        with open(weights[0], "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        self.model_dir = folder
        self.name = f"retriever-{h.hexdigest()[:12]}"
        self.info = info
        self.query_max_len = int(info.get("query_max_len", 128))
        self.item_max_len = int(info.get("item_max_len", 128))
        self.query_truncation = str(info.get("query_truncation", "left"))
        # the query text as in training (crs_model.json); a folder from before these keys were
        # saved was trained on the whole context, cut from the left by the tokenizer
        self.query_turns = info.get("query_turns")
        self.query_speaker = str(info.get("query_speaker", "all"))
        self.query_max_chars = info.get("query_max_chars")
        self.batch_size = batch_size
        self._model = None
        self._tok = None
        self._lock = threading.Lock()
        from transformers import AutoConfig

        self.dim = int(AutoConfig.from_pretrained(str(folder)).hidden_size)

    def _load(self):
        if self._model is None:
            with self._lock:
                if self._model is None:
                    import torch
                    from transformers import AutoModel, AutoTokenizer

                    from .models import offline_env

                    offline_env()
                    self._tok = AutoTokenizer.from_pretrained(str(self.model_dir))
                    self._model = AutoModel.from_pretrained(str(self.model_dir), dtype=torch.float32).eval()
        return self._model, self._tok

    def _encode_side(self, texts: Sequence[str], max_len: int, side: str,
                     progress: ProgressFn | None = None, batch_size: int | None = None) -> np.ndarray:
        import torch

        model, tok = self._load()
        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), self.dim), np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # little padding per batch
        bs = max(1, int(batch_size or self.batch_size))
        report(progress, 0, len(texts))
        with self._lock, torch.inference_mode():
            tok.truncation_side = side
            for s in range(0, len(order), bs):
                idx = order[s : s + bs]
                enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len,
                          return_tensors="pt")
                hidden = model(**enc).last_hidden_state.float()
                m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
                report(progress, min(s + bs, len(texts)), len(texts))
        return out

    def encode(self, texts: Sequence[str], batch_size: int | None = None,
               progress: ProgressFn | None = None) -> np.ndarray:
        """Item (document) side."""
        return self._encode_side(texts, self.item_max_len, "right", progress, batch_size)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Query side: texts from `query_text`, cut at ``query_max_len`` tokens on the side
        the model was trained with (left: the latest words are kept)."""
        return self._encode_side(texts, self.query_max_len, self.query_truncation)

    def query_text(self, context: str | Sequence[str]) -> str:
        """The query text of a dialogue context, built exactly as in training."""
        return dialogue_query(context, self.query_turns, self.query_speaker, self.query_max_chars)


def load_retriever(model_dir: str | os.PathLike) -> RetrieverEncoder:
    """THE loader of a trained dense retriever for every consumer (CLI `eval`, the Evaluation
    page, jobs, benches): the query text, truncation side and lengths come from the model's
    crs_model.json, so a model scores the same wherever it is loaded. (Loading the folder as a
    plain ``SentenceTransformer`` would cut queries on the right at 256 tokens and embed a
    different query text than training did.)"""
    return RetrieverEncoder(model_dir)


def _encoder_name(encoder: Any) -> str:
    return str(getattr(encoder, "name", None) or getattr(encoder, "model_name", None)
               or type(encoder).__name__)


def _encode(encoder: Any, texts: Sequence[str]) -> np.ndarray:
    return _normalise(np.asarray(encoder.encode(list(texts)), dtype=np.float32), len(texts))


def _normalise(vecs: np.ndarray, n: int | None = None) -> np.ndarray:
    if vecs.ndim != 2 or (n is not None and len(vecs) != n):
        raise RecommenderError(f"encoder returned shape {vecs.shape} for {n} texts")
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs / np.maximum(norms, 1e-12)


def _encode_chunked(encoder: Any, texts: Sequence[str], progress: ProgressFn | None = None,
                    step: int = 1024) -> np.ndarray:
    chunks = []
    report(progress, 0, len(texts))
    for start in range(0, len(texts), step):
        chunks.append(_encode(encoder, texts[start : start + step]))
        report(progress, min(start + step, len(texts)), len(texts))
    if not chunks:
        return np.zeros((0, int(getattr(encoder, "dim", 384))), np.float32)
    return np.vstack(chunks)


def _read_only_cached(ws: "Workspace", encoder: Any, texts: Sequence[str],
                      progress: ProgressFn | None) -> np.ndarray:
    from .embed import text_hash
    from .store import blobs_to_vectors

    hashes = [text_hash(t) for t in texts]
    frame = ws.df(
        "SELECT text_hash, vector FROM embedding_cache WHERE model = ? "
        "AND text_hash IN (SELECT unnest(?::VARCHAR[]))",
        [_encoder_name(encoder), list(set(hashes))],
    )
    found: dict[str, np.ndarray] = {}
    if not frame.empty:
        blobs = [bytes(b) for b in frame["vector"]]
        found = dict(zip(frame["text_hash"], blobs_to_vectors(blobs, len(blobs[0]) // 4)))
    missing = [i for i, h in enumerate(hashes) if h not in found]
    if not found:
        return _encode_chunked(encoder, texts, progress)
    dim = len(next(iter(found.values())))
    out = np.zeros((len(texts), dim), np.float32)
    for i, h in enumerate(hashes):
        if h in found:
            out[i] = found[h]
    if missing:
        out[missing] = _encode_chunked(encoder, [texts[i] for i in missing], progress)
    return out


def embed_cached(ws: "Workspace | None", encoder: Any, texts: Sequence[str],
                 progress: ProgressFn | None = None) -> np.ndarray:
    """L2-normalised vectors of `texts`, through the workspace embedding cache when possible
    (writable workspace: `crs_core.embed.embed_texts`; read-only: cached vectors are read and
    the rest encoded in memory; no workspace: encoded in memory)."""
    if ws is not None and not ws.read_only and hasattr(encoder, "dim"):
        from .embed import embed_texts

        matrix = np.asarray(embed_texts(ws, encoder, list(texts), progress), dtype=np.float32)
    elif ws is not None:
        matrix = _read_only_cached(ws, encoder, texts, progress)
    else:
        matrix = _encode_chunked(encoder, texts, progress)
    matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(matrix, dtype=np.float32)


# item matrices per (encoder, catalog fingerprint), shared inside the process
_ITEM_CACHE: dict[tuple[str, str], np.ndarray] = {}
_ITEM_CACHE_LOCK = threading.Lock()


def item_embeddings(catalog: Catalog, encoder: Any, ws: "Workspace | None" = None,
                    progress: ProgressFn | None = None) -> np.ndarray:
    """(N, dim) L2-normalised item-text embeddings, cached per encoder and catalog content.

    With a writable workspace the vectors go through `crs_core.embed.embed_texts`, i.e. the
    workspace's embedding cache (computed once per workspace, ~12k items take minutes on 2 CPUs);
    otherwise they are encoded here and kept in memory for this process.
    """
    key = (_encoder_name(encoder), catalog.fingerprint())
    with _ITEM_CACHE_LOCK:
        cached = _ITEM_CACHE.get(key)
    if cached is not None:
        return cached
    matrix = embed_cached(ws, encoder, catalog.texts, progress)
    with _ITEM_CACHE_LOCK:
        if len(_ITEM_CACHE) > 8:
            _ITEM_CACHE.clear()
        _ITEM_CACHE[key] = matrix
    return matrix


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
