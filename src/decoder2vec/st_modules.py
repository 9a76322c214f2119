"""The sentence-transformers module of an ONNX export: :class:`OnnxTransformer`, first in its ``modules.json``.

It tokenizes like sentence-transformers' Transformer and runs ``onnx/model.onnx`` with onnxruntime; the
Pooling modules after it are stock ones. sentence-transformers' own ``backend="onnx"`` goes through Optimum,
whose only ONNX release (optimum-onnx 0.1.0) requires transformers < 4.58 and does not import with
transformers 5; this module needs neither. An empty text, which has no tokens with a tokenizer that adds
none around a text, reads one filler token (BOS, else EOS, else pad) as :func:`decoder2vec.inputs.tokenize`
does, where the stock module fails inside the model's attention (``cannot reshape tensor of 0 elements``).

sentence-transformers 6 imports a module class of another package only with ``trust_remote_code=True``::

    model = SentenceTransformer("exports/smollm2-onnx", backend="onnx", trust_remote_code=True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sentence_transformers.base.modules.input_module import InputModule

from .inputs import _filler_id as filler_id  # the token an empty text reads in decoder2vec itself
from .onnx_runtime import ONNX_FILE, onnx_session

__all__ = ["OnnxTransformer", "with_filler"]


def with_filler(features: dict[str, Any], filler: int) -> dict[str, Any]:
    """Give every row without a real token one: ``filler`` at position 0 (padding is on the right)."""
    ids, mask = features.get("input_ids"), features.get("attention_mask")
    if ids is None or mask is None:
        return features
    if ids.shape[1] == 0:  # only empty texts in the batch
        ids = torch.full((ids.shape[0], 1), filler, dtype=ids.dtype)
        mask = torch.ones((mask.shape[0], 1), dtype=mask.dtype)
    empty = mask.sum(dim=1) == 0  # (batch,)
    if empty.any():
        ids, mask = ids.clone(), mask.clone()
        ids[empty, 0] = filler
        mask[empty, 0] = 1
    features["input_ids"], features["attention_mask"] = ids, mask
    return features


class OnnxTransformer(InputModule):
    """Tokenize texts and run an exported decoder2vec ONNX graph; writes ``token_embeddings`` for Pooling.

    ``model_name_or_path`` is the export folder (tokenizer, ``config.json``, ``onnx/model.onnx``).
    """

    config_file_name = "sentence_bert_config.json"
    config_keys = ["max_seq_length", "onnx_file"]
    save_in_root = True

    def __init__(
        self,
        model_name_or_path: str,
        max_seq_length: int = 512,
        onnx_file: str = ONNX_FILE,
        threads: int | None = None,
    ):
        super().__init__()
        from transformers import AutoConfig, AutoTokenizer

        self.folder = Path(model_name_or_path)
        self.max_seq_length = max_seq_length
        self.onnx_file = onnx_file
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.dimension = AutoConfig.from_pretrained(self.folder).get_text_config().hidden_size
        self.session = onnx_session(self.folder / onnx_file, threads)

    def preprocess(self, inputs: Sequence[str], prompt: str | None = None, **kwargs) -> dict[str, Any]:
        texts = [prompt + text for text in inputs] if prompt else list(inputs)
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
        )
        features = with_filler(
            {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]},
            filler_id(self.tokenizer),
        )
        if prompt:  # for Pooling(include_prompt=False): the prompt's tokens, special tokens around it included
            prompt_ids = self.tokenizer([prompt])["input_ids"][0]
            trailing = len(prompt_ids) > 0 and prompt_ids[-1] in self.tokenizer.all_special_ids
            features["prompt_length"] = len(prompt_ids) - int(trailing)
        return features

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        feeds = {
            "input_ids": features["input_ids"].cpu().numpy().astype("int64"),
            "attention_mask": features["attention_mask"].cpu().numpy().astype("int64"),
        }
        (hidden,) = self.session.run(["last_hidden_state"], feeds)
        features["token_embeddings"] = torch.from_numpy(hidden).to(features["attention_mask"].device)
        return features

    def get_embedding_dimension(self) -> int:
        return self.dimension

    def save(self, output_path: str, *args, **kwargs) -> None:
        self.save_config(output_path)
        self.save_tokenizer(output_path)
        target = Path(output_path) / self.onnx_file
        if not target.exists():  # saving a loaded model elsewhere: the graph goes along
            import shutil

            target.parent.mkdir(parents=True, exist_ok=True)
            for source in (self.folder / self.onnx_file).parent.glob(Path(self.onnx_file).name + "*"):
                shutil.copy2(source, target.parent / source.name)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", backend: str = "onnx", **kwargs) -> OnnxTransformer:
        if backend == "openvino":
            raise ValueError("this folder holds an ONNX graph run by onnxruntime; load it with backend='onnx'")
        loading = {k: kwargs[k] for k in ("token", "cache_folder", "revision", "local_files_only") if k in kwargs}
        folder = cls.load_dir_path(model_name_or_path, subfolder=subfolder, **loading)
        config = cls.load_config(model_name_or_path, subfolder=subfolder, **loading)
        return cls(os.fspath(folder), **{k: v for k, v in config.items() if k in cls.config_keys})
