"""int8 on the CPU with PyTorch: dynamic int8 linear layers made accurate enough for bidirectional decoders.

PyTorch's fast int8 linear (x86/fbgemm) rounds activations with one scale for the whole batch, in 7 bits on x86
(``reduce_range``), and models with bidirectional attention do not tolerate it (``bench/int8_sensitivity.py``):
a few input channels carry outliers far larger than the rest, a few tokens (BOS) too, and one coarse scale rounds
everything else away. :class:`Int8Linear` keeps the same int8 kernel and changes what it is fed, three ways:

1. SmoothQuant (Xiao et al., 2023, arXiv:2211.10438) moves the channels' range into the weights, exactly in
   float: with one scale ``s_j`` per input channel, ``x @ W.T == (x / s) @ (W * s).T`` where
   ``s_j = max|x_j| ** alpha / max|W[:, j]| ** (1 - alpha)``; ``max|x_j|`` is calibrated on
   :data:`INT8_CALIBRATION_TEXTS`, and :func:`check_int8` then proves the result on other texts.
2. Per-token activation scales from a per-tensor kernel: each row of ``x / s`` is divided by its own peak
   before the kernel (so the batch's one scale fits every row alike) and the output row multiplied back; the
   product is linear in each row, so this is exact in float. Padding and other texts no longer widen a
   text's scale.
3. Activations in 8 bits instead of 7, weights per output channel in 7 (``[-63, 63]``): without AVX-512 VNNI
   the kernel adds pairs of u8 x s8 products in int16 with saturation, which 7-bit activations avoid; 7-bit
   weights avoid it as well (255 * 63 * 2 < 32767) and cost less accuracy than 7-bit activations.

    peaks = input_peaks(encoder.backbone, lambda: encoder.encode(INT8_CALIBRATION_TEXTS, show_progress=False))
    model = quantize_dynamic_int8(encoder.model, input_peaks=peaks)  # every decoder linear: an Int8Linear
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch.ao.quantization import PerChannelMinMaxObserver, QConfig
from torch.ao.quantization.observer import default_dynamic_quant_observer

from .eval.common import cosine_scores

__all__ = [
    "INT8_CALIBRATION_TEXTS",
    "INT8_MIN_COSINE",
    "INT8_PROBE_TEXTS",
    "Int8Linear",
    "QUANTIZATIONS",
    "SMOOTHING_ALPHA",
    "QuantizationError",
    "check_int8",
    "input_peaks",
    "quantize_dynamic_int8",
    "smoothed_linear",
    "smoothing_scales",
]

QUANTIZATIONS = ("int8",)
# an int8 encoder must keep every probe vector this close (cosine) to its float32 one (issue 13's bound)
INT8_MIN_COSINE = 0.99
INT8_PROBE_TEXTS = [
    "A man is playing a guitar.",
    "Unusual characters: tab\there, emoji 🙂, accents éàü, symbols <s> </s> [SEP].",
    "The president gave a long speech about the economy, jobs, and taxes to a large crowd.",
    "Two dogs run.",
    "",
    "x",
]
# what the smoothing scales are calibrated on: varied lengths, topics and characters, none of the probe texts
# (the probe check stays a check) and none of the benchmark sentences
INT8_CALIBRATION_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Stocks fell sharply on Monday after the central bank raised interest rates again.",
    "How do I reset my password if I no longer have access to my email account?",
    "A young girl in a red coat is feeding ducks by the pond.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "def add(a, b):\n    return a + b  # a tiny Python function",
    "The meeting has been moved to Thursday, 3:30 pm, room 214.",
    "Il pleut depuis ce matin et les rues sont presque vides.",
    "Der Zug nach Berlin hat heute zwanzig Minuten Verspätung.",
    "Researchers reported that the new vaccine was 94.5% effective in a trial of 30,000 people.",
    "Oh no!!! I can't believe it's already over :( see you next year",
    "Two men are playing chess in the park while a crowd watches.",
    "Mix the flour, sugar and butter, then bake for 25 minutes at 180 °C.",
    "The court ruled that the contract was void because neither party had signed it.",
    "Q: What is the capital of Australia? A: Canberra.",
    "Buy now: 50% off all shoes, today only! Free shipping on orders over $40.",
    "Mitochondria",
    "ok",
    "In 1969, Apollo 11 landed on the Moon and Neil Armstrong became the first person to walk on its surface, "
    "followed a few minutes later by Buzz Aldrin, while Michael Collins stayed in orbit aboard the command module.",
    "SELECT name, price FROM products WHERE price < 10 ORDER BY name;",
    "東京は日本の首都です。",
    "The patient was given 5 mg of the drug twice a day for two weeks.",
    "A woman is riding a horse along the beach at sunset.",
    "Why is the sky blue?",
]
# how much of the activations' range moves into the weights (SmoothQuant's migration strength); of 0.5, 0.6,
# 0.65 and 0.75, 0.65 kept Gemma 3 270M's vectors closest (bench/results/int8_sensitivity_smooth.txt)
SMOOTHING_ALPHA = 0.65


class QuantizationError(ValueError):
    """int8 moves this model's vectors too far from its float32 ones."""


def check_int8(float_vectors: np.ndarray, int8_vectors: np.ndarray, what: str) -> float:
    """The smallest cosine between the int8 and float32 probe vectors; raises below :data:`INT8_MIN_COSINE`."""
    cosine = float(cosine_scores(int8_vectors, float_vectors).min())
    if cosine < INT8_MIN_COSINE:
        raise QuantizationError(
            f"{what} moves this model's vectors too far: a cosine of only {cosine:.4f} with its float32 vectors on "
            f"probe texts (required {INT8_MIN_COSINE}). Some models (SmolLM2 with bidirectional attention among "
            "them) are too sensitive to int8 rounding; run this one in float32 (an fp32 ONNX export "
            "is the faster CPU path) and see docs/inference.md"
        )
    return cosine


def _decoder_linears(decoder: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: module for name, module in decoder.named_modules() if isinstance(module, torch.nn.Linear)}


def input_peaks(decoder: torch.nn.Module, run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """``max |x_j|`` per input channel of every linear layer of ``decoder`` over the inputs ``run()`` feeds it.

    Keys are the layers' names in ``decoder`` (``layers.0.self_attn.q_proj``); values are ``(in_features,)``.
    Padded positions count too: they run through every layer like the text they pad.
    """
    peaks: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args):
            peak = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float().cpu()
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in _decoder_linears(decoder).items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return peaks


def smoothing_scales(input_peak: torch.Tensor, weight: torch.Tensor, alpha: float = SMOOTHING_ALPHA) -> torch.Tensor:
    """SmoothQuant's per-input-channel scales ``max|x_j| ** alpha / max|W[:, j]| ** (1 - alpha)``: ``(in,)``.

    Channels never seen active, or whose weights are all zero, keep a finite scale (floors of 1e-5).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha is a fraction in [0, 1], not {alpha}")
    weight_peak = weight.detach().abs().amax(dim=0).float().clamp(min=1e-5)  # (in,)
    return (input_peak.float().clamp(min=1e-5) ** alpha / weight_peak ** (1 - alpha)).clamp(min=1e-5)


def smoothed_linear(linear: torch.nn.Linear, scales: torch.Tensor) -> torch.nn.Linear:
    """A float copy of ``linear`` with each input column ``j`` of its weight multiplied by ``scales[j]``.

    ``smoothed_linear(linear, s)(x / s)`` equals ``linear(x)`` up to float rounding.
    """
    out = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_(linear.weight.float() * scales.float())
        if linear.bias is not None:
            out.bias.copy_(linear.bias.float())
    return out


# 7-bit weights per output channel: with 8-bit activations, a pair of products stays within int16 (see above)
_WEIGHT_QCONFIG = QConfig(
    activation=default_dynamic_quant_observer,
    weight=PerChannelMinMaxObserver.with_args(
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-63, quant_max=63
    ),
)


class Int8Linear(torch.nn.Module):
    """``linear(x)`` with PyTorch's dynamic int8 kernel: smoothed, per-token scaled, 8-bit activations.

    ``scales`` are the smoothing scales (:func:`smoothing_scales`); ``None`` leaves the channels as they are.
    """

    def __init__(self, linear: torch.nn.Linear, scales: torch.Tensor | None = None):
        super().__init__()
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        scales = torch.ones(linear.in_features) if scales is None else scales.float()
        smoothed = smoothed_linear(linear, scales)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("inverse_scales", (1 / scales).contiguous())  # (in,)
        self.register_buffer("bias", None if smoothed.bias is None else smoothed.bias.detach().clone())  # (out,)
        smoothed.bias, smoothed.qconfig = None, _WEIGHT_QCONFIG  # the bias is added after scaling back
        with warnings.catch_warnings():  # torch.ao's eager quantization is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            self.inner = DynamicLinear.from_float(smoothed)  # holds the int8 weights, packed for the kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.inverse_scales  # (..., in)
        peak = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-20)  # (..., 1): one scale per token
        # reduce_range=False: 8-bit activations (the module's forward would use 7); safe with 7-bit weights
        y = torch.ops.quantized.linear_dynamic(x.div_(peak), self.inner._packed_params._packed_params, False)
        y = y.to(x.dtype).mul_(peak)  # (..., out)
        return y if self.bias is None else y.add_(self.bias)


def quantize_dynamic_int8(
    model: torch.nn.Module,
    quantize: str = "int8",
    input_peaks: dict[str, torch.Tensor] | None = None,
    alpha: float = SMOOTHING_ALPHA,
) -> torch.nn.Module:
    """PyTorch's dynamic int8 (x86/fbgemm engine) for every linear layer of the decoder; adapters merged first.

    Every linear layer becomes an :class:`Int8Linear`, smoothed when ``input_peaks`` is given (from
    :func:`input_peaks` on ``model.base_model``, the float model after merging). The LM head is left out:
    encoding never runs it, and for tied embeddings an int8 copy would add memory instead of saving it.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    decoder = model.base_model
    linears = _decoder_linears(decoder)
    if input_peaks is not None and set(linears) - set(input_peaks):
        missing = sorted(set(linears) - set(input_peaks))
        raise ValueError(f"no calibrated input peaks for {missing[:3]}...; calibrate the merged model's decoder")
    for name, linear in linears.items():
        scales = None if input_peaks is None else smoothing_scales(input_peaks[name], linear.weight, alpha)
        new = Int8Linear(linear, scales)
        parent, _, child = name.rpartition(".")
        setattr(decoder.get_submodule(parent) if parent else decoder, child, new)
    return model
