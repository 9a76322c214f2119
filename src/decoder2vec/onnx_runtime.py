"""Run an exported ONNX graph with onnxruntime, in place of the Hugging Face model inside an Encoder.

``decoder2vec export OUT --format onnx`` writes ``OUT/onnx/model.onnx``: a graph from ``input_ids`` and
``attention_mask`` (both ``(batch, sequence)`` int64) to ``last_hidden_state`` ``(batch, sequence, dim)``
float32, with the bidirectional mask and the position ids (counting real tokens, so left padding works)
built inside it. :class:`OnnxModel` runs that graph and answers the few things an
:class:`~decoder2vec.model.Encoder` asks of its model (its config, its backbone, its device), so
tokenizing, pooling and everything after stay the Encoder's own code::

    encoder = Encoder.from_pretrained("exports/smollm2-onnx")  # onnxruntime; no torch weights are read
    vectors = encoder.encode(["A cat sits."])

The Encoder proves bidirectional attention on load by running its attention probe on the graph itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["ONNX_FILE", "OnnxModel", "has_onnx_graph", "onnx_session"]

ONNX_FILE = "onnx/model.onnx"  # where sentence-transformers (and optimum) look for a model's ONNX graph


def has_onnx_graph(folder: str | os.PathLike) -> bool:
    return (Path(folder) / ONNX_FILE).is_file()


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session for ``path`` using ``threads`` threads (default: torch's thread count)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


@dataclass
class _Output:
    last_hidden_state: torch.Tensor  # (batch, seq, dim) float32


class OnnxModel(torch.nn.Module):
    """An exported graph run by onnxruntime, shaped like the ``*ForCausalLM`` an Encoder holds.

    ``config`` is the folder's Hugging Face configuration; ``base_model`` is the model itself (there is no
    LM head); calling it with a padded batch returns ``last_hidden_state``. ``position_ids`` are accepted and
    not passed on: the graph computes the same ones (real tokens counted from 0) from the attention mask.
    The graph runs on the CPU; its one empty parameter only tells ``Encoder.device`` and the attention probe
    where outputs live and in which dtype.
    """

    backend = "onnx"

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        super().__init__()
        from transformers import AutoConfig

        folder = Path(folder)
        self.config = AutoConfig.from_pretrained(folder)
        self.path = folder / ONNX_FILE
        self.session = onnx_session(self.path, threads)
        self._inputs = {node.name for node in self.session.get_inputs()}
        self._where = torch.nn.Parameter(torch.empty(0), requires_grad=False)

    @property
    def base_model(self) -> OnnxModel:
        return self

    def forward(self, input_ids, attention_mask, position_ids=None, use_cache=False, **unused) -> _Output:
        feeds = {"input_ids": _int64(input_ids), "attention_mask": _int64(attention_mask)}
        (hidden,) = self.session.run(["last_hidden_state"], {k: v for k, v in feeds.items() if k in self._inputs})
        return _Output(last_hidden_state=torch.from_numpy(hidden))

    def __deepcopy__(self, memo):  # an onnxruntime session cannot be copied; a replica opens the file again
        return OnnxModel(self.path.parent.parent, self.session.get_session_options().intra_op_num_threads)


def _int64(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.ascontiguousarray(values, dtype=np.int64)
