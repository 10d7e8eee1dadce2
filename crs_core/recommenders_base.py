"""What every recommender shares: the interface and training sets, the dialogue query text, the
catalogue with its exclusions, and the encoders (the project's MiniLM, fine-tuned retrievers
through the one loader `load_retriever`, item embeddings cached per model). Used through
`crs_core.recommenders`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from .catalog import item_text
from .errors import CRSError
from .llm_output import json_list
from .progress import ProgressFn, report


if TYPE_CHECKING:  # pragma: no cover
    from .store import Workspace


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
