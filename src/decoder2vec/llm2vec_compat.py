"""Load checkpoints saved in the LLM2Vec reference layout.

The reference (``llm2vec``, McGill-NLP) publishes a model as two folders:

* a *base* folder: a full Hugging Face model (``config.json``, weights, tokenizer) that also holds the
  MNTP LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) to be merged into it;
* an *adapter* folder: the SimCSE or supervised LoRA adapter trained on top of the merged model,
  often with an ``llm2vec_config.json`` (``pooling_mode``, ``max_length``, ``skip_instruction``, ...).

``Encoder.from_pretrained(base, adapter=adapter_folder)`` recognizes the layout: the base weights are
loaded without the embedded adapter, the MNTP adapter is merged, the second adapter stays live, and
pooling comes from ``llm2vec_config.json`` (the adapter folder's first, else the base folder's).
Explicit arguments and a ``decoder2vec_config.json`` still win over it.

Differences from the reference, on purpose: ``eos_token`` pooling reads the tokenizer's real EOS id
(the reference appends the text " </s>"), and instruction tokens are always left out of pooling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LLM2VEC_CONFIG_NAME", "LLM2VecCheckpoint", "detect_llm2vec_checkpoint", "llm2vec_settings"]

logger = logging.getLogger(__name__)

LLM2VEC_CONFIG_NAME = "llm2vec_config.json"
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", LLM2VEC_CONFIG_NAME)
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# llm2vec `pooling_mode` -> EncoderConfig settings
_POOLING = {
    "mean": {"pooling": "mean"},
    "weighted_mean": {"pooling": "weighted_mean"},
    "eos_token": {"pooling": "last_token", "append_eos": True},
    "last_token": {"pooling": "last_token", "append_eos": False},
    "bos_token": {"pooling": "bos"},
}


@dataclass
class LLM2VecCheckpoint:
    """What :meth:`Encoder.from_pretrained` loads instead of the folder it was given."""

    base_folder: str  # the base weights and tokenizer, without the embedded adapter
    adapters: list[str]  # the MNTP adapter first (merged), then the user's adapters
    settings: dict = field(default_factory=dict)  # EncoderConfig fields from llm2vec_config.json


def llm2vec_settings(data: dict) -> dict:
    """EncoderConfig fields for the content of an ``llm2vec_config.json``."""
    settings: dict = {
        "instruction_template": "{instruction} "
    }  # the reference joins instruction and text with a space
    mode = data.get("pooling_mode")
    if mode is not None:
        if mode not in _POOLING:
            raise ValueError(
                f"llm2vec pooling_mode {mode!r} is not supported; supported: {', '.join(_POOLING)}. "
                "Pass pooling=... to Encoder.from_pretrained to choose one."
            )
        settings.update(_POOLING[mode])
    if isinstance(data.get("max_length"), int):
        settings["max_length"] = data["max_length"]
    if data.get("skip_instruction") is False:
        logger.warning("llm2vec_config.json has skip_instruction=false; decoder2vec always leaves instructions out")
    return settings


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / name).is_file() for name in _WEIGHT_FILES)


def _read_llm2vec_config(folders: list[Path]) -> dict:
    for folder in folders:
        path = folder / LLM2VEC_CONFIG_NAME
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON ({error}); fix or remove it") from error
    return {}


def detect_llm2vec_checkpoint(source: str, adapters: list[str]) -> LLM2VecCheckpoint | None:
    """The LLM2Vec layout behind ``source`` (+ ``adapters``), or None for an ordinary folder."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    embedded = (folder / "adapter_config.json").is_file() and _has_weights(folder)
    config = _read_llm2vec_config([Path(a) for a in reversed(adapters)] + [folder])
    if not embedded and not config:
        return None
    settings = llm2vec_settings(config) if config else {}
    if not embedded:
        return LLM2VecCheckpoint(base_folder=source, adapters=list(adapters), settings=settings)
    logger.info("LLM2Vec layout: merging the adapter embedded in %s into its base weights", source)
    return LLM2VecCheckpoint(base_folder=str(_base_view(folder)), adapters=[source, *adapters], settings=settings)


def _base_view(folder: Path) -> Path:
    """A folder of links to ``folder``'s files minus its adapter, so transformers loads the plain base model.

    (transformers attaches an adapter it finds next to the weights as a live adapter; here it must be merged.)
    """
    from .sources import cache_dir

    folder = folder.resolve()
    key = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    view = cache_dir() / "llm2vec-base" / f"{folder.name}-{key}"
    view.mkdir(parents=True, exist_ok=True)
    wanted = {p.name: p for p in folder.iterdir() if p.is_file() and p.name not in _ADAPTER_FILES}
    for stale in view.iterdir():
        if stale.name not in wanted or os.path.realpath(stale) != str(wanted[stale.name]):
            stale.unlink()
    for name, target in wanted.items():
        link = view / name
        if not link.exists():
            try:
                link.symlink_to(target)
            except OSError:  # no symlinks (some Windows setups): a hard link, else a copy
                _link_or_copy(target, link)
    return view


def _link_or_copy(target: Path, link: Path) -> None:
    import shutil

    try:
        os.link(target, link)
    except OSError:
        shutil.copy2(target, link)
