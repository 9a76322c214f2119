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
3. Activations in 8 bits instead of 7 and weights per output channel. The engine and the weights' range follow
   the CPU (:func:`int8_kernel`): with VNNI (AVX-512 VNNI, and AMX on newer Xeons) the products add up in int32,
   weights keep 8 bits (``[-127, 127]``) and the oneDNN engine runs them (its kernel alone 3-8x a float32
   linear layer at Gemma 3 270M's sizes with AMX, x86/fbgemm's 2.6-3.1x; one thread, 768 tokens; see
   ``bench/results/encode_int8_gemma3_amx.txt``). Without VNNI the kernels add
   pairs of u8 x s8 products in int16 with saturation, so weights get 7 bits (``[-63, 63]``: 255 * 63 * 2 < 32767)
   on PyTorch's default engine (x86), which costs less accuracy than 7-bit activations.

Layers that read one input (q, k and v; gate and up; found by :func:`calibrate`) share one smoothing, one
quantized input and one kernel call (:class:`Int8SharedInput`). The token embedding table, most of a small
model's weights, becomes an :class:`Int8Embedding` (a scale per block of 32 values), and
:func:`release_float_weights` then drops the LM head and every float32 copy of the checkpoint, so that the
process holds the int8 weights, not both.

Some layers still cost too much (Gemma 3 270M's ``layers.0.mlp.down_proj``): :func:`quantize_int8_checked`
puts every layer in int8, and if a vector of :data:`INT8_RULE_TEXTS` (the calibration texts and the empty text)
is then further than :data:`INT8_MIN_COSINE` from float32, ranks the units (a layer, a group of siblings, the
embedding table) by how much each one alone back in float32 brings the worst of them back, and keeps them in
float32 in that order until every one passes, at most :data:`INT8_MAX_FLOAT_FRACTION` of them; the probe check
(:func:`check_int8`) then decides on other texts.

    float_layers = quantize_int8_checked(encoder.backbone, lambda texts: encoder.encode(texts, show_progress=False))
    # every decoder linear is an Int8Linear now and the embedding table an Int8Embedding, but those in float_layers

Lower level, every layer in int8:

    calibration = calibrate(encoder.backbone, lambda: encoder.encode(INT8_CALIBRATION_TEXTS, show_progress=False))
    model = quantize_dynamic_int8(encoder.model, input_peaks=calibration)  # an Int8Linear or an Int8Slice each
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.ao.quantization import PerChannelMinMaxObserver, QConfig
from torch.ao.quantization.observer import default_dynamic_quant_observer

from .eval.common import cosine_scores

logger = logging.getLogger(__name__)

__all__ = [
    "INT8_CALIBRATION_TEXTS",
    "INT8_ENGINE_VARIABLE",
    "INT8_MAX_FLOAT_FRACTION",
    "INT8_MIN_COSINE",
    "INT8_ONE_FORM_TEXTS",
    "INT8_PROBE_TEXTS",
    "INT8_RANKING_TEXTS",
    "INT8_RULE_TEXTS",
    "Calibration",
    "Int8Embedding",
    "Int8Kernel",
    "Int8Linear",
    "Int8SharedInput",
    "Int8Slice",
    "QUANTIZATIONS",
    "SMOOTHING_ALPHA",
    "QuantizationError",
    "calibrate",
    "check_int8",
    "concatenated_linear",
    "cosines_with_one_float32_layer",
    "input_peaks",
    "int8_embedding",
    "int8_kernel",
    "quantize_dynamic_int8",
    "quantize_int8_checked",
    "release_float_weights",
    "smoothed_linear",
    "smoothing_scales",
]

QUANTIZATIONS = ("int8",)
# an int8 encoder must keep every probe vector this close (cosine) to its float32 one (issue 13's bound)
INT8_MIN_COSINE = 0.99
# at most this share of the decoder's int8 layers (linear layers and the embedding table; at least one) may stay in
# float32 to pass the check; a model that needs more is refused: it would be neither an int8 model nor much faster
# than float32
INT8_MAX_FLOAT_FRACTION = 0.1
# how many of the rule texts that int8 moves too far (the worst first) rank the layers to keep in float32
INT8_RANKING_TEXTS = 4
# names PyTorch's quantized engine to use instead of the one int8_kernel picks for this CPU (onednn, x86, fbgemm)
INT8_ENGINE_VARIABLE = "DECODER2VEC_INT8_ENGINE"
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
# the texts whose vectors decide which layers stay in float32: the calibration texts and the empty text. The empty
# text has one form (the BOS token alone, or nothing), so checking it here proves the vector of every empty row; it
# is the probe text int8 moved furthest on Gemma 3 270M with a trained adapter (cosine 0.982: BOS alone carries the
# model's largest activations)
INT8_ONE_FORM_TEXTS = [""]
INT8_RULE_TEXTS = [*INT8_CALIBRATION_TEXTS, *INT8_ONE_FORM_TEXTS]
# how much of the activations' range moves into the weights (SmoothQuant's migration strength); of 0.5, 0.6,
# 0.65 and 0.75, 0.65 kept Gemma 3 270M's vectors closest (bench/results/int8_sensitivity_smooth.txt)
SMOOTHING_ALPHA = 0.65


class QuantizationError(ValueError):
    """int8 moves this model's vectors too far from its float32 ones."""


def check_int8(
    float_vectors: np.ndarray, int8_vectors: np.ndarray, what: str, float_layers: list[str] | None = None
) -> float:
    """The smallest cosine between the int8 and float32 probe vectors; raises below :data:`INT8_MIN_COSINE`.

    ``float_layers``: the layers left in float32 (:func:`quantize_int8_checked`), named in the error.
    """
    cosine = float(cosine_scores(int8_vectors, float_vectors).min())
    if cosine < INT8_MIN_COSINE:
        kept = f" (with {_named(float_layers)} kept in float32)" if float_layers else ""
        raise QuantizationError(
            f"{what} moves this model's vectors too far: a cosine of only {cosine:.4f} with its float32 vectors on "
            f"probe texts{kept} (required {INT8_MIN_COSINE}). Some models (SmolLM2 with bidirectional attention "
            "among them) are too sensitive to int8 rounding; run this one in float32 (an fp32 ONNX export "
            "is the faster CPU path) and see docs/inference.md"
        )
    return cosine


def _named(layers: list[str]) -> str:
    return f"{len(layers)} layer{'s' if len(layers) != 1 else ''}: {', '.join(layers)}"


@dataclass(frozen=True)
class Int8Kernel:
    """Which PyTorch engine packs (and so runs) the int8 weights, and the range they are rounded to."""

    engine: str  # a torch.backends.quantized engine: onednn, x86, fbgemm, qnnpack
    weight_max: int  # weights per output channel in [-weight_max, weight_max]: 127 (8 bits) or 63 (7 bits)

    def __post_init__(self):
        supported = torch.backends.quantized.supported_engines
        if self.engine not in supported:
            raise ValueError(
                f"int8 engine {self.engine!r} is not in this PyTorch build; choose one of: {', '.join(supported)}"
            )
        if self.weight_max not in (63, 127):
            raise ValueError(
                f"weight_max is 127 (8-bit weights) or 63 (7-bit, for CPUs without VNNI), not {self.weight_max}"
            )

    def qconfig(self) -> QConfig:
        return QConfig(
            activation=default_dynamic_quant_observer,
            weight=PerChannelMinMaxObserver.with_args(
                dtype=torch.qint8,
                qscheme=torch.per_channel_symmetric,
                quant_min=-self.weight_max,
                quant_max=self.weight_max,
            ),
        )

    @contextlib.contextmanager
    def packing(self) -> Iterator[None]:
        """PyTorch packs weights for its current global engine: switch to ours, then back.

        The packed weights carry their engine: they run with its kernel whatever the global engine is later.
        """
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = self.engine
        try:
            yield
        finally:
            torch.backends.quantized.engine = previous


def _cpu_has_vnni() -> bool:
    """AVX-512 VNNI (AMX CPUs have it too): int8 products summed in int32, with no int16 saturation."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)  # private, so unknown counts as absent (7-bit: safe)
    return bool(probe()) if probe is not None else False


def int8_kernel() -> Int8Kernel:
    """The int8 engine and weight range for this CPU; :data:`INT8_ENGINE_VARIABLE` overrides the engine.

    With VNNI: oneDNN and 8-bit weights (per layer at Gemma 3 270M's sizes, oneDNN's kernel was 1.2-2.8x
    x86/fbgemm's with AMX, 1.0-1.25x with oneDNN held to AVX-512 VNNI). Without: PyTorch's default engine (x86 on
    x86) and 7-bit weights,
    since the int16 pair sums of AVX2's kernels saturate with 8-bit weights (oneDNN's as well).
    """
    vnni = _cpu_has_vnni()
    engine = os.environ.get(INT8_ENGINE_VARIABLE)
    if engine is None:
        supported = torch.backends.quantized.supported_engines
        engine = "onednn" if vnni and "onednn" in supported else torch.backends.quantized.engine
    try:
        return Int8Kernel(engine, 127 if vnni else 63)
    except ValueError as error:
        raise ValueError(f"{INT8_ENGINE_VARIABLE}={engine!r}: {error}") from None


def _decoder_linears(decoder: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: module for name, module in decoder.named_modules() if isinstance(module, torch.nn.Linear)}


def _replace(decoder: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(decoder.get_submodule(parent) if parent else decoder, child, module)


@dataclass
class Calibration:
    """What one calibration run saw of a decoder's linear layers (:func:`calibrate`)."""

    peaks: dict[str, torch.Tensor]  # max |x_j| per input channel, by layer name (layers.0.self_attn.q_proj): (in,)
    # layers that read the very same input tensor (q, k and v; gate and up), each group in the decoder's order; a
    # layer that reads its input alone is in none
    siblings: list[list[str]] = field(default_factory=list)


def calibrate(decoder: torch.nn.Module, run: Callable[[], object]) -> Calibration:
    """The input peaks and sibling layers of every linear layer of ``decoder`` over what ``run()`` feeds it.

    Padded positions count too: they run through every layer like the text they pad. Layers are siblings when
    whenever one of them runs, the others read the very same input tensor (the same object, unchanged).
    """
    peaks: dict[str, torch.Tensor] = {}
    shared_with: dict[str, set[str]] = {}  # each layer: the layers that read its input in every call seen
    readers: dict[int, tuple[Callable, int, list[str]]] = {}  # by id of an input: (weak reference, version, layers)

    def seen(names: list[str]) -> None:
        for name in names:
            shared_with[name] = shared_with.get(name, set(names)) & set(names)

    def record(name):
        def hook(module, args):
            x = args[0]
            input_, version, names = readers.get(id(x), (None, None, None))
            if input_ is None or input_() is not x or version != _version(x):  # a new input (or one changed since)
                if names:
                    seen(names)
                input_, version, names = weakref.ref(x), _version(x), []
                readers[id(x)] = input_, version, names
            names.append(name)
            peak = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float().cpu()
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak

        return hook

    linears = _decoder_linears(decoder)
    handles = [m.register_forward_pre_hook(record(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    for _, _, names in readers.values():
        seen(names)
    order = {name: i for i, name in enumerate(linears)}
    groups = {frozenset(names) for name, names in shared_with.items() if all(shared_with[n] == names for n in names)}
    siblings = [sorted(group, key=order.get) for group in groups if len(group) > 1]
    return Calibration(peaks, sorted(siblings, key=lambda names: order[names[0]]))


def _version(x: torch.Tensor) -> int:
    """How many times ``x`` was changed in place; tensors made under ``torch.inference_mode`` (which encoding runs
    in) count none, so there the very same tensor object is what marks an input as the siblings'."""
    return -2 if x.is_inference() else x._version


def input_peaks(decoder: torch.nn.Module, run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """``max |x_j|`` per input channel of every linear layer of ``decoder`` over the inputs ``run()`` feeds it.

    Keys are the layers' names in ``decoder`` (``layers.0.self_attn.q_proj``); values are ``(in_features,)``.
    """
    return calibrate(decoder, run).peaks


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


class Int8Linear(torch.nn.Module):
    """``linear(x)`` with PyTorch's dynamic int8 kernel: smoothed, per-token scaled, 8-bit activations.

    ``scales`` are the smoothing scales (:func:`smoothing_scales`); ``None`` leaves the channels as they are.
    ``kernel`` (engine and weight range) defaults to :func:`int8_kernel`'s choice for this CPU.
    """

    def __init__(self, linear: torch.nn.Linear, scales: torch.Tensor | None = None, kernel: Int8Kernel | None = None):
        super().__init__()
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        self.kernel = int8_kernel() if kernel is None else kernel
        scales = torch.ones(linear.in_features) if scales is None else scales.float()
        smoothed = smoothed_linear(linear, scales)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("inverse_scales", (1 / scales).contiguous())  # (in,)
        self.register_buffer("bias", None if smoothed.bias is None else smoothed.bias.detach().clone())  # (out,)
        smoothed.bias, smoothed.qconfig = None, self.kernel.qconfig()  # the bias is added after scaling back
        with warnings.catch_warnings(), self.kernel.packing():  # torch.ao's eager quantization is deprecated
            warnings.simplefilter("ignore")
            self.inner = DynamicLinear.from_float(smoothed)  # holds the int8 weights, packed for the kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.inverse_scales  # (..., in)
        # one scale per token; amax and amin each run faster than abs().amax and allocate nothing of x's size
        peak = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_()).clamp_(min=1e-20)
        # reduce_range=False: 8-bit activations (the module's forward would use 7); safe with the kernel's weights
        y = torch.ops.quantized.linear_dynamic(
            x.mul_(peak.reciprocal()), self.inner._packed_params._packed_params, False
        )
        y = y.to(x.dtype).mul_(peak)  # (..., out)
        return y if self.bias is None else y.add_(self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def concatenated_linear(linears: list[torch.nn.Linear]) -> torch.nn.Linear:
    """One float linear layer whose output is the outputs of ``linears`` (which read inputs of one width) side by
    side, in order; a layer without a bias adds zeros."""
    out = torch.nn.Linear(
        linears[0].in_features, sum(m.out_features for m in linears), bias=any(m.bias is not None for m in linears)
    )
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight.float() for m in linears]))
        if out.bias is not None:
            biases = [torch.zeros(m.out_features) if m.bias is None else m.bias.float() for m in linears]
            out.bias.copy_(torch.cat(biases))
    return out


class Int8SharedInput(torch.nn.Module):
    """One :class:`Int8Linear` for sibling layers that read the same input (q, k and v; gate and up): the input is
    scaled and quantized once and the int8 kernel runs once, on their weights side by side; each sibling then
    becomes an :class:`Int8Slice` of the output. At Gemma 3 270M's sizes one layer's linears ran 16 % faster so
    (2 threads, AMX).

    The first sibling called computes the output for all of them; the others find it by their input: the very
    same tensor, unchanged since (its version counter). Once every sibling has taken its part it is let go.
    """

    def __init__(self, linear: Int8Linear, widths: list[int]):
        """``linear``: the siblings' layers side by side (:func:`concatenated_linear`) in int8; ``widths``: their
        output features, in that order."""
        super().__init__()
        if sum(widths) != linear.out_features:
            raise ValueError(f"the parts' widths {widths} do not add up to the {linear.out_features} output features")
        self.linear, self.widths = linear, widths
        self.parts = len(widths)
        self._input: Callable[[], torch.Tensor | None] | None = None  # a weak reference to the last input
        self._version, self._output, self._left = -1, None, 0

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The siblings' outputs side by side for ``x``: computed on the first call for an input, then shared."""
        if self._output is None or self._input is None or self._input() is not x or self._version != _version(x):
            self._output, self._left = self.linear(x), self.parts
            self._input, self._version = weakref.ref(x), _version(x)
        output = self._output
        self._left -= 1
        if self._left == 0:  # every sibling has its part: hold no activations between forwards
            self._output = self._input = None
        return output

    def slices(self) -> list[Int8Slice]:
        """An :class:`Int8Slice` for each part, in order."""
        bounds = np.cumsum([0, *self.widths]).tolist()
        return [Int8Slice(self, start, stop) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]


class Int8Slice(torch.nn.Module):
    """One sibling's part (output features ``start:stop``) of an :class:`Int8SharedInput`; it stands where that
    sibling's linear layer stood."""

    def __init__(self, shared: Int8SharedInput, start: int, stop: int):
        super().__init__()
        self.shared, self.start, self.stop = shared, start, stop
        self.in_features, self.out_features = shared.linear.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output(x)[..., self.start : self.stop]

    def extra_repr(self) -> str:
        return f"output features {self.start}:{self.stop} of {self.shared.linear.out_features}"


class Int8Embedding(torch.nn.Module):
    """An embedding table in int8 with a scale for each block of ``block`` values of a row: about a quarter of
    float32's memory, for the largest tensor of most small decoders (Gemma 3 270M: 168M of its 268M weights). A
    lookup reads the int8 rows and scales them back to float32; ``multiplier`` is what the original module
    multiplies its rows by (Gemma scales them by the square root of the hidden size), found by
    :func:`int8_embedding`. Blocks, not one scale a row, because a few channels of every row are far larger than
    the rest (Gemma 3 270M: STS-B -0.6 with a scale a row, measured on 400 test pairs).
    """

    def __init__(self, weight: torch.Tensor, multiplier: float = 1.0, block: int = 32, rows_at_once: int = 16384):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.block = block if self.embedding_dim % block == 0 else self.embedding_dim
        blocks = self.embedding_dim // self.block
        rows = torch.empty(weight.shape, dtype=torch.int8)
        scales = torch.empty(self.num_embeddings, blocks)
        with torch.no_grad():
            for start in range(0, self.num_embeddings, rows_at_once):  # bounded float scratch, not a table's worth
                chunk = weight[start : start + rows_at_once].float().reshape(-1, blocks, self.block)
                scale = chunk.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
                rows[start : start + rows_at_once] = torch.round(chunk / scale).to(torch.int8).flatten(1)
                scales[start : start + rows_at_once] = scale.squeeze(-1) * multiplier
        self.register_buffer("rows", rows)  # (vocab, dim) int8
        self.register_buffer("block_scales", scales)  # (vocab, dim / block), the multiplier included

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows[input_ids].float().unflatten(-1, (-1, self.block))  # (..., blocks, block)
        return rows.mul_(self.block_scales[input_ids].unsqueeze(-1)).flatten(-2)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 with a scale per {self.block} values"


def int8_embedding(module: torch.nn.Module) -> Int8Embedding | None:
    """An :class:`Int8Embedding` of ``module`` when its lookup is its table's rows times one constant (an
    ``nn.Embedding``, or a subclass that scales it, as Gemma's); ``None`` for anything else, left in float32.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(module, torch.nn.Embedding) or weight is None or weight.dim() != 2:
        return None
    with torch.no_grad():
        ids = torch.arange(min(16, weight.shape[0]), device=weight.device)
        looked_up, rows = module(ids).float(), weight[ids].float()
        multiplier = float((looked_up * rows).sum() / (rows * rows).sum().clamp(min=1e-30))
        if not torch.allclose(looked_up, rows * multiplier, rtol=1e-3, atol=1e-6):
            return None
    return Int8Embedding(weight, multiplier)


class _NoLMHead(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "this int8 encoder dropped its LM head (encoding never runs it); load the model without quantize to "
            "generate or train"
        )


def release_float_weights(model: torch.nn.Module) -> None:
    """Let an int8 encoder's float32 weights go: the LM head (tied to the float32 embedding table in most small
    models, and never run to encode) is replaced by a module that says so, and every tensor left in float32 (norms,
    the layers kept in float32) is copied, so that none points into the checkpoint's memory map any more and the
    mapping, float32 weights and all, can be released; the memory freed goes back to the system. Call it once the
    model is quantized.
    """
    if getattr(model, "get_output_embeddings", None) is not None and model.get_output_embeddings() is not None:
        model.set_output_embeddings(_NoLMHead())
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.clone()
    gc.collect()
    _return_freed_memory()


def _return_freed_memory() -> None:
    """glibc keeps freed blocks in its heap for later allocations; quantizing frees a float32 model's worth of
    them (Gemma 3 270M: ~370 MB of resident memory), which ``malloc_trim`` gives back. Elsewhere: nothing."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def quantize_dynamic_int8(
    model: torch.nn.Module,
    quantize: str = "int8",
    input_peaks: dict[str, torch.Tensor] | Calibration | None = None,
    alpha: float = SMOOTHING_ALPHA,
    kernel: Int8Kernel | None = None,
) -> torch.nn.Module:
    """PyTorch's dynamic int8 for every linear layer of the decoder; adapters merged first.

    Every linear layer becomes an :class:`Int8Linear`, smoothed when ``input_peaks`` is given (from
    :func:`input_peaks` on ``model.base_model``, the float model after merging); given a :class:`Calibration`
    (:func:`calibrate`), sibling layers share one (:class:`Int8SharedInput`). The LM head is left out: encoding
    never runs it, and for tied embeddings an int8 copy would add memory instead of saving it.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    decoder = model.base_model
    calibration = Calibration(input_peaks) if isinstance(input_peaks, dict) else input_peaks
    for members in _int8_units(decoder, calibration, alpha, kernel or int8_kernel()).values():
        _replace_all(decoder, members)
    return model


def _replace_all(decoder: torch.nn.Module, members: dict[str, torch.nn.Module]) -> None:
    for name, module in members.items():
        _replace(decoder, name, module)


def _unit_name(names: list[str]) -> str:
    """``layers.0.self_attn.{q_proj,k_proj,v_proj}`` for siblings, the layer's name for one layer."""
    if len(names) == 1:
        return names[0]
    parent = names[0].rpartition(".")[0]
    if all(name.rpartition(".")[0] == parent for name in names):
        return f"{parent}.{{{','.join(name.rpartition('.')[2] for name in names)}}}"
    return "{" + ",".join(names) + "}"


def _int8_units(
    decoder: torch.nn.Module, calibration: Calibration | None, alpha: float, kernel: Int8Kernel
) -> dict[str, dict[str, torch.nn.Module]]:
    """The int8 replacement of every linear layer of ``decoder``, by unit: a unit is one layer (an
    :class:`Int8Linear`) or a group of siblings (an :class:`Int8Slice` each, of one :class:`Int8SharedInput`), and
    maps each layer's name to its replacement. The decoder is left as it is.
    """
    linears = _decoder_linears(decoder)
    peaks = None if calibration is None else calibration.peaks
    if peaks is not None and set(linears) - set(peaks):
        missing = sorted(set(linears) - set(peaks))
        raise ValueError(f"no calibrated input peaks for {missing[:3]}...; calibrate the merged model's decoder")
    units: dict[str, dict[str, torch.nn.Module]] = {}
    grouped = {name: names for names in (calibration.siblings if calibration else []) for name in names}
    for name, linear in linears.items():
        names = grouped.get(name, [name])
        if name != names[0]:
            continue  # built with the first of its siblings
        layers = [linears[n] for n in names]
        float_layer = linear if len(layers) == 1 else concatenated_linear(layers)
        peak = None if peaks is None else _shared_peak([peaks[n] for n in names])
        scales = None if peak is None else smoothing_scales(peak, float_layer.weight, alpha)
        int8_layer = Int8Linear(float_layer, scales, kernel)
        if len(layers) == 1:
            units[name] = {name: int8_layer}
        else:
            slices = Int8SharedInput(int8_layer, [layer.out_features for layer in layers]).slices()
            units[_unit_name(names)] = dict(zip(names, slices, strict=True))
    return units


def _shared_peak(peaks: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(peaks).amax(dim=0)  # siblings saw one input: equal peaks, the largest to be safe


def cosines_with_one_float32_layer(
    decoder: torch.nn.Module,
    float_layers: dict[str, dict[str, torch.nn.Module]],
    encode: Callable[[list[str]], np.ndarray],
    texts: list[str],
    reference: np.ndarray,
) -> dict[str, float]:
    """For each unit of ``float_layers`` (a unit's name: its layers' float32 modules, by name in ``decoder``): the
    smallest cosine of ``encode(texts)`` to ``reference`` with that unit alone put back in float32 and every other
    layer as it is; the decoder is left as it was.

    It measures what each int8 unit costs the vectors where they are, errors carried through every later layer
    included: Gemma 3's worst layer (``layers.0.mlp.down_proj``) is not among those of largest error of its own.
    """
    cosines = {}
    for unit, members in float_layers.items():
        current = {name: decoder.get_submodule(name) for name in members}
        _replace_all(decoder, members)
        try:
            cosines[unit] = float(cosine_scores(encode(texts), reference).min())
        finally:
            _replace_all(decoder, current)
    return cosines


def quantize_int8_checked(
    decoder: torch.nn.Module,
    encode: Callable[[list[str]], np.ndarray],
    what: str = "PyTorch's dynamic int8",
    kernel: Int8Kernel | None = None,
) -> list[str]:
    """Every linear layer of ``decoder`` to int8 (:func:`quantize_dynamic_int8`'s units, siblings sharing one
    kernel call) and its token embeddings to an :class:`Int8Embedding` (:func:`int8_embedding`), in place, but the
    few units that int8 hurts most.

    ``encode(texts)`` embeds texts with the model that holds ``decoder`` (merged, in float32 on the CPU). In
    order: float32 vectors of the probe and rule texts, calibration on the calibration texts (:func:`calibrate`),
    every unit in int8; then, if a vector of :data:`INT8_RULE_TEXTS` is further than :data:`INT8_MIN_COSINE` from
    its float32 one, the units (a layer, a group of siblings, the embedding table) are ranked by how close the (at
    most :data:`INT8_RANKING_TEXTS`) worst of them come back with that unit alone in float32
    (:func:`cosines_with_one_float32_layer`), and put back in float32 in that order until every rule text passes,
    at most :data:`INT8_MAX_FLOAT_FRACTION` of them. :func:`check_int8` then proves the result on the probe texts;
    of those only the empty text (which has one form) took part in the rule. Returns the names of the units kept
    in float32, in the order they were put back; raises :class:`QuantizationError` past the cap or when the probe
    check fails.
    """
    probe_vectors = encode(INT8_PROBE_TEXTS)
    calibration_vectors: list[np.ndarray] = []  # the float32 vectors of the calibration run, kept as references
    calibration = calibrate(decoder, lambda: calibration_vectors.append(encode(INT8_CALIBRATION_TEXTS)))
    reference = np.concatenate([calibration_vectors[0], encode(INT8_ONE_FORM_TEXTS)])  # INT8_RULE_TEXTS' order
    units = _int8_units(decoder, calibration, SMOOTHING_ALPHA, kernel or int8_kernel())
    layers = {unit: {name: decoder.get_submodule(name) for name in members} for unit, members in units.items()}
    for members in units.values():
        _replace_all(decoder, members)
    embedding = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
    int8_table = None if embedding is None else int8_embedding(embedding)
    if int8_table is not None:
        name = next(name for name, module in decoder.named_modules() if module is embedding)
        layers[name] = {name: embedding}
        _replace(decoder, name, int8_table)
    cosines = cosine_scores(encode(INT8_RULE_TEXTS), reference)
    kept: list[str] = []
    if cosines.min() < INT8_MIN_COSINE:
        worst = [int(i) for i in np.argsort(cosines)[:INT8_RANKING_TEXTS] if cosines[i] < INT8_MIN_COSINE]
        texts = [INT8_RULE_TEXTS[i] for i in worst]
        ranking = cosines_with_one_float32_layer(decoder, layers, encode, texts, reference[worst])
        cap = max(1, int(len(layers) * INT8_MAX_FLOAT_FRACTION))
        for unit in sorted(ranking, key=ranking.get, reverse=True)[:cap]:
            _replace_all(decoder, layers[unit])
            kept.append(unit)
            cosines = cosine_scores(encode(INT8_RULE_TEXTS), reference)
            if cosines.min() >= INT8_MIN_COSINE:
                break
        else:
            raise QuantizationError(
                f"{what} moves this model's vectors too far: a cosine of only {cosines.min():.4f} with its float32 "
                f"vectors on calibration texts with {_named(kept)} kept in float32, the most allowed "
                f"({INT8_MAX_FLOAT_FRACTION:.0%} of {len(layers)}; required {INT8_MIN_COSINE}). Run this model in "
                "float32 (an fp32 ONNX export is the faster CPU path) and see docs/inference.md"
            )
    check_int8(probe_vectors, encode(INT8_PROBE_TEXTS), what, kept)
    if kept:
        logger.info("int8: %s kept in float32 (of %d)", _named(kept), len(layers))
    return kept
