"""Text embeddings behind one interface, cached per (model, text) in the workspace.

Encoders (``get_encoder(name)``):

- ``minilm`` (default): all-MiniLM-L6-v2 (384-d), exactly the sentence-transformers recipe
  (256-token truncation, attention-masked mean pooling, L2 normalisation), made fast on a
  small CPU: texts sorted by token length and batched with dynamic padding, batches run on
  one single-threaded worker per core (no OpenMP barriers, robust when the machine is
  shared), ``torch.inference_mode()``, and int8 dynamic quantisation of the Linear layers
  with SmoothQuant-style per-channel smoothing (calibrated once at load on fixed texts).
  The two FFN output projections of layers 0-1 stay fp32: they carry most of the int8 error.
  Cosine to the fp32 vectors on real IMDb reviews: mean ~0.997, min ~0.99 (see the bench).
  Note: dynamic quantisation scales activations per batch, so a text's vector can differ
  in the 3rd-4th decimal with its batch-mates; use ``minilm-fp32`` for exact vectors.
- ``minilm-fp32``: the same model without quantisation (same vectors as sentence-transformers).
- ``smollm2-mean``: the paper's option, the attention-masked mean of the last hidden state of
  the student LM SmolLM2-135M (576-d), L2-normalised (the model folder comes from
  ``models.student_model_dir``).

Caching: ``embed_texts`` hashes each text (sha1 of UTF-8), reads cached vectors, encodes only
the misses in chunks and commits each chunk before the next, so an interrupted run resumes
where it stopped. ``build_embedding_set`` turns a list of units into a named set.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import os
import threading
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from .errors import CRSError, WorkspaceError
from .models import minilm_path, offline_env, student_model_dir
from .progress import ProgressFn, report
from .store import Workspace

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "minilm"
ENCODERS = ("minilm", "minilm-fp32", "smollm2-mean")
CHUNK = 512  # distinct texts encoded (and committed to the cache) per step

# One heavy encode at a time per process: encodes share the same few cores, and the
# per-thread torch settings below are restored afterwards.
_ENCODE_LOCK = threading.Lock()


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


# ======================================================================================
# Encoders
# ======================================================================================
class Encoder:
    """A text encoder: ``encode(texts) -> float32 (n, dim)``, rows L2-normalised."""

    name: str = ""
    dim: int = 0

    def encode(
        self, texts: Sequence[str], batch_size: int = 32, progress: ProgressFn | None = None
    ) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


class _TransformerEncoder(Encoder):
    """Shared machinery: tokenise, sort by length, batch with dynamic padding, pool, normalise."""

    max_length: int = 256
    pad_id: int = 0
    equal_length_batches: bool = False
    batch_tokens: int = 256  # with equal_length_batches: tokens per batch (long texts go alone)

    def __init__(self, workers: int | None = None):
        self.workers = max(1, int(workers)) if workers else usable_cores()

    # -- to be provided by subclasses ------------------------------------------------------
    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _hidden(self, input_ids, attention_mask):  # -> (B, L, H) tensor
        raise NotImplementedError

    # -- common ------------------------------------------------------------------------------
    def _embed_batch(self, token_lists: list[list[int]]) -> np.ndarray:
        import torch

        lengths = [len(t) for t in token_lists]
        width = max(lengths)
        ids = torch.full((len(token_lists), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(token_lists), width), dtype=torch.long)
        for row, toks in enumerate(token_lists):
            ids[row, : len(toks)] = torch.as_tensor(toks, dtype=torch.long)
            mask[row, : len(toks)] = 1
        unpadded = min(lengths) == width
        with torch.inference_mode():
            # without padding no mask is needed (and attention takes its faster unmasked path)
            hidden = self._hidden(ids, None if unpadded else mask).float()
            if unpadded:
                pooled = hidden.mean(dim=1)
            else:
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.numpy().astype(np.float32, copy=False)

    def _batches(self, order: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
        """Batches over ``order`` (longest first). Padded batches of ``batch_size``, or, with
        ``equal_length_batches``, only texts of one token length together, up to
        ``batch_tokens`` tokens: no padding, so a text's computation never depends on which
        texts share its batch; long texts run alone (the int8 layers work text by text anyway,
        and a single text needs no re-assembly of the batch)."""
        if not self.equal_length_batches:
            return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        batches: list[list[int]] = []
        for i in order:
            last = batches[-1] if batches else None
            cap = min(batch_size, max(1, self.batch_tokens // max(1, lengths[i])))
            if last and len(last) < cap and lengths[last[0]] == lengths[i]:
                last.append(i)
            else:
                batches.append([i])
        return batches

    def encode(
        self, texts: Sequence[str], batch_size: int = 32, progress: ProgressFn | None = None
    ) -> np.ndarray:
        import torch

        texts = [_check_text(t) for t in texts]
        n = len(texts)
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        batch_size = max(1, int(batch_size))
        # an empty text still gets a vector (of its special/padding token), never a zero row
        tokens = [toks or [self.pad_id] for toks in self._tokenize(texts)]
        # longest first: the slowest batches start early and padding stays minimal
        lengths = [len(t) for t in tokens]
        order = sorted(range(n), key=lambda i: -lengths[i])
        batches = self._batches(order, lengths, batch_size)
        done = 0
        if progress:
            progress(0, n)

        def run(batch: list[int]) -> np.ndarray:
            return self._embed_batch([tokens[i] for i in batch])

        with _ENCODE_LOCK:
            previous = torch.get_num_threads()
            workers = min(self.workers, len(batches))
            try:
                if workers <= 1:
                    torch.set_num_threads(self.workers)
                    for batch in batches:
                        out[batch] = run(batch)
                        done += len(batch)
                        if progress:
                            progress(done, n)
                else:
                    # one single-threaded torch worker per core; results and progress are
                    # handled here, in the calling thread (Streamlit's progress needs that)
                    with ThreadPoolExecutor(
                        workers, initializer=torch.set_num_threads, initargs=(1,)
                    ) as pool:
                        futures = [(batch, pool.submit(run, batch)) for batch in batches]
                        try:
                            for batch, fut in futures:
                                out[batch] = fut.result()
                                done += len(batch)
                                if progress:
                                    progress(done, n)
                        except BaseException:
                            for _, fut in futures:
                                fut.cancel()
                            raise
            finally:
                torch.set_num_threads(previous)
        return out


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise CRSError(f"cannot embed a {type(text).__name__}: texts must be strings")
    return text


# -- MiniLM ------------------------------------------------------------------------------
# Fixed calibration texts for the int8 smoothing factors (per-channel activation maxima):
# review-like English of varied length, so the result never depends on the user's data.
_CALIBRATION_SENTENCES = [
    "This movie was a complete waste of time; the plot made no sense and the acting was wooden.",
    "An absolute masterpiece. The cinematography is breathtaking and the score stays with you for days.",
    "I laughed so hard at the dinner scene that I had to pause it.",
    "The sequel is louder, longer and dumber than the original, but the kids loved it.",
    "A slow-burning thriller with a twist I honestly did not see coming.",
    "Great cast, terrible script. Even the best actors cannot save dialogue this bad.",
    "Looking for something like Alien or The Thing: claustrophobic sci-fi horror with practical effects.",
    "My wife and I watched it on our anniversary and it was the perfect romantic comedy.",
    "The animation is gorgeous, but the story feels like it was written by a committee.",
    "Don't bother. 2/10. The only good thing about it is the soundtrack.",
    "As a fan of the book I was disappointed: they cut my favourite characters and changed the ending!",
    "It is a documentary about a jazz musician in 1950s New York, beautifully edited.",
    "The war scenes are brutal and realistic; not for the faint of heart.",
    "Anyone who grew up in the eighties will recognise every cliche, and enjoy every one of them.",
    "What a bizarre, dreamlike film. I'm still not sure what it means, but I can't stop thinking about it.",
    "The villain steals every scene he's in; the hero is bland by comparison.",
    "Classic Hitchcock suspense, though the pacing in the second half drags a little.",
    "Recommended for families: funny, warm, and never mean-spirited.",
    "The special effects have aged badly, yet the story still works in 2011.",
    "Worst. Movie. Ever. I want my two hours back.",
    "A quiet character study of a grieving father, carried by a stunning lead performance.",
    "The martial arts choreography is incredible, the plot is paper-thin, and I don't care.",
    "Can you recommend a feel-good musical with great songs, something like The Sound of Music?",
    "The director's cut restores twenty minutes that make the ending far more powerful.",
    "Low budget, amateur acting, but a genuinely creepy atmosphere in the woods at night.",
    "It tries to be a satire of Hollywood but ends up being exactly what it mocks.",
    "She gives the performance of her career as a lawyer fighting a corrupt chemical company.",
    "I fell asleep twice. The first hour is nothing but people talking in cars.",
    "A fun heist movie with a clever script, snappy editing and a cool retro soundtrack.",
    "The subtitles were out of sync on the DVD, which did not help an already confusing story.",
    "Horror fans will find nothing new here: jump scares, a haunted doll, a priest, the end.",
    "Beautiful, heartbreaking, and funny at the same time. Bring tissues.",
]


def _calibration_texts() -> list[str]:
    s = _CALIBRATION_SENTENCES
    texts = list(s)
    # long texts too (full 256-token windows), made of the same sentences in varied orders
    for k in range(8):
        rotated = s[k * 4 :] + s[: k * 4]
        texts.append(" ".join(rotated[::-1] if k % 2 else rotated))
    return texts


class MiniLMEncoder(_TransformerEncoder):
    """all-MiniLM-L6-v2; ``quantize=True`` (the default ``minilm``) runs smoothed int8 Linears."""

    SMOOTH_ALPHA = 0.8
    FLOOR_QUANTILE = 0.6
    FP32_LINEARS = ("encoder.layer.0.output.dense",)

    def __init__(self, quantize: bool = True, workers: int | None = None, max_length: int | None = None):
        super().__init__(workers)
        offline_env()
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = str(minilm_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
        model.eval()
        self.max_length = int(max_length or _st_max_length(path) or 256)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.dim = int(model.config.hidden_size)
        self.quantized = False
        self.model = model
        if quantize:
            try:
                linears = _quantizable_linears(model, self.FP32_LINEARS)
                amax = _activation_maxima(self, linears, self._tokenize(_calibration_texts()))
                model = _smooth_quantize(
                    model, linears, amax, alpha=self.SMOOTH_ALPHA, floor_quantile=self.FLOOR_QUANTILE
                )
                self.quantized = True
            except Exception as exc:  # quantised kernels missing on this platform
                log.warning("int8 quantisation unavailable (%s); MiniLM runs in fp32", exc)
                model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.model = model
        self.name = "minilm" if quantize else "minilm-fp32"
        # int8 rounding amplifies float noise from padding/masking into ~1e-3 differences, so
        # the quantised path batches only texts of equal length (exactly reproducible vectors)
        self.equal_length_batches = self.quantized

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(
            texts, truncation=True, max_length=self.max_length, add_special_tokens=True
        )["input_ids"]

    def _hidden(self, input_ids, attention_mask):
        if not self.quantized:
            _SEQ.lengths = None
        elif attention_mask is None:
            _SEQ.lengths = [input_ids.shape[1]] * input_ids.shape[0]
        else:
            _SEQ.lengths = attention_mask.sum(dim=1).tolist()
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        finally:
            _SEQ.lengths = None


def _st_max_length(path: str) -> int | None:
    import json

    try:
        with open(os.path.join(path, "sentence_bert_config.json")) as fh:
            return int(json.load(fh)["max_seq_length"])
    except (OSError, KeyError, ValueError):
        return None


def _quantizable_linears(model, keep_fp32: Iterable[str]) -> dict:
    from torch import nn

    keep = set(keep_fp32)
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name not in keep and not name.startswith("pooler")
    }


def _activation_maxima(encoder: "_TransformerEncoder", linears: dict, token_lists: list[list[int]]) -> dict:
    """Per-input-channel max |x| of each Linear over fp32 runs on ``token_lists``."""
    import torch

    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_mod, inputs, _out):
            x = inputs[0].detach()
            m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0)
            amax[name] = torch.maximum(amax[name], m) if name in amax else m

        return fn

    handles = [mod.register_forward_hook(hook(name)) for name, mod in linears.items()]
    try:
        for s in range(0, len(token_lists), 8):
            _TransformerEncoder._embed_batch(encoder, token_lists[s : s + 8])
    finally:
        for h in handles:
            h.remove()
    return amax


def _smooth_quantize(model, linears: dict, amax: dict, *, alpha: float, floor_quantile: float):
    """Int8 dynamic quantisation of the Linear layers, SmoothQuant-style.

    For each Linear, per-input-channel activation maxima a_j (from fp32 calibration runs) and
    weight maxima w_j give s_j = a_j**alpha / w_j**(1-alpha); the layer computes
    (x / s) @ (W * s)^T, the same product, with the activation outliers moved into the
    weights, where per-channel int8 quantisation absorbs them. a_j is floored at a quantile
    of the layer's maxima: a channel the calibration texts hardly used must not get a tiny s_j
    (its real activations would then become the outliers).
    """
    import torch
    from torch import nn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao eager quantisation deprecation notices
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        for name, lin in linears.items():
            a = amax[name].float()
            if floor_quantile > 0:
                a = torch.maximum(a, torch.quantile(a, floor_quantile))
            a = a.clamp(min=1e-5)
            w = lin.weight.detach().abs().amax(dim=0).clamp(min=1e-5)
            s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=1e-5)
            scaled = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
            with torch.no_grad():
                scaled.weight.copy_(lin.weight * s)
                if lin.bias is not None:
                    scaled.bias.copy_(lin.bias)
            qlin = quantize_dynamic(
                nn.Sequential(scaled), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
            )[0]
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _smoothed_linear_cls()(qlin, 1.0 / s))
    return model


# The real token counts of the padded batch being encoded, per worker thread: quantised layers
# use them to quantise each text on its own (see SmoothedInt8Linear).
_SEQ = threading.local()


@functools.cache
def _smoothed_linear_cls():
    from torch import nn

    class SmoothedInt8Linear(nn.Module):
        """x -> int8-dynamic Linear(x / s) with the smoothing factors s folded into its weights.

        Dynamic quantisation picks one activation scale per call. Called on a whole padded
        batch, a text's vector would depend on its batch-mates (and on padding); so, while a
        batch's lengths are known (``_SEQ.lengths``), each text's real tokens are quantised
        and multiplied on their own, and padding rows stay zero (attention masks them).
        A text then gets the same vector whatever batch it is in.
        """

        def __init__(self, qlinear, inv_scale):
            super().__init__()
            self.qlinear = qlinear
            self.out_features = qlinear.out_features
            self.register_buffer("inv_scale", inv_scale.detach().clone())

        def forward(self, x):
            lengths = getattr(_SEQ, "lengths", None)
            if lengths is None or x.dim() != 3 or len(lengths) != x.shape[0]:
                return self.qlinear(x * self.inv_scale)
            if len(lengths) == 1 and lengths[0] == x.shape[1]:  # one unpadded text: no copies
                return self.qlinear(x * self.inv_scale)
            # text by text; each text's rows are small enough to stay in cache for the
            # scaling, quantising and GEMM passes
            out = x.new_empty(x.shape[:-1] + (self.out_features,))
            width = x.shape[1]
            for b, n in enumerate(lengths):
                out[b, :n] = self.qlinear(x[b, :n] * self.inv_scale)
                if n < width:
                    out[b, n:] = 0.0
            return out

    return SmoothedInt8Linear


# -- SmolLM2 mean-pooled -------------------------------------------------------------------
class SmolLM2MeanEncoder(_TransformerEncoder):
    """Mean-pooled last hidden state of the student LM SmolLM2-135M (the paper's option)."""

    def __init__(self, cache_root=None, workers: int | None = None, max_length: int = 512):
        super().__init__(workers)
        offline_env()
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = str(student_model_dir(cache_root))
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32)
        self.model.eval()
        self.max_length = int(max_length)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        self.pad_id = int(pad or 0)  # right padding + attention mask: the id never matters
        self.dim = int(self.model.config.hidden_size)
        self.name = "smollm2-mean"

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    def _hidden(self, input_ids, attention_mask):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state


_ENCODERS: dict[tuple, Encoder] = {}
_ENCODERS_LOCK = threading.Lock()


def get_encoder(name: str = DEFAULT_ENCODER, **kwargs) -> Encoder:
    """A shared encoder instance (loading a model takes seconds; do it once per process)."""
    key = (name, tuple(sorted(kwargs.items())))
    with _ENCODERS_LOCK:
        enc = _ENCODERS.get(key)
        if enc is None:
            if name == "minilm":
                enc = MiniLMEncoder(quantize=True, **kwargs)
            elif name == "minilm-fp32":
                enc = MiniLMEncoder(quantize=False, **kwargs)
            elif name == "smollm2-mean":
                enc = SmolLM2MeanEncoder(**kwargs)
            else:
                raise CRSError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
            _ENCODERS[key] = enc
        return enc


# ======================================================================================
# Cache and embedding sets
# ======================================================================================
def _view_name() -> str:
    return f"_crs_tmp_{uuid.uuid4().hex[:12]}"


def settle(cur) -> None:
    """Run any result still pending on ``cur`` to its end.

    DuckDB 2 evaluates ``execute`` results lazily and refuses ``register`` (and relations)
    while one is unfinished -- e.g. after ``fetchone()`` of a one-row query elsewhere on this
    thread's cursor. Settling after a write also makes sure the write has fully run.
    """
    complete = getattr(cur, "complete", None)
    if complete is not None:
        complete()


@contextlib.contextmanager
def registered(cur, table: pa.Table) -> Iterator[str]:
    """Expose an Arrow table to SQL on ``cur`` under a unique temporary name."""
    settle(cur)
    name = _view_name()
    cur.register(name, table)
    try:
        yield name
    finally:
        settle(cur)
        cur.unregister(name)


def write(cur, sql: str, params: list | None = None) -> None:
    """Execute a write statement and run it to completion."""
    cur.execute(sql, params or [])
    settle(cur)


def _vectors_from_arrow(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """float32 (n, dim) from a binary column of float32 blobs, without a Python loop."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.zeros((0, dim), dtype=np.float32)
    if arr.null_count:
        raise WorkspaceError("embedding vectors are missing from the cache")
    offsets_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=offsets_type, count=n + 1, offset=arr.offset * np.dtype(offsets_type).itemsize)
    width = dim * 4
    if not np.all(np.diff(offsets) == width):
        raise WorkspaceError(f"cached vectors do not have dimension {dim}")
    data = np.frombuffer(bufs[2], dtype="<f4", count=n * dim, offset=int(offsets[0]))
    return data.reshape(n, dim).astype(np.float32, copy=True)


def _arrow(cur, sql: str, params: list) -> pa.Table:
    """Run a query and fetch an Arrow table. Through ``execute`` (a DuckDB relation from
    ``.sql`` refuses to run while the cursor holds another result); DuckDB's note that this
    copies the rows once is expected and silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Arrow output on a DB-API result.*")
        return cur.execute(sql, params).to_arrow_table()


def _read_cache(ws: Workspace, model: str, hashes: list[str], dim: int) -> dict[str, np.ndarray]:
    if not hashes:
        return {}
    cur = ws.cursor()
    with registered(cur, pa.table({"text_hash": pa.array(hashes, pa.string())})) as view:
        # execute + fetch (not .sql): a relation refuses to run while the cursor holds a result
        table = _arrow(
            cur,
            f"SELECT c.text_hash, c.vector FROM embedding_cache c JOIN {view} h "
            "ON c.text_hash = h.text_hash WHERE c.model = ?",
            [model],
        )
    found = table.column("text_hash").to_pylist()
    vecs = _vectors_from_arrow(table.column("vector"), dim)
    return dict(zip(found, vecs))


def _write_cache(ws: Workspace, model: str, hashes: list[str], vectors: np.ndarray) -> None:
    blobs = np.ascontiguousarray(vectors, dtype="<f4")
    table = pa.table(
        {
            "model": pa.array([model] * len(hashes), pa.string()),
            "text_hash": pa.array(hashes, pa.string()),
            "vector": pa.array([row.tobytes() for row in blobs], pa.binary()),
        }
    )
    with ws.transaction() as cur, registered(cur, table) as view:
        write(
            cur,
            f"INSERT OR IGNORE INTO embedding_cache (model, text_hash, vector) "
            f"SELECT model, text_hash, vector FROM {view}",
        )


def _encode_with(encoder, texts: list[str], batch_size: int, progress: ProgressFn | None) -> np.ndarray:
    """Call ``encoder.encode`` with the keywords it accepts (duck-typed encoders elsewhere in
    the project take only ``texts``)."""
    try:
        params = inspect.signature(encoder.encode).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {}
    if takes_any or "batch_size" in params:
        kwargs["batch_size"] = batch_size
    if takes_any or "progress" in params:
        kwargs["progress"] = progress
    return encoder.encode(texts, **kwargs)


def encode_block(encoder, texts: list[str], batch_size: int = 32, progress: ProgressFn | None = None) -> np.ndarray:
    """The embedding step on one block of texts: float32 (len(texts), dim), checked. Every
    engine runs this (in process, or in a Ray worker holding the encoder)."""
    mat = np.asarray(_encode_with(encoder, list(texts), batch_size, progress), dtype=np.float32)
    if mat.shape != (len(texts), int(encoder.dim)):
        raise CRSError(
            f"encoder {encoder.name} returned shape {mat.shape}, expected {(len(texts), int(encoder.dim))}"
        )
    return mat


def embed_texts(
    ws: Workspace,
    encoder: Encoder,
    texts: Sequence[str],
    progress: ProgressFn | None = None,
    *,
    chunk_size: int = CHUNK,
    batch_size: int = 32,
    engine=None,
) -> np.ndarray:
    """Vectors for ``texts`` (float32 (n, dim), input order), encoding only uncached texts.

    Identical texts are encoded once. Misses are encoded in blocks of ``chunk_size`` by the
    engine (``crs_core.engines``; None: in this process) and each block is committed to
    ``embedding_cache`` as it finishes, here, the workspace's one writer: a killed run loses
    at most the blocks in flight. ``progress(done, total)`` counts distinct texts, cached ones
    included.
    """
    from .engines import get_engine

    texts = [_check_text(t) for t in texts]
    chunk_size = max(1, int(chunk_size))
    dim = int(encoder.dim)
    hashes = [text_hash(t) for t in texts]
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        first.setdefault(h, i)
    unique = list(first)
    total = len(unique)
    vectors = _read_cache(ws, encoder.name, unique, dim)
    misses = [h for h in unique if h not in vectors]
    done = total - len(misses)
    report(progress, done, total)
    blocks = [misses[start : start + chunk_size] for start in range(0, len(misses), chunk_size)]
    sub = (lambda d, _t: progress(done + d, total)) if progress else None
    runner = engine if engine is not None else get_engine()
    for index, mat in runner.embed_blocks(encoder, [[texts[first[h]] for h in b] for b in blocks], batch_size, sub):
        _write_cache(ws, encoder.name, blocks[index], mat)
        vectors.update(zip(blocks[index], mat))
        done += len(blocks[index])
        report(progress, done, total)
    if not texts:
        return np.zeros((0, dim), dtype=np.float32)
    return np.stack([vectors[h] for h in hashes]).astype(np.float32, copy=False)


class TextEncoder:
    """Texts -> L2-normalised float32 rows: the one query / item-text encoder of synthesis,
    augmentation and the recommenders' helpers.

    With no encoder given it is the project's MiniLM through `embed_texts` (vectors cached in the
    workspace, so a catalogue is encoded once per machine); an injected encoder (tests, a
    fine-tuned retriever) is called directly. Vectors are also kept in memory for the life of the
    process (`MEMO_MAX` texts per encoder name, cleared when full), so repeated queries cost
    nothing; `forget` drops texts a caller keeps elsewhere."""

    MEMO_MAX = 60_000
    _memo: dict[tuple[str, str], np.ndarray] = {}
    _memo_lock = threading.Lock()

    def __init__(self, ws: Workspace | None, encoder: Encoder | None = None):
        self._ws = ws
        self._given = encoder
        self._encoder: Encoder | None = None
        self.name = "?"

    def ensure(self) -> "TextEncoder":
        """Load the encoder now (so ``name`` is known)."""
        if self._encoder is None:
            self._encoder = self._given if self._given is not None else get_encoder(DEFAULT_ENCODER)
            enc = self._encoder
            self.name = str(getattr(enc, "name", None) or getattr(enc, "model_name", None) or type(enc).__name__)
        return self

    @property
    def encoder(self) -> Encoder:
        return self.ensure()._encoder

    def _encode(self, texts: list[str], progress: ProgressFn | None) -> np.ndarray:
        if self._given is None and self._ws is not None:
            return embed_texts(self._ws, self.encoder, texts, progress)
        chunks = []
        report(progress, 0, len(texts))
        for start in range(0, len(texts), CHUNK):
            chunks.append(np.asarray(self.encoder.encode(texts[start:start + CHUNK]), dtype=np.float32))
            report(progress, min(start + CHUNK, len(texts)), len(texts))
        return np.vstack(chunks) if chunks else np.zeros((0, 1), np.float32)

    def __call__(self, texts: Sequence[str], progress: ProgressFn | None = None) -> np.ndarray:
        texts = list(texts)
        self.ensure()
        keys = [(self.name, text_hash(t)) for t in texts]
        with self._memo_lock:
            found = {k: self._memo[k] for k in keys if k in self._memo}
        todo = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in found))
        if todo:
            vecs = np.asarray(self._encode(todo, progress), dtype=np.float32)
            if vecs.ndim != 2 or len(vecs) != len(todo):
                raise CRSError(f"the encoder {self.name} returned shape {vecs.shape} for {len(todo)} texts")
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
            fresh = {(self.name, text_hash(t)): v for t, v in zip(todo, vecs)}
            found.update(fresh)
            with self._memo_lock:
                if len(self._memo) + len(fresh) > self.MEMO_MAX:
                    self._memo.clear()
                self._memo.update(fresh)
        report(progress, 1, 1)
        if not texts:
            return np.zeros((0, 1), np.float32)
        return np.stack([found[k] for k in keys]).astype(np.float32, copy=False)

    def forget(self, texts: Iterable[str]) -> None:
        with self._memo_lock:
            for t in texts:
                self._memo.pop((self.name, text_hash(t)), None)


def build_embedding_set(
    ws: Workspace,
    unit: str,
    unit_ids: Sequence[str],
    texts: Sequence[str],
    encoder: Encoder,
    progress: ProgressFn | None = None,
    *,
    chunk_size: int = CHUNK,
    batch_size: int = 32,
    engine=None,
) -> str:
    """Embed ``texts`` (one per unit) and record them as the set ``f"{unit}:{encoder.name}"``.

    An older set of the same id is replaced in one transaction. If its rows changed (other
    units or other texts), the clusterings and projection computed from it are removed in the
    same transaction, since they no longer describe the set.
    """
    unit_ids = [str(u) for u in unit_ids]
    texts = list(texts)
    if len(unit_ids) != len(texts):
        raise CRSError(f"{len(unit_ids)} unit ids but {len(texts)} texts")
    if not unit_ids:
        raise CRSError(f"no {unit} texts to embed")
    if len(set(unit_ids)) != len(unit_ids):
        dup = pd.Series(unit_ids)[pd.Series(unit_ids).duplicated()].iloc[0]
        raise CRSError(f"duplicate {unit} id {dup!r}: each unit may appear once in a set")
    set_id = f"{unit}:{encoder.name}"
    embed_texts(ws, encoder, texts, progress, chunk_size=chunk_size, batch_size=batch_size, engine=engine)
    hashes = [text_hash(t) for t in texts]
    rows = pa.table(
        {
            "set_id": pa.array([set_id] * len(unit_ids), pa.string()),
            "pos": pa.array(np.arange(len(unit_ids), dtype=np.int32)),
            "unit_id": pa.array(unit_ids, pa.string()),
            "text_hash": pa.array(hashes, pa.string()),
        }
    )
    with ws.transaction() as cur:
        old = cur.execute(
            "SELECT unit_id, text_hash FROM embedding_rows WHERE set_id = ? ORDER BY pos", [set_id]
        ).fetchall()
        changed = [tuple(r) for r in old] != list(zip(unit_ids, hashes))
        if changed:
            _delete_derived(cur, set_id)
        write(cur, "DELETE FROM embedding_rows WHERE set_id = ?", [set_id])
        write(cur, "DELETE FROM embedding_sets WHERE set_id = ?", [set_id])
        write(
            cur,
            "INSERT INTO embedding_sets (set_id, unit, model, dim, n) VALUES (?, ?, ?, ?, ?)",
            [set_id, unit, encoder.name, int(encoder.dim), len(unit_ids)],
        )
        with registered(cur, rows) as view:
            write(
                cur,
                f"INSERT INTO embedding_rows (set_id, pos, unit_id, text_hash) "
                f"SELECT set_id, pos, unit_id, text_hash FROM {view}",
            )
        covered = cur.execute(
            "SELECT count(*) FROM embedding_rows r JOIN embedding_cache c "
            "ON c.model = ? AND c.text_hash = r.text_hash WHERE r.set_id = ?",
            [encoder.name, set_id],
        ).fetchone()[0]
        if covered != len(unit_ids):
            raise WorkspaceError(
                f"embedding set {set_id}: {len(unit_ids) - covered} vectors vanished from the cache "
                "while it was being built; run it again"
            )
    return set_id


def _delete_derived(cur, set_id: str) -> None:
    write(
        cur,
        "DELETE FROM cluster_assignments WHERE clustering_id IN "
        "(SELECT clustering_id FROM clusterings WHERE set_id = ?)",
        [set_id],
    )
    write(cur, "DELETE FROM clusterings WHERE set_id = ?", [set_id])
    write(cur, "DELETE FROM projections WHERE set_id = ?", [set_id])


def embedding_set_info(ws: Workspace, set_id: str) -> dict:
    row = ws.cursor().execute(
        "SELECT set_id, unit, model, dim, n, created_at FROM embedding_sets WHERE set_id = ?", [set_id]
    ).fetchone()
    if row is None:
        known = [r[0] for r in ws.cursor().execute("SELECT set_id FROM embedding_sets ORDER BY set_id").fetchall()]
        hint = f"; known sets: {', '.join(known)}" if known else "; build one first (embed step)"
        raise WorkspaceError(f"no embedding set {set_id!r} in workspace {ws.path}{hint}")
    return dict(zip(("set_id", "unit", "model", "dim", "n", "created_at"), row))


def load_embedding_set(ws: Workspace, set_id: str) -> tuple[list[str], np.ndarray]:
    """(unit_ids, float32 (n, dim) matrix), in the order the set was built."""
    info = embedding_set_info(ws, set_id)
    table = _arrow(
        ws.cursor(),
        "SELECT r.unit_id, c.vector FROM embedding_rows r LEFT JOIN embedding_cache c "
        "ON c.model = ? AND c.text_hash = r.text_hash WHERE r.set_id = ? ORDER BY r.pos",
        [info["model"], set_id],
    )
    if table.column("vector").null_count:
        raise WorkspaceError(
            f"embedding set {set_id}: {table.column('vector').null_count} vectors are missing "
            "from the cache; rebuild the set"
        )
    unit_ids = table.column("unit_id").to_pylist()
    return unit_ids, _vectors_from_arrow(table.column("vector"), int(info["dim"]))


def list_embedding_sets(ws: Workspace) -> pd.DataFrame:
    return ws.df(
        "SELECT set_id, unit, model, dim, n, created_at FROM embedding_sets "
        "ORDER BY created_at DESC, set_id"
    )
