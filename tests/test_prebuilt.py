"""Shipped review vectors: used only when they verify, refused (and rebuilt) otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_workspace
from crs_core.embed import build_embedding_set, get_encoder, load_embedding_set
from crs_core.pipeline import REVIEW_SET
from crs_core.prebuilt import (BUNDLED_VECTORS, MANIFEST, META_KEY, file_sha256, seed_embedding_cache,
                               store_shipped_projection, write_bundle)
from crs_core.store import Workspace


class CountingEncoder:
    """The real MiniLM encoder, counting the texts it is asked to encode."""

    def __init__(self):
        self.inner = get_encoder("minilm")
        self.name, self.dim = self.inner.name, self.inner.dim
        self.texts = 0

    def encode(self, texts, batch_size=32, progress=None):
        self.texts += len(texts)
        return self.inner.encode(texts, batch_size=batch_size, progress=progress)


@pytest.fixture(scope="module")
def bundle(studio_workspace_file, tmp_path_factory) -> Path:
    """A vector bundle exported from the small workspace's review set (400 real reviews)."""
    folder = tmp_path_factory.mktemp("bundle") / "review_vectors"
    with Workspace(studio_workspace_file, read_only=True) as ws:
        set_id = ws.scalar("SELECT set_id FROM embedding_sets WHERE unit = 'review'")
        write_bundle(ws, set_id, folder, command="test")
    return folder


def _fresh(studio_workspace_file, tmp_path) -> tuple[Workspace, list[str], list[str], str]:
    """A copy of the small workspace with its review vectors, sets and map removed."""
    ws = Workspace(copy_workspace(studio_workspace_file, tmp_path / "ws.duckdb"))
    set_id = ws.scalar("SELECT set_id FROM embedding_sets WHERE unit = 'review'")
    rows = ws.df("SELECT r.unit_id, v.text FROM embedding_rows r JOIN reviews v ON v.review_id = r.unit_id "
                 "WHERE r.set_id = ? ORDER BY r.pos", [set_id])
    with ws.transaction() as cur:
        for table in ("embedding_cache", "embedding_rows", "embedding_sets", "projections",
                      "cluster_assignments", "clusterings"):
            cur.execute(f"DELETE FROM {table}")
    return ws, rows["unit_id"].tolist(), rows["text"].tolist(), set_id


def test_verified_vectors_seed_the_cache_and_the_map(bundle, studio_workspace_file, tmp_path):
    with Workspace(studio_workspace_file, read_only=True) as ws:
        set_id = ws.scalar("SELECT set_id FROM embedding_sets WHERE unit = 'review'")
        _, original = load_embedding_set(ws, set_id)
        original_map = ws.df("SELECT unit_id, x, y FROM projections WHERE set_id = ? ORDER BY unit_id", [set_id])
    ws, ids, texts, set_id = _fresh(studio_workspace_file, tmp_path)
    encoder = CountingEncoder()
    result = seed_embedding_cache(ws, texts, lambda: encoder, encoder_name="minilm", folder=bundle, sample=8)
    assert result.used, result.reason
    assert result.seeded == len(set(texts)) and encoder.texts == 8  # only the sample was encoded
    assert result.worst_cosine >= 0.99
    build_embedding_set(ws, "review", ids, texts, encoder)
    assert encoder.texts == 8  # every vector came from the cache
    _, seeded = load_embedding_set(ws, set_id)
    assert np.min(np.sum(seeded * original, axis=1)) > 0.9999  # float16 storage only
    assert store_shipped_projection(ws, set_id, bundle)
    shipped_map = ws.df("SELECT unit_id, x, y FROM projections WHERE set_id = ? ORDER BY unit_id", [set_id])
    assert shipped_map["unit_id"].tolist() == original_map["unit_id"].tolist()
    assert np.allclose(shipped_map[["x", "y"]].to_numpy(), original_map[["x", "y"]].to_numpy())
    ws.close()


def _tamper_one_vector(folder: Path, *, fix_checksum: bool) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    path = folder / manifest["vectors_file"]
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    rng = np.random.default_rng(1)
    if fix_checksum:  # an edit that also rewrote the manifest: every vector from another "encoder"
        noise = rng.standard_normal(arrays["vectors"].shape)
        arrays["vectors"] = (noise / np.linalg.norm(noise, axis=1, keepdims=True)).astype(np.float16)
    else:
        arrays["vectors"][0] = -arrays["vectors"][0]
    np.savez_compressed(path, **arrays)
    if fix_checksum:
        manifest["vectors_sha256"] = file_sha256(path)
        (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("fix_checksum", [False, True], ids=["checksum", "sample"])
def test_tampered_vectors_are_refused_and_rebuilt(bundle, studio_workspace_file, tmp_path, fix_checksum):
    folder = tmp_path / "tampered"
    shutil.copytree(bundle, folder)
    _tamper_one_vector(folder, fix_checksum=fix_checksum)
    ws, ids, texts, set_id = _fresh(studio_workspace_file, tmp_path)
    encoder = CountingEncoder()
    result = seed_embedding_cache(ws, texts, lambda: encoder, encoder_name="minilm", folder=folder, sample=8)
    assert not result.used
    assert ("checksum" in result.reason) if not fix_checksum else ("disagree" in result.reason)
    assert ws.scalar("SELECT count(*) FROM embedding_cache") == 0 and ws.get_meta(META_KEY) is None
    build_embedding_set(ws, "review", ids, texts, encoder)  # the full path: every text encoded
    assert encoder.texts >= len(set(texts))
    assert not store_shipped_projection(ws, set_id, folder)  # the map belongs to other vectors
    ws.close()


def test_other_weights_or_encoder_are_refused(bundle, studio_workspace_file, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(bundle, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["weights_sha256"] = "0" * 64
    (folder / MANIFEST).write_text(json.dumps(manifest))
    ws, _, texts, _ = _fresh(studio_workspace_file, tmp_path)
    encoder = CountingEncoder()
    result = seed_embedding_cache(ws, texts, lambda: encoder, encoder_name="minilm", folder=folder)
    assert not result.used and "other weights" in result.reason and encoder.texts == 0
    result = seed_embedding_cache(ws, texts, lambda: encoder, encoder_name="minilm-fp32", folder=bundle)
    assert not result.used and "encoder" in result.reason
    result = seed_embedding_cache(ws, texts, lambda: encoder, encoder_name="minilm", folder=tmp_path / "none")
    assert not result.used and "no manifest.json" in result.reason
    ws.close()


def test_map_is_not_used_for_other_rows(bundle, studio_workspace_file, tmp_path):
    ws, ids, texts, set_id = _fresh(studio_workspace_file, tmp_path)
    assert seed_embedding_cache(ws, texts, CountingEncoder, encoder_name="minilm", folder=bundle, sample=4).used
    build_embedding_set(ws, "review", ids[:-1], texts[:-1], CountingEncoder())  # one review fewer
    assert not store_shipped_projection(ws, set_id, bundle)
    ws.close()


def test_the_shipped_bundle_covers_the_bundled_reviews(studio_workspace_file, tmp_path):
    """The vectors in data/bundled verify on this machine and cover every ingested review text."""
    ws = Workspace(copy_workspace(studio_workspace_file, tmp_path / "ws.duckdb"))
    ws.cursor().execute("DELETE FROM embedding_cache")
    texts = ws.df("SELECT text FROM reviews WHERE source <> 'test'")["text"].tolist()
    result = seed_embedding_cache(ws, texts, CountingEncoder, encoder_name="minilm", folder=BUNDLED_VECTORS,
                                  sample=16)
    assert result.used, result.reason
    assert result.seeded == len(set(texts))
    ws.close()


def test_init_uses_the_shipped_vectors_and_map(tmp_path):
    """init on the real bundled data: no review is encoded beyond the verification sample."""
    from crs_core.pipeline import init_default

    with Workspace(tmp_path / "init.duckdb") as ws:
        notes: list[str] = []
        done = init_default(ws, note=notes.append)
        assert done == ["ingest", "embed (shipped vectors)", "cluster", "map (shipped)"], (done, notes)
        assert "verified" in notes[0]
        assert ws.scalar("SELECT count(*) FROM projections WHERE set_id = ?", [REVIEW_SET]) == ws.count("reviews")
