"""What synthesis works with before the run: its constants and errors, reviews cleaned of HTML and
cut to length, the grounding of listed titles in the catalogue, and dense retrieval over the
catalogue's item texts (the shared TextEncoder, blended with co-occurrence). Used through
`crs_core.synth`.
"""

from __future__ import annotations

import html
import math
import re
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .llm_output import description_cut
from .prompts import CHOICE_PROMPT, N_GROUND_TRUTH, QUERY_PROMPT, QUERY_SYSTEM, RECS_PROMPT, RELEVANCE_PROMPT
from .catalog import display_title, item_text
from .embed import TextEncoder
from .errors import CRSError
from .titles import TitleMatcher, normalize_title, parse_title



GT_MODES = ("choose", "llm", "retrieve", "retrieve+llm")
DEFAULT_GT_MODE = "choose"
N_CHOICE_CANDIDATES = 35  # choose: candidates offered (about 10 prompt tokens each)
CHOICE_MAX_TOKENS = 160
CHOICE_TEMPERATURE = 0.2  # choosing is judging, not writing
N_REVIEWS = 3
N_CANDIDATES = 50  # retrieve+llm
MAX_REVIEW_CHARS = 900  # ~200 tokens: 3 reviews cost ~15 s of prompt processing on the local teacher
QUERY_MAX_TOKENS = 128
RECS_MAX_TOKENS = 512
DUPLICATE_COSINE = 0.95
DEFAULT_COOC_WEIGHT = 0.2
DEFAULT_RELEVANCE_THRESHOLD = 3.0
DEFAULT_SCORE_BATCH = 10
MAX_CONSECUTIVE_FAILURES = 3


# ==============================================================================================
# errors
# ==============================================================================================
class SynthesisError(CRSError):
    """Synthesis cannot run as asked (bad mode, empty selection, ...)."""


class SelectionNotFound(SynthesisError):
    """The selection id is not in the workspace."""


class SynthesisBudgetError(SynthesisError):
    """The budget allows no teacher call at all, so nothing is synthesized."""


# ==============================================================================================
# reviews: HTML to text, truncation, delimiters
# ==============================================================================================
_BR = re.compile(r"<\s*br\s*/?\s*>", re.I)
_BLOCK_END = re.compile(r"<\s*/\s*(?:p|div|li|h[1-6]|blockquote|tr)\s*>", re.I)
_TAG = re.compile(r"<\s*/?\s*[a-zA-Z][a-zA-Z0-9:-]*(?:\s[^<>]*)?/?\s*>")
_REVIEW_TAG = re.compile(r"<\s*/?\s*review\b[^>]*>?", re.I)
_SENTENCE_END = re.compile(r"[.!?…][\"')\]]*(?=\s|$)")


def clean_review(text: Any, max_chars: int = MAX_REVIEW_CHARS) -> tuple[str, bool]:
    """(plain text, truncated?) for one review.

    ``<br />`` becomes a newline and closing block tags a paragraph break; other tags are
    stripped; entities are unescaped (after stripping, so ``&lt;b&gt;`` stays visible text);
    anything that looks like our ``<review>`` delimiter is removed; whitespace is tidied.
    Longer texts are cut at the last sentence end before ``max_chars`` (or the last space)
    and marked with " [...]".
    """
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return "", False
    s = str(text)
    s = _BR.sub("\n", s)
    s = _BLOCK_END.sub("\n\n", s)
    s = _TAG.sub("", s)
    s = html.unescape(html.unescape(s)) if "&amp;" in s else html.unescape(s)
    s = _REVIEW_TAG.sub("", s)
    s = s.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    s = re.sub(r"[ \t\f\v]+", " ", s)
    s = re.sub(r" *\n *", "\n", s)
    s = re.sub(r"\n{3,}", "\n\n", s).strip()
    if max_chars and len(s) > max_chars:
        head = s[:max_chars]
        ends = [m.end() for m in _SENTENCE_END.finditer(head)]
        cut = ends[-1] if ends and ends[-1] >= max_chars // 2 else None
        if cut is None:
            space = head.rfind(" ")
            cut = space if space >= max_chars // 2 else max_chars
        return head[:cut].rstrip() + " [...]", True
    return s, False


def format_sample_queries(templates: Sequence[str]) -> str:
    return "".join(f'\n- "{t}"' for t in templates)


def format_reviews(texts: Sequence[str]) -> str:
    return "\n" + "\n".join(f'<review id="{i}">\n{t}\n</review>' for i, t in enumerate(texts, 1)) + "\n"


def build_query_messages(templates: Sequence[str], reviews: Sequence[str]) -> list[dict[str, str]]:
    """The query call: our system message + the paper's query prompt (reviews delimited)."""
    user = (QUERY_PROMPT
            .replace("{sample_queries_text}", format_sample_queries(templates))
            .replace("{product_reviews_text}", format_reviews(reviews)))
    return [{"role": "system", "content": QUERY_SYSTEM}, {"role": "user", "content": user}]


_RETRY_HINTS = (  # (words of a refusal reason, what the teacher is told)
    ("names the seed film", "Do not name the film ({title}) or its characters: describe the kind of film you want."),
    ("copies a style template", "Do not copy the sample queries: they only show the style. Ask for what these "
                                "reviewers liked."),
    ("assistant", "Write as the user who asks for a film, not as the assistant who answers."),
    ("talks about the reviews", "Do not talk about the reviews: write the request the user would type."),
    ("asks about the reviewed film", "Do not ask about the reviewed film: ask for a film to watch that has what "
                                     "the reviewers liked."),
    ("copies a review", "Do not copy the reviews: write the request the user would type."),
    ("echoes", "Do not repeat these instructions: write the request the user would type."),
)


def retry_messages(reply: str | None, reason: str | None, title: str) -> list[dict[str, str]]:
    """What a refused query reply is followed by: the reply, then why it was refused and the
    request again (the system prompt and the reviews stay as they were)."""
    hint = next((h for key, h in _RETRY_HINTS if key in str(reason or "")),
                "Reply with the user's request only, in one or two sentences.")
    out = []
    if reply and str(reply).strip():
        out.append({"role": "assistant", "content": str(reply)[:1000]})
    out.append({"role": "user", "content": "That is not usable. " + hint.replace("{title}", f'"{title}"')
                + " Write one new request."})
    return out


def build_recs_messages(query: str) -> list[dict[str, str]]:
    """The ground-truth call: the paper's recommendations prompt; the conversation is the query."""
    return [{"role": "user", "content": RECS_PROMPT.replace("{conv}", f"User: {query}")}]


def build_choice_messages(query: str, candidates: Sequence[str], k: int = 20) -> list[dict[str, str]]:
    """The choose call: numbered candidates "n. Title (Year)"; the answer is numbers."""
    listing = "\n".join(f"{i}. {t}" for i, t in enumerate(candidates, 1))
    text = (CHOICE_PROMPT.replace("{k}", str(min(k, len(candidates)))).replace("{conv}", f"User: {query}")
            .replace("{candidates}", listing))
    return [{"role": "user", "content": text}]


def build_relevance_messages(query: str, candidates: Sequence[str]) -> list[dict[str, str]]:
    rec = "\n".join(f"{i}. {t}" for i, t in enumerate(candidates, 1))
    text = RELEVANCE_PROMPT.replace("{context}", f"User: {query}").replace("{rec}", rec)
    return [{"role": "user", "content": text}]


# ==============================================================================================
# grounding
# ==============================================================================================
@dataclass(frozen=True)
class GroundedTitle:
    rank: int
    title_raw: str
    item_id: str | None
    match_score: float | None
    flagged: bool
    note: str


def ground_titles(titles: Sequence[str], matcher: TitleMatcher, limit: int = N_GROUND_TRUTH) -> tuple[list[GroundedTitle], dict[str, Any]]:
    """Match listed titles to catalog items (in order), drop duplicates after grounding, keep at
    most ``limit``. Unmatched titles become flagged rows (no item). Returns (rows, stats)."""
    rows: list[GroundedTitle] = []
    seen_items: set[str] = set()
    seen_unmatched: set[str] = set()
    duplicates = 0
    for t in titles:
        hit = matcher.match(t)
        if hit is None:
            cut = description_cut(t)
            if cut:
                hit = matcher.match(cut)
        if hit is not None:
            if hit.item_id in seen_items:
                duplicates += 1
                continue
            seen_items.add(hit.item_id)
            note = f"{hit.method} match: {display_title(hit.matched_title, hit.matched_year)}"
            rows.append(GroundedTitle(0, t, hit.item_id, round(float(hit.score), 4), False, note))
        else:
            name, year = parse_title(t)
            key = f"{normalize_title(name or t)}|{year}"
            if key in seen_unmatched:
                duplicates += 1
                continue
            seen_unmatched.add(key)
            rows.append(GroundedTitle(0, t, None, None, True, "hallucinated: no catalog match"))
        if len(rows) >= limit:
            break
    rows = [GroundedTitle(i, r.title_raw, r.item_id, r.match_score, r.flagged, r.note) for i, r in enumerate(rows, 1)]
    matched = sum(1 for r in rows if r.item_id is not None)
    stats = {
        "listed": len(titles), "kept": len(rows), "matched": matched, "hallucinated": len(rows) - matched,
        "duplicates_removed": duplicates, "grounding_rate": (matched / len(rows)) if rows else 0.0,
    }
    return rows, stats


# ==============================================================================================
# catalogue retrieval: the shared encoder (crs_core.embed.TextEncoder) over item texts
# ==============================================================================================
_ITEM_MATRIX_CACHE: dict[tuple, np.ndarray] = {}
_ITEM_MATRIX_LOCK = threading.Lock()


class CatalogRetriever:
    """Dense retrieval over the catalog's item texts, blended with co-occurrence in interactions."""

    def __init__(self, ws: Any, items: pd.DataFrame, embedder: TextEncoder, cooc_weight: float = DEFAULT_COOC_WEIGHT,
                 *, matrix: np.ndarray | None = None):
        """ws None (a worker away from the workspace): give the item ``matrix`` and the seed items'
        co-occurrence (``remember_cooc``) computed where the workspace is."""
        if not 0.0 <= cooc_weight <= 1.0:
            raise SynthesisError(f"cooc_weight must be in [0, 1], got {cooc_weight}")
        self.ws = ws
        self.items = items.reset_index(drop=True)
        self.ids = self.items["item_id"].astype(str).to_numpy()
        self.pos = {iid: i for i, iid in enumerate(self.ids)}
        self.embed = embedder
        self.cooc_weight = float(cooc_weight)
        self._cooc: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        embedder.ensure()
        if matrix is not None:
            self.matrix = np.asarray(matrix, dtype=np.float32)
            return
        texts = [item_text(r) for r in self.items.to_dict("records")]
        key = (str(getattr(ws, "path", id(ws))), embedder.name, id(embedder.encoder), len(texts), hash(tuple(texts)))
        with _ITEM_MATRIX_LOCK:
            mat = _ITEM_MATRIX_CACHE.get(key)
        if mat is None:
            mat = embedder(texts)
            embedder.forget(texts)  # the matrix keeps them; the memo is for queries
            with _ITEM_MATRIX_LOCK:
                if len(_ITEM_MATRIX_CACHE) > 4:
                    _ITEM_MATRIX_CACHE.clear()
                _ITEM_MATRIX_CACHE[key] = mat
        self.matrix = mat

    def remember_cooc(self, vectors: dict[str, np.ndarray]) -> None:
        with self._lock:
            self._cooc.update(vectors)

    def cooc(self, seed_item: str) -> np.ndarray:
        """Co-occurrence of every catalog item with the seed item, scaled to [0, 1]."""
        with self._lock:
            if seed_item in self._cooc:
                return self._cooc[seed_item]
        if self.ws is None:
            raise SynthesisError(f"no co-occurrence of item {seed_item} was given to this worker")
        vec = np.zeros(len(self.ids), np.float32)
        df = self.ws.df(
            "WITH seed AS (SELECT DISTINCT user_id FROM interactions WHERE item_id = ?), "
            "pop AS (SELECT item_id, count(DISTINCT user_id) AS n FROM interactions GROUP BY item_id) "
            "SELECT i.item_id, count(DISTINCT i.user_id) AS both_n, "
            "  (SELECT n FROM pop WHERE pop.item_id = i.item_id) AS n_item, "
            "  (SELECT count(*) FROM seed) AS n_seed "
            "FROM interactions i JOIN seed s ON s.user_id = i.user_id WHERE i.item_id <> ? GROUP BY i.item_id",
            [seed_item, seed_item],
        )
        if len(df):
            cos = df["both_n"].to_numpy(float) / np.sqrt(df["n_item"].to_numpy(float) * df["n_seed"].to_numpy(float))
            if cos.max() > 0:
                cos = cos / cos.max()
            for iid, c in zip(df["item_id"].astype(str), cos):
                p = self.pos.get(iid)
                if p is not None:
                    vec[p] = c
        with self._lock:
            self._cooc[seed_item] = vec
        return vec

    def describe(self, item_id: str) -> dict[str, Any] | None:
        """One catalog item as ``search`` returns it (scores unknown: 0)."""
        p = self.pos.get(item_id)
        if p is None:
            return None
        row = self.items.iloc[int(p)]
        return {"item_id": item_id, "title": display_title(row["title"], row["year"]), "score": 0.0, "sim": 0.0,
                "cooc": None}

    def search(self, query: str, seed_item: str | None, n: int, exclude: Iterable[str] = ()) -> list[dict[str, Any]]:
        q = self.embed([query])[0]
        sim = self.matrix @ q
        score = sim.astype(np.float64)
        cooc = None
        if seed_item is not None and self.cooc_weight > 0:
            cooc = self.cooc(seed_item)
            if cooc.any():
                score = (1 - self.cooc_weight) * sim + self.cooc_weight * cooc
            else:
                cooc = None
        for iid in exclude:
            p = self.pos.get(iid)
            if p is not None:
                score[p] = -np.inf
        k = min(n, len(score))
        top = np.argpartition(-score, k - 1)[:k] if k < len(score) else np.arange(len(score))
        top = top[np.lexsort((top, -score[top]))]
        out = []
        for p in top:
            if not np.isfinite(score[p]):
                continue
            row = self.items.iloc[int(p)]
            out.append({
                "item_id": str(self.ids[p]), "title": display_title(row["title"], row["year"]),
                "score": round(float(score[p]), 5), "sim": round(float(sim[p]), 5),
                "cooc": None if cooc is None else round(float(cooc[p]), 5),
            })
        return out


def _query_names_item(query: str, title: str) -> bool:
    key = normalize_title(title)
    if len(key.replace(" ", "")) < 4:
        return False
    return f" {key} " in f" {normalize_title(query)} "
