"""crs_core.models: the split teacher model is joined from its parts once and checked (size and
sha256, per part and whole) before use. Parts are small files this test writes itself; the real
1.1 GB teacher is checked only when installed (scripts/setup.sh --teacher; test.sh does not)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from crs_core import models  # noqa: E402
from crs_core.models import (  # noqa: E402
    QWEN_TEACHER, ModelAssemblyError, SplitModel, assemble_parts, local_teacher, split_model_parts,
    split_model_path, verify_model_file,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def parts(tmp_path):
    """Three payloads in three 'packages' (folders with data/partNN.bin) on sys.path."""
    site = tmp_path / "site"
    payloads = [os.urandom(70_000), os.urandom(50_000), b"tail" * 1000]
    for n, data in enumerate(payloads, 1):
        pkg = site / f"fakeparts_part{n}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{n:02d}.bin").write_bytes(data)
    sys.path.insert(0, str(site))
    whole = b"".join(payloads)
    model = SplitModel(name="fake-teacher", filename="fake.gguf", size=len(whole), sha256=sha(whole),
                       modules=tuple(f"fakeparts_part{n}" for n in range(1, 4)),
                       part_sha256=tuple(sha(p) for p in payloads), install_hint="pip install fakeparts",
                       source="written by the test")
    yield model, site, whole
    sys.path.remove(str(site))


def test_parts_are_joined_in_order_and_verified(parts, tmp_path):
    model, site, whole = parts
    path = split_model_path(model, tmp_path / "cache")
    assert path == tmp_path / "cache" / "fake.gguf" and path.read_bytes() == whole
    assert verify_model_file(path, model.size, model.sha256) is None
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    mtime = path.stat().st_mtime_ns
    assert split_model_path(model, tmp_path / "cache") == path and path.stat().st_mtime_ns == mtime  # reused


def test_a_tampered_part_is_named_and_nothing_is_written(parts, tmp_path):
    model, site, whole = parts
    bad = site / "fakeparts_part2" / "data" / "part02.bin"
    data = bytearray(bad.read_bytes())
    data[100] ^= 0xFF  # same size, other content
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelAssemblyError, match=r"part 2 of fake.gguf .* modified or damaged; .*pip install fakeparts"):
        split_model_path(model, tmp_path / "cache")
    assert not (tmp_path / "cache" / "fake.gguf").exists()
    assert not list((tmp_path / "cache").glob(".fake.gguf.tmp-*"))


def test_a_part_of_another_size_is_refused_before_writing(parts, tmp_path):
    model, site, whole = parts
    (site / "fakeparts_part3" / "data" / "part03.bin").write_bytes(b"short")
    with pytest.raises(ModelAssemblyError, match="hold .* bytes, not the expected"):
        split_model_path(model, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_whole_file_checksum_without_part_checksums(parts, tmp_path):
    model, site, whole = parts
    paths = split_model_parts(model)
    wrong = "0" * 64
    with pytest.raises(ModelAssemblyError, match=f"expected {wrong}"):
        assemble_parts(paths, tmp_path / "x.gguf", size=model.size, sha256=wrong)
    assert not (tmp_path / "x.gguf").exists()
    # parts in the wrong order: same size, other checksum
    with pytest.raises(ModelAssemblyError, match="sha256"):
        assemble_parts(list(reversed(paths)), tmp_path / "x.gguf", size=model.size, sha256=model.sha256)


def test_a_tampered_assembled_file_is_detected_and_rebuilt(parts, tmp_path):
    model, site, whole = parts
    path = split_model_path(model, tmp_path / "cache")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert "sha256" in verify_model_file(path, model.size, model.sha256)
    assert split_model_path(model, tmp_path / "cache").read_bytes() == whole  # rebuilt from the parts
    path.write_bytes(whole[:-10])
    assert "bytes instead of" in verify_model_file(path, model.size, model.sha256)
    assert split_model_path(model, tmp_path / "cache").read_bytes() == whole


def test_missing_parts_are_a_clear_error(parts, tmp_path):
    model, site, whole = parts
    (site / "fakeparts_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(ModelAssemblyError, match=r"1 of 3 parts missing \(fakeparts_part2\); run `pip install fakeparts`"):
        split_model_path(model, tmp_path / "cache")


def test_local_teacher_choice(monkeypatch, tmp_path):
    gguf = tmp_path / "my-model.gguf"
    gguf.write_bytes(b"GGUF")
    assert local_teacher(str(gguf)).path == gguf and local_teacher(str(gguf)).alias == "my-model"
    with pytest.raises(Exception, match="use one of qwen, smollm2"):
        local_teacher(str(tmp_path / "nope.gguf"))
    monkeypatch.setattr(models, "split_model_installed", lambda model=QWEN_TEACHER: False)
    monkeypatch.delenv(models.ENV_LOCAL_TEACHER, raising=False)
    try:
        choice = local_teacher()
    except Exception as exc:  # SmolLM2 not installed either
        pytest.skip(str(exc))
    assert choice.key == "smollm2" and "setup.sh --teacher" in choice.note  # says how to get the better one
    monkeypatch.setenv(models.ENV_LOCAL_TEACHER, "smollm2")
    assert local_teacher().key == "smollm2" and local_teacher().note is None


def test_the_real_teacher_when_installed():
    """The 22 installed parts assemble to the published checksum (skipped where test.sh runs:
    it does not install the 1.1 GB teacher)."""
    if not models.split_model_installed(QWEN_TEACHER):
        pytest.skip("the default offline teacher is not installed (scripts/setup.sh --teacher)")
    parts = split_model_parts(QWEN_TEACHER)
    assert len(parts) == 22 and sum(p.stat().st_size for p in parts) == QWEN_TEACHER.size
    path = models.qwen_gguf_path()
    assert verify_model_file(path, QWEN_TEACHER.size, QWEN_TEACHER.sha256) is None
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert local_teacher("qwen").alias == "qwen2.5-coder-1.5b-instruct"
