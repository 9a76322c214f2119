"""ONNX export: an Encoder's decoder as an ONNX graph, fp32 or dynamic int8, checked against the Encoder.

The graph (``onnx/model.onnx``) maps ``input_ids`` and ``attention_mask`` ``(batch, sequence)`` to
``last_hidden_state`` ``(batch, sequence, dim)``; batch and sequence are dynamic. It is traced with
``torch.onnx.export(dynamo=True)`` from the merged decoder (every LoRA adapter merged in) with
``config.is_causal = False``, so the mask built inside the graph is the padding-only bidirectional mask, and
the position ids are computed in the graph from the attention mask as ``decoder2vec.inputs.pad_batch``
computes them. Pooling is not in the graph: sentence-transformers' Pooling module (see ``export.py``) or
the Encoder's own pooling reads the states.

``quantize="int8"``: onnxruntime's dynamic quantization of every MatMul/Gemm weight to int8 (per tensor,
signed; activations are quantized per batch at run time). On the 2-core AVX2 CPU it was the fastest int8
path measured: a SmolLM2-shaped 2-layer stack (32 x 14 tokens, 1 thread) ran in 50-66 ms against 61-97 ms
for PyTorch's dynamic int8 (x86/fbgemm/onednn engines), 83-87 ms for onnxruntime fp32 and 110-138 ms for
PyTorch fp32.

Every export is checked before it is kept: the attention probe runs on the graph (the first token must
read the last one; padding must not leak), and the graph's vectors are compared with the Encoder's on
probe texts; the measured difference is saved in ``decoder2vec_onnx.json`` and the model card.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .eval.common import cosine_scores
from .model import INT8_MIN_COSINE, INT8_PROBE_TEXTS, check_int8
from .onnx_runtime import ONNX_FILE, OnnxModel

__all__ = [
    "INT8_MIN_COSINE",
    "ONNX_QUANTIZATIONS",
    "PRECISION_FILE",
    "cached_onnx_folder",
    "export_graph",
    "write_onnx",
]

logger = logging.getLogger(__name__)

ONNX_QUANTIZATIONS = ("int8",)
PRECISION_FILE = "decoder2vec_onnx.json"  # precision of the graph and its measured difference from the Encoder
# fp32 graph vs the torch Encoder on the probe texts: rounding only (issue 13's bound for vectors), relative to
# each vector's scale (its largest component): a 135M model's pooled states reach ~10^2, where float32 rounding
# of a different kernel order alone moves the last digits by ~10^-4 in absolute terms
FLOAT32_TOLERANCE = 1e-4


class _Graph(torch.nn.Module):
    """What the ONNX graph computes: (input_ids, attention_mask) -> last hidden states, positions from the mask."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # as decoder2vec.inputs.pad_batch
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state


def export_graph(backbone: torch.nn.Module, path: Path) -> None:
    """Trace ``backbone`` (bidirectional already, float32) into an ONNX graph at ``path``."""
    graph = _Graph(backbone).eval()
    low = min(10, backbone.config.vocab_size - 5)
    ids = torch.tensor([[low, low + 1, low + 2, low + 3, low + 4], [low, low + 1, low + 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # a padded row, so the padding path is traced
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    axes = {0: batch, 1: sequence}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation and tracing notices
        program = torch.onnx.export(
            graph,
            (ids, mask),
            dynamo=True,
            dynamic_shapes={"input_ids": axes, "attention_mask": axes},
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            optimize=True,
            verbose=False,
        )
    size = sum(p.numel() * p.element_size() for p in backbone.parameters())
    program.save(os.fspath(path), external_data=size > 1_500_000_000)  # protobuf files stop at 2 GB


def _quantize_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime logs a generic pre-processing advice on the root logger
    try:
        quantize_dynamic(
            source,
            target,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=False,  # per channel was slower on AVX2 (65 vs 53 ms above) for no gain in cosine
            reduce_range=False,
            use_external_data_format=source.with_name(source.name + ".data").exists(),
        )
    finally:
        root.setLevel(level)


def write_onnx(encoder, folder: Path, quantize: str | None = None) -> dict:
    """Write ``onnx/model.onnx``, ``config.json`` and the Encoder's settings into ``folder`` (not the tokenizer).

    Returns what was measured (precision, difference from ``encoder`` on probe texts); raises
    :class:`~decoder2vec.export.ExportError` when the graph is not bidirectional or differs too much.
    """
    from .export import ExportError, merged_model
    from .model import Encoder

    if quantize is not None and quantize not in ONNX_QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of: {', '.join(ONNX_QUANTIZATIONS)}")
    model = merged_model(encoder)
    if next(model.parameters()).dtype != torch.float32:
        model = copy.deepcopy(model).float()
    backbone = model.base_model  # the decoder without its LM head
    (folder / "onnx").mkdir()
    graph_path = folder / ONNX_FILE
    export_graph(backbone, graph_path)
    architectures = backbone.config.architectures
    try:
        backbone.config.save_pretrained(folder)
    finally:
        backbone.config.architectures = architectures  # save_pretrained renames them on the shared config
    encoder.config.save(folder)

    reference = Encoder(model, encoder.tokenizer, encoder.config, source=encoder.source).eval()
    exported = Encoder(OnnxModel(folder), encoder.tokenizer, encoder.config, source=encoder.source).eval()
    exported.verify_attention()  # on the float32 graph: token 0 reads the last token; padding does not leak
    if quantize is not None:
        float_path = graph_path.with_name("float32.onnx")
        for part in graph_path.parent.glob(graph_path.name + "*"):  # the graph and any external data file
            part.rename(part.with_name(part.name.replace(graph_path.name, float_path.name)))
        _quantize_int8(float_path, graph_path)
        for leftover in graph_path.parent.glob(float_path.name + "*"):
            leftover.unlink()
        exported = Encoder(OnnxModel(folder), encoder.tokenizer, encoder.config, source=encoder.source).eval()
    theirs = exported.encode(INT8_PROBE_TEXTS, batch_size=3)
    ours = reference.encode(INT8_PROBE_TEXTS, batch_size=3)
    measured = {
        "precision": "int8" if quantize else "float32",
        "quantization": "onnxruntime dynamic int8: MatMul/Gemm weights per tensor, activations per batch"
        if quantize
        else None,
        "bidirectional": encoder.config.bidirectional,  # proven on the float32 graph by the attention probe
        "max_abs_difference": float(np.abs(theirs - ours).max()),
        "max_relative_difference": float(_relative_differences(theirs, ours).max()),
        "min_cosine": float(cosine_scores(theirs, ours).min()),
        "checked_texts": len(INT8_PROBE_TEXTS),
        "opset": _opset(graph_path),
    }
    if quantize is None and measured["max_relative_difference"] > FLOAT32_TOLERANCE:
        raise ExportError(
            f"the ONNX graph's vectors differ from the Encoder's by {measured['max_relative_difference']:.2e} of "
            f"their largest component (allowed {FLOAT32_TOLERANCE:.0e}); this architecture does not export faithfully"
        )
    if quantize is not None:
        try:
            check_int8(ours, theirs, "onnxruntime's dynamic int8")
        except ValueError as error:
            raise ExportError(f"{error}; export without --quantize") from None
    (folder / PRECISION_FILE).write_text(json.dumps(measured, indent=2) + "\n")
    return measured


def _relative_differences(theirs: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """Per vector: the largest absolute difference over the largest absolute component of ``ours``."""
    scale = np.maximum(np.abs(ours).max(axis=1), 1e-12)
    return np.abs(theirs - ours).max(axis=1) / scale


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


# ---------------------------------------------------------------------- cache for Encoder.from_pretrained
def cached_onnx_folder(source: str, adapters: list[str], config, quantize: str | None) -> Path:
    """An ONNX export of (source, adapters) in the cache, made once (``Encoder.from_pretrained(quantize=...)``).

    The graph depends only on the weights and the attention settings, not on pooling or prompts (the
    Encoder applies those), so the key covers the model folder's files (name, size, modification time),
    the adapters' weights, ``bidirectional`` and ``attn_implementation``, the precision and the versions of
    the libraries that write the graph.
    """
    from .export import export_model
    from .model import Encoder, _adapter_fingerprint
    from .sources import cache_dir, resolve_source

    resolved = resolve_source(source)
    graph_settings = {"bidirectional": config.bidirectional, "attn_implementation": config.attn_implementation}
    key = {
        "source": _folder_fingerprint(resolved),
        "adapters": [_adapter_fingerprint(a) for a in adapters],
        "settings": graph_settings,
        "quantize": quantize,
        "versions": _versions(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    folder = cache_dir() / "onnx" / f"{Path(resolved).name}-{quantize or 'float32'}-{digest}"
    if not (folder / ONNX_FILE).is_file():
        logger.info("exporting %s to ONNX (%s) once, into %s", source, quantize or "float32", folder)
        encoder = Encoder.from_pretrained(
            resolved, adapter=adapters or None, dtype="float32", device="cpu", backend="torch", **graph_settings
        )
        encoder.source = os.fspath(source)
        export_model(encoder, folder, format="onnx", quantize=quantize, overwrite=True)
    return folder


def _folder_fingerprint(resolved: str) -> list:
    path = Path(resolved)
    if not path.is_dir():
        return [resolved]  # a hub id: its name (transformers' own cache holds the revision)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return [os.path.realpath(path)] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _versions() -> dict:
    from importlib import metadata

    found = {}
    for package in ("decoder2vec", "torch", "transformers", "onnx", "onnxruntime", "onnxscript"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found
