"""How far int8 rounding moves a model's sentence vectors, by quantization scheme (simulated in float32).

Every linear layer of the decoder (not the LM head) computes ``linear(q(x), q(W))`` where ``q`` rounds to
symmetric int8 and back, with one scale per tensor, per token (activations: one row of ``x``) or per output
channel (weights: one row of ``W``), or leaves its operand in float32. Nothing runs in int8 arithmetic, so the
figures isolate rounding from kernels: they say which scheme an int8 path must implement for a model to keep its
vectors (issue 13's check: cosine >= 0.99 to the float32 vector, per vector), whatever the speed.

Schemes: PyTorch's and onnxruntime's dynamic int8 round activations per tensor (the whole batch shares one
scale), with weights per tensor or (PyTorch's ``per_channel_dynamic_qconfig``) per output channel; LLM.int8-style
per-token activations with per-channel weights is the finest here.

``--smooth``: every scheme again with SmoothQuant scales (``decoder2vec.int8``): per input channel
``s_j = max|x_j| ** a / max|W[:, j]| ** (1 - a)``, ``x / s`` and ``W * s`` rounded instead of ``x`` and ``W``
(the same product in float). ``max|x_j|`` is calibrated on ``decoder2vec.int8.INT8_CALIBRATION_TEXTS``, none of
which are STS-B sentences. ``--fbgemm``: PyTorch's real dynamic int8 kernels too, with the seconds of one pass
(noisy on a shared machine): ``tensor7`` is PyTorch's own dynamic int8 linear (activations per tensor,
asymmetric, 7 bits: ``reduce_range`` on x86), before and with per-channel weights and smoothing; ``decoder2vec``
is ``decoder2vec.int8.Int8Linear`` as ``Encoder.from_pretrained(quantize="int8", backend="torch")`` runs it
(per-token activation scales in 8 bits, per-channel weights in 8 bits with VNNI and 7 without, on the engine
``decoder2vec.int8.int8_kernel`` picks, smoothing; every layer in int8: no mixed precision here).

    python bench/int8_sensitivity.py --model smollm2-135m [--adapter DIR ...] [--causal] [--pairs 150]
        [--smooth] [--alpha 0.5 ...] [--fbgemm [--no-simulation]]
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import numpy as np
import torch

from decoder2vec import Encoder
from decoder2vec.catalog import resolve_dataset
from decoder2vec.int8 import (
    INT8_CALIBRATION_TEXTS,
    SMOOTHING_ALPHA,
    input_peaks,
    quantize_dynamic_int8,
    smoothed_linear,
    smoothing_scales,
)

SCHEMES = [  # (activations, weights); None: float32
    ("tensor", "tensor"),
    ("tensor", "channel"),
    ("token", "tensor"),
    ("token", "channel"),
    (None, "tensor"),
    (None, "channel"),
    ("tensor", None),
]


def rounded(x: torch.Tensor, per: str | None) -> torch.Tensor:
    """``x`` rounded to symmetric int8 and back: one scale for the tensor, or one per row (token or channel)."""
    if per is None:
        return x
    peak = x.abs().amax(dim=-1, keepdim=True) if per in ("token", "channel") else x.abs().max()
    scale = peak.clamp(min=1e-12) / 127
    return (x / scale).round().clamp(-127, 127) * scale


def simulate(linears: dict, weights: dict, activations: str | None, per_weight: str | None, scales=None) -> None:
    """Each linear layer rounds its operands per the scheme; with ``scales`` (name -> (in,)), ``x / s`` and ``W * s``."""
    for name, module in linears.items():
        s = scales[name] if scales is not None else torch.ones(module.in_features)
        module.weight.data = rounded(weights[name] * s, per_weight)

        def forward(x, module=module, s=s):
            return torch.nn.functional.linear(rounded(x / s, activations), module.weight, module.bias)

        module.forward = forward


def restore(linears: dict, weights: dict) -> None:
    for name, module in linears.items():
        module.weight.data = weights[name]
        vars(module).pop("forward", None)


class SmoothedTorchInt8(torch.nn.Module):
    """``x / s`` into PyTorch's own dynamic int8 linear of ``W * s`` (7-bit activations per tensor)."""

    def __init__(self, linear: torch.nn.Linear, scales: torch.Tensor):
        super().__init__()
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        smoothed = smoothed_linear(linear, scales)
        smoothed.qconfig = per_channel_dynamic_qconfig
        self.inner, self.inverse_scales = DynamicLinear.from_float(smoothed), 1 / scales

    def forward(self, x):
        return self.inner(x * self.inverse_scales)


def fbgemm(model: torch.nn.Module, scheme: str, peaks: dict | None, alpha: float) -> torch.nn.Module:
    """A copy of ``model`` whose decoder linears run PyTorch's dynamic int8 kernels, per ``scheme``."""
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    model = copy.deepcopy(model)
    if scheme == "decoder2vec":
        return quantize_dynamic_int8(model, input_peaks=peaks, alpha=alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if scheme == "smoothed":
            for name, linear in list(model.base_model.named_modules()):
                if isinstance(linear, torch.nn.Linear):
                    parent, _, child = name.rpartition(".")
                    scales = smoothing_scales(peaks[name], linear.weight, alpha)
                    setattr(model.base_model.get_submodule(parent), child, SmoothedTorchInt8(linear, scales))
            return model
        qconfig = per_channel_dynamic_qconfig if scheme == "channel" else default_dynamic_qconfig
        quantize_dynamic(model.base_model, {torch.nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)
    return model


def report(label: str, vectors: np.ndarray, reference: np.ndarray, seconds: float | None = None) -> None:
    cosine = (vectors * reference).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
    timing = f"{seconds:>8.1f}" if seconds is not None else ""
    print(f"{label:<46}{cosine.min():>12.4f}{cosine.mean():>13.4f}{(cosine >= 0.99).mean():>16.1%}{timing}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", nargs="+", default=None, help="trained adapters, merged first")
    parser.add_argument("--causal", action="store_true", help="keep the causal mask")
    parser.add_argument("--pairs", type=int, default=150, help="STS-B test pairs whose sentences are embedded")
    parser.add_argument("--smooth", action="store_true", help="every scheme again with SmoothQuant scales")
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.5], help="SmoothQuant migration strengths")
    parser.add_argument("--fbgemm", action="store_true", help="PyTorch's real dynamic int8 kernels too")
    parser.add_argument("--no-simulation", action="store_true", help="only the --fbgemm rows")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [line.split("\t") for line in resolve_dataset("stsb:test").read_text().splitlines()[1:]][: args.pairs]
    texts = [r[-2] for r in rows] + [r[-1] for r in rows]
    encoder = Encoder.from_pretrained(
        args.model, adapter=args.adapter, pooling="mean", device="cpu", bidirectional=not args.causal
    )
    if hasattr(encoder.model, "merge_and_unload"):
        encoder.model = encoder.model.merge_and_unload()
    start = time.perf_counter()
    reference = encoder.encode(texts, batch_size=32, show_progress=False)
    seconds = time.perf_counter() - start
    peaks = input_peaks(encoder.backbone, lambda: encoder.encode(INT8_CALIBRATION_TEXTS, show_progress=False))
    linears = {n: m for n, m in encoder.backbone.named_modules() if isinstance(m, torch.nn.Linear)}
    weights = {n: m.weight.data.clone() for n, m in linears.items()}
    mode = "causal" if args.causal else "bidirectional"
    print(f"{args.model} {mode}{' + adapters ' + ' '.join(args.adapter) if args.adapter else ''}, mean pooling, "
          f"{len(texts)} STS-B test sentences, {len(linears)} linear layers simulated ({seconds:.0f} s a float pass); "
          f"smoothing calibrated on {len(INT8_CALIBRATION_TEXTS)} texts")  # fmt: skip
    print(f"{'activations / weights':<46}{'min cosine':>12}{'mean cosine':>13}{'vectors >= 0.99':>16}")
    alphas = args.alpha if args.smooth else []
    for activations, per_weight in [] if args.no_simulation else SCHEMES:
        for alpha in [None, *alphas]:
            scales = None if alpha is None else {n: smoothing_scales(peaks[n], weights[n], alpha) for n in linears}
            simulate(linears, weights, activations, per_weight, scales)
            vectors = encoder.encode(texts, batch_size=32, show_progress=False)
            label = f"{activations or 'float32'} / {per_weight or 'float32'}"
            report(label + (f" + smooth {alpha}" if alpha is not None else ""), vectors, reference)
    restore(linears, weights)
    if not args.fbgemm:
        return
    print(f"{'PyTorch dynamic int8 kernels':<46}{'':>12}{'':>13}{'':>16}{'seconds':>8}")
    float_model = encoder.model
    runs = [("tensor7 / tensor (before)", "tensor", None), ("tensor7 / channel", "channel", None)]
    runs += [(f"tensor7 / channel + smooth {a}", "smoothed", a) for a in args.alpha]
    runs += [("decoder2vec: token8 / channel7", "decoder2vec", None)]
    shipped = sorted({*args.alpha, SMOOTHING_ALPHA})  # what Encoder.from_pretrained(quantize="int8") uses, too
    runs += [(f"decoder2vec: token8 / channel7 + smooth {a}", "decoder2vec", a) for a in shipped]
    start = time.perf_counter()
    encoder.encode(texts, batch_size=32, show_progress=False)
    report("float32 (timing only)", reference, reference, time.perf_counter() - start)
    for label, scheme, alpha in runs:
        encoder.model = fbgemm(float_model, scheme, peaks if alpha is not None else None, alpha or 0.5)
        start = time.perf_counter()
        vectors = encoder.encode(texts, batch_size=32, show_progress=False)
        report(label, vectors, reference, time.perf_counter() - start)
    encoder.model = float_model


if __name__ == "__main__":
    main()
