"""Prebuilt review vectors and map coordinates shipped with the bundled data.

Embedding the 16.7k bundled reviews takes 15-40 minutes on a 2-core CPU; the vectors do not
change unless the reviews, the encoder's weights or its recipe change. So
``scripts/build_bundled_data.py --vectors-from WORKSPACE`` writes them (float16) with the
workspace's 2-D map into ``data/bundled/review_vectors/``, and ``init`` seeds the embedding
cache from there instead of encoding, after checking that they still describe this machine's
encoder:

1. the manifest names the same encoder and the same weights (sha256 of the weight file);
2. the vector file's sha256 matches the manifest (a corrupt or edited file is refused);
3. a random sample of the workspace's review texts is re-encoded here; every sample's cosine
   to its shipped vector must reach the encoder's stated tolerance (``min_cosine``; the int8
   MiniLM differs from fp32 by at most ~0.01, float16 storage adds ~1e-6).

Anything that fails is reported and nothing is seeded: the normal path then embeds every text.
Vectors are keyed per text (sha1 of the text, the cache's own key), so user data, or reviews
that were not in the bundle, are simply embedded as usual. The map is used only for the exact
set it was computed from (same units, same texts, in the same order) and only when this
workspace's vectors came from the same shipped file; otherwise UMAP runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import CRSError
from .store import Workspace

log = logging.getLogger(__name__)

BUNDLED_VECTORS = Path(__file__).resolve().parent.parent / "data" / "bundled" / "review_vectors"
MANIFEST = "manifest.json"
FORMAT = 1
SAMPLE = 32  # texts re-encoded to check the shipped vectors (~2 s on 2 cores)
MIN_COSINE = {"minilm": 0.99, "minilm-fp32": 0.999}  # the encoders' stated tolerance
META_KEY = "prebuilt_vectors_sha256"  # which shipped file seeded this workspace's cache


@dataclass(frozen=True)
class SeedResult:
    used: bool
    reason: str  # one line: why the vectors were used or refused
    seeded: int = 0  # cache rows added
    worst_cosine: float | None = None


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def encoder_weights_sha256(encoder_name: str) -> str:
    """sha256 of the weight file behind an encoder (what makes its vectors what they are)."""
    if not encoder_name.startswith("minilm"):
        raise CRSError(f"prebuilt vectors are only supported for MiniLM encoders, not {encoder_name!r}")
    from .models import minilm_path

    folder = minilm_path()
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return file_sha256(folder / name)
    raise CRSError(f"no weight file in {folder}")


def rows_sha256(unit_ids: Sequence[str], text_hashes: Sequence[str]) -> str:
    """Identity of an embedding set's rows: its units and their texts, in order."""
    digest = hashlib.sha256()
    for unit, text in zip(unit_ids, text_hashes):
        digest.update(f"{unit}\t{text}\n".encode())
    return digest.hexdigest()


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CRSError(f"no {MANIFEST} in {folder}") from None
    except (OSError, ValueError) as exc:
        raise CRSError(f"{path} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CRSError(f"{path}: unknown format {manifest.get('format') if isinstance(manifest, dict) else None!r}")
    return manifest


def _load_arrays(folder: Path, manifest: dict) -> dict[str, np.ndarray]:
    path = folder / str(manifest.get("vectors_file", ""))
    if not path.is_file():
        raise CRSError(f"the vector file {path.name!r} named by the manifest is missing")
    actual = file_sha256(path)
    if actual != manifest.get("vectors_sha256"):
        raise CRSError(f"{path.name} does not match its manifest checksum (corrupt or edited)")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    n, dim = int(manifest["n"]), int(manifest["dim"])
    if arrays["vectors"].shape != (n, dim) or arrays["text_hash"].shape != (n,):
        raise CRSError(f"{path.name}: shapes {arrays['vectors'].shape} / {arrays['text_hash'].shape} "
                       f"do not match the manifest ({n}, {dim})")
    return arrays


def seed_embedding_cache(
    ws: Workspace,
    texts: Sequence[str],
    encoder_factory: Callable[[], object],
    *,
    encoder_name: str,
    folder: Path = BUNDLED_VECTORS,
    sample: int = SAMPLE,
    rng_seed: int | None = None,
) -> SeedResult:
    """Add the shipped vectors of ``texts`` to the workspace's embedding cache, if they verify.

    ``encoder_factory`` is called only when a sample must be re-encoded (loading an encoder
    costs seconds). Never raises for a bad bundle: the reason comes back in the result.
    """
    from .embed import text_hash, _write_cache

    try:
        manifest = _read_manifest(folder)
        if manifest.get("encoder") != encoder_name:
            return SeedResult(False, f"shipped vectors are for encoder {manifest.get('encoder')!r}, "
                                     f"not {encoder_name!r}")
        if manifest.get("weights_sha256") != encoder_weights_sha256(encoder_name):
            return SeedResult(False, "shipped vectors were made with other weights of "
                                     f"{encoder_name!r}; embedding here instead")
        arrays = _load_arrays(folder, manifest)
    except CRSError as exc:
        return SeedResult(False, f"shipped vectors not used: {exc}")

    shipped_hashes = arrays["text_hash"].astype(str)
    row_of = {h: i for i, h in enumerate(shipped_hashes)}
    wanted: dict[str, str] = {}
    for text in texts:
        h = text_hash(text)
        if h in row_of:
            wanted.setdefault(h, text)
    if not wanted:
        return SeedResult(False, "none of the workspace's texts is in the shipped vectors")

    hashes = list(wanted)
    rng = np.random.default_rng(rng_seed)
    picked = [hashes[i] for i in rng.choice(len(hashes), min(sample, len(hashes)), replace=False)]
    encoder = encoder_factory()
    fresh = np.asarray(encoder.encode([wanted[h] for h in picked]), dtype=np.float32)
    shipped = arrays["vectors"][[row_of[h] for h in picked]].astype(np.float32)
    cosines = np.sum(fresh * shipped, axis=1) / (
        np.linalg.norm(fresh, axis=1) * np.linalg.norm(shipped, axis=1) + 1e-12)
    worst = float(cosines.min())
    tolerance = float(manifest.get("min_cosine", MIN_COSINE.get(encoder_name, 0.99)))
    if not worst >= tolerance:  # NaN fails too
        return SeedResult(False, f"shipped vectors disagree with this machine's encoder (worst cosine "
                                 f"{worst:.4f} of {len(picked)} re-encoded, tolerance {tolerance}); "
                                 "embedding every text here instead", worst_cosine=worst)

    vectors = arrays["vectors"][[row_of[h] for h in hashes]].astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    _write_cache(ws, encoder_name, hashes, vectors)
    ws.set_meta(META_KEY, manifest["vectors_sha256"])
    return SeedResult(True, f"{len(hashes):,} shipped vectors verified ({len(picked)} re-encoded here, "
                            f"worst cosine {worst:.4f} ≥ {tolerance})", seeded=len(hashes), worst_cosine=worst)


def store_shipped_projection(ws: Workspace, set_id: str, folder: Path = BUNDLED_VECTORS) -> bool:
    """Store the shipped 2-D map for ``set_id`` if it was computed from exactly this set's rows
    and this workspace's vectors came from the same shipped file; True when stored."""
    from .cluster import store_projection

    try:
        manifest = _read_manifest(folder)
    except CRSError:
        return False
    shipped_map = manifest.get("map") or {}
    if shipped_map.get("set_id") != set_id or ws.get_meta(META_KEY) != manifest.get("vectors_sha256"):
        return False
    rows = ws.cursor().execute(
        "SELECT unit_id, text_hash FROM embedding_rows WHERE set_id = ? ORDER BY pos", [set_id]).fetchall()
    if not rows or rows_sha256([r[0] for r in rows], [r[1] for r in rows]) != shipped_map.get("rows_sha256"):
        return False
    try:
        arrays = _load_arrays(folder, manifest)
    except CRSError:
        return False
    unit_ids = arrays["map_unit_id"].astype(str)
    xy = arrays["map_xy"].astype(np.float32)
    if len(unit_ids) != len(rows) or xy.shape != (len(rows), 2):
        return False
    store_projection(ws, set_id, unit_ids.tolist(), xy)
    return True


def write_bundle(ws: Workspace, set_id: str, folder: Path = BUNDLED_VECTORS, *, command: str = "") -> dict:
    """Export an embedding set's vectors (float16) and its map into ``folder``; returns the manifest.

    Used by ``scripts/build_bundled_data.py --vectors-from``. The set must have a map.
    """
    from .embed import embedding_set_info, load_embedding_set

    info = embedding_set_info(ws, set_id)
    rows = ws.cursor().execute(
        "SELECT unit_id, text_hash FROM embedding_rows WHERE set_id = ? ORDER BY pos", [set_id]).fetchall()
    unit_ids, X = load_embedding_set(ws, set_id)
    text_hashes = [r[1] for r in rows]
    first: dict[str, int] = {}
    for i, h in enumerate(text_hashes):
        first.setdefault(h, i)
    unique = list(first)
    projection = ws.df("SELECT p.unit_id, p.x, p.y FROM projections p JOIN embedding_rows r "
                       "ON r.set_id = p.set_id AND r.unit_id = p.unit_id WHERE p.set_id = ? ORDER BY r.pos",
                       [set_id])
    if len(projection) != len(unit_ids):
        raise CRSError(f"{set_id} has {len(projection)} map points for {len(unit_ids)} units; "
                       "build its map first (cluster step)")
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{info['model']}_float16.npz"
    np.savez_compressed(
        folder / name,
        text_hash=np.array(unique, dtype="S40"),
        vectors=X[[first[h] for h in unique]].astype(np.float16),
        map_unit_id=np.array(projection["unit_id"].tolist(), dtype=str),
        map_xy=projection[["x", "y"]].to_numpy(np.float32),
    )
    from .cluster import UMAP_FIT_MAX, UMAP_PARAMS

    manifest = {
        "format": FORMAT,
        "encoder": info["model"],
        "weights_sha256": encoder_weights_sha256(info["model"]),
        "dim": int(info["dim"]),
        "n": len(unique),
        "dtype": "float16",
        "vectors_file": name,
        "vectors_sha256": file_sha256(folder / name),
        "min_cosine": MIN_COSINE.get(info["model"], 0.99),
        "map": {"set_id": set_id, "rows_sha256": rows_sha256(unit_ids, text_hashes),
                "umap": {**UMAP_PARAMS, "fit_max": UMAP_FIT_MAX}},
        "built": date.today().isoformat(),
        "command": command,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
