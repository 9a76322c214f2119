"""Encoder.from_pretrained(quantize="int8"): close to float32, bidirectional, every pooling mode, batch invariance."""

import copy

import numpy as np
import pytest
import torch

import decoder2vec.int8 as int8_module
from decoder2vec import Encoder
from decoder2vec.cli import main
from decoder2vec.int8 import (
    INT8_CALIBRATION_TEXTS,
    INT8_ENGINE_VARIABLE,
    INT8_PROBE_TEXTS,
    INT8_RULE_TEXTS,
    Int8Embedding,
    Int8Kernel,
    Int8Linear,
    Int8SharedInput,
    Int8Slice,
    QuantizationError,
    calibrate,
    check_int8,
    cosines_with_one_float32_layer,
    input_peaks,
    int8_embedding,
    int8_kernel,
    quantize_dynamic_int8,
    release_float_weights,
    smoothed_linear,
    smoothing_scales,
)
from tiny import make_model_dir

TEXTS = [
    "A man is playing a guitar.",
    "A woman is slicing an onion.",
    "The cat sits on the mat while the dog sleeps.",
    "Paris is the capital and most populous city of France.",
    "Numbers like 3.14, 42 and 1,000,000 appear in text.",
    "Short.",
    "x",
    "",
    "The president gave a long speech about the economy, jobs, and taxes to a large crowd.",
]
POOLINGS = ("mean", "weighted_mean", "last_token", "bos")
# peft's get_peft_model reads a transformers property that transformers 5.24 deprecates (not our code)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.sum(a * b, axis=1).min())


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    """One cache and one model (no BOS, as SmolLM2) for the module: the int8 graph is exported on first load only."""
    folder = tmp_path_factory.mktemp("cache")
    model = make_model_dir(tmp_path_factory.mktemp("int8") / "model", "llama", add_bos=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DECODER2VEC_CACHE", str(folder))
        yield folder, model


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_torch_int8_is_close_to_float32_for_every_pooling(tmp_path, model_type):
    model = make_model_dir(tmp_path / "model", model_type)
    for pooling in POOLINGS:
        fp32 = Encoder.from_pretrained(model, pooling=pooling, device="cpu")
        int8 = Encoder.from_pretrained(model, pooling=pooling, quantize="int8", backend="torch")
        assert int8.backend == "torch" and int8.quantize == "int8"
        layer = int8.backbone.layers[0].self_attn.o_proj  # smoothed, then PyTorch's int8 with per-channel weights
        assert isinstance(layer, Int8Linear) and bool((layer.inverse_scales != 1).any())
        attention, mlp = int8.backbone.layers[0].self_attn, int8.backbone.layers[0].mlp
        assert attention.q_proj.shared is attention.k_proj.shared is attention.v_proj.shared  # one kernel call
        assert mlp.gate_proj.shared is mlp.up_proj.shared and isinstance(mlp.down_proj, Int8Linear)
        assert type(layer.inner).__module__.startswith("torch.ao.nn.quantized.dynamic"), type(layer.inner)
        assert layer.inner.weight().q_per_channel_scales().numel() == layer.inner.out_features
        assert _min_cosine(int8.encode(TEXTS), fp32.encode(TEXTS)) >= 0.99, pooling


def test_int8_runs_on_torch_unless_onnx_is_asked_for(tiny_llama_dir):
    assert Encoder.from_pretrained(tiny_llama_dir, quantize="int8").backend == "torch"


def test_onnxruntime_int8_is_close_to_float32(onnx_cache):
    pytest.importorskip("onnxruntime")
    cache, model = onnx_cache
    for pooling in POOLINGS:
        fp32 = Encoder.from_pretrained(model, pooling=pooling, device="cpu")
        int8 = Encoder.from_pretrained(model, pooling=pooling, quantize="int8", backend="onnx")  # pooling-free graph
        assert int8.backend == "onnx" and int8.quantize == "int8"
        assert _min_cosine(int8.encode(TEXTS), fp32.encode(TEXTS)) >= 0.99, pooling
    assert len(list((cache / "onnx").iterdir())) == 1  # exported once, read four times


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_int8_batch_invariance_within_the_stated_tolerance(onnx_cache, backend):
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    _, model = onnx_cache
    encoder = Encoder.from_pretrained(model, quantize="int8", backend=backend)
    alone = np.concatenate([encoder.encode([text]) for text in TEXTS])
    batched = encoder.encode(TEXTS, batch_size=8)
    assert _min_cosine(alone, batched) >= 0.99  # activations are scaled per batch: close, not equal


def test_int8_stays_bidirectional_and_adapters_are_merged_first(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = make_model_dir(tmp_path / "model", "llama")
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model), config).save_pretrained(tmp_path / "adapter")
    fp32 = Encoder.from_pretrained(model, adapter=tmp_path / "adapter", device="cpu")
    int8 = Encoder.from_pretrained(model, adapter=tmp_path / "adapter", quantize="int8", backend="torch")
    assert not hasattr(int8.model, "peft_config")  # merged into the weights before quantizing
    assert _min_cosine(int8.encode(TEXTS), fp32.encode(TEXTS)) >= 0.99
    causal = Encoder.from_pretrained(model, quantize="int8", backend="torch", bidirectional=False)
    first = [causal.encode([t])[0] for t in ("The cat sits on the mat", "The cat sits on the rug")]
    assert _min_cosine(*[np.stack([v]) for v in first]) < 1  # the texts differ, so the vectors do
    # verify_attention ran on load: a model that ignored the switch would have raised


def test_quantize_rejects_what_it_cannot_do(tmp_path):
    model = make_model_dir(tmp_path / "model", "llama")
    with pytest.raises(ValueError, match="unknown quantization"):
        Encoder.from_pretrained(model, quantize="int4")
    with pytest.raises(ValueError, match="unknown backend"):
        Encoder.from_pretrained(model, backend="tensorrt")
    with pytest.raises(ValueError, match="on the CPU in float32"):
        Encoder.from_pretrained(model, quantize="int8", backend="torch", dtype="bfloat16")


class _Noisy(torch.nn.Module):
    """An int8 layer gone wrong (as a few of Gemma 3's are): its output plus noise ten times its spread."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return y + 10 * y.std() * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))


def _inject_noise(monkeypatch, names: list[str]) -> None:
    """int8 builds these layers of the decoder noisy; every other layer as usual."""
    build = int8_module._int8_units

    def noisy(decoder, *args):
        return {
            unit: {name: _Noisy(layer) if name in names else layer for name, layer in members.items()}
            for unit, members in build(decoder, *args).items()
        }

    monkeypatch.setattr(int8_module, "_int8_units", noisy)


def test_int8_keeps_the_layer_of_largest_error_in_float32_and_passes(tiny_llama_dir, monkeypatch):
    fp32 = Encoder.from_pretrained(tiny_llama_dir, device="cpu")
    clean = Encoder.from_pretrained(tiny_llama_dir, quantize="int8", backend="torch")
    assert clean.float_layers == []  # nothing to keep: every layer runs in int8
    _inject_noise(monkeypatch, ["layers.1.mlp.down_proj"])
    int8 = Encoder.from_pretrained(tiny_llama_dir, quantize="int8", backend="torch")
    assert int8.float_layers == ["layers.1.mlp.down_proj"]
    names = [n for n, m in fp32.backbone.named_modules() if isinstance(m, torch.nn.Linear)]
    linears = {name: int8.backbone.get_submodule(name) for name in names}
    assert type(linears.pop("layers.1.mlp.down_proj")) is torch.nn.Linear  # the float32 layer itself, unmodified
    assert len(linears) == 13 and all(isinstance(m, (Int8Linear, Int8Slice)) for m in linears.values())
    assert _min_cosine(int8.encode(TEXTS), fp32.encode(TEXTS)) >= 0.99


def test_int8_keeps_siblings_in_float32_together(tiny_llama_dir, monkeypatch):
    fp32 = Encoder.from_pretrained(tiny_llama_dir, device="cpu")
    _inject_noise(monkeypatch, ["layers.1.mlp.up_proj"])  # gate_proj shares its input, and so its int8 kernel
    int8 = Encoder.from_pretrained(tiny_llama_dir, quantize="int8", backend="torch")
    assert int8.float_layers == ["layers.1.mlp.{gate_proj,up_proj}"]
    mlp = int8.backbone.layers[1].mlp
    assert type(mlp.gate_proj) is torch.nn.Linear and type(mlp.up_proj) is torch.nn.Linear
    assert isinstance(mlp.down_proj, Int8Linear) and isinstance(int8.backbone.layers[0].mlp.up_proj, Int8Slice)
    assert _min_cosine(int8.encode(TEXTS), fp32.encode(TEXTS)) >= 0.99


def test_int8_refuses_a_model_that_needs_more_float32_layers_than_allowed(tiny_llama_dir, monkeypatch):
    """SmolLM2 with bidirectional attention loses 9-10 STS-B points to int8 (bench/int8_sensitivity.py): refuse."""
    # the cap is 1 of 9: per decoder layer q/k/v (one kernel), o, gate/up (one kernel), down; and the embedding table
    _inject_noise(monkeypatch, ["layers.0.mlp.down_proj", "layers.1.self_attn.o_proj"])
    with pytest.raises(QuantizationError, match=r"cosine of only .* 1 layer: layers\.\d.* most allowed .*of 9"):
        Encoder.from_pretrained(tiny_llama_dir, quantize="int8", backend="torch")


def test_probe_check_names_the_layers_kept_in_float32():
    float_vectors = np.eye(3, 4)
    assert check_int8(float_vectors, float_vectors + 0.01, "int8", ["layers.0.mlp.down_proj"]) > 0.99
    with pytest.raises(QuantizationError, match=r"cosine of only 0\.\d+ .*1 layer: layers\.0\.mlp\.down_proj"):
        check_int8(float_vectors, np.roll(float_vectors, 1, axis=1), "int8", ["layers.0.mlp.down_proj"])


def test_cosines_with_one_float32_layer_find_the_layer_that_moves_the_vectors():
    torch.manual_seed(0)
    floats = {"0": torch.nn.Linear(16, 16), "1": torch.nn.Linear(16, 16)}
    decoder = torch.nn.Sequential(*[copy.deepcopy(floats[n]) for n in ("0", "1")])
    units = {name: {name: layer} for name, layer in floats.items()}  # one layer a unit
    decoder[0], decoder[1] = Int8Linear(decoder[0]), _Noisy(Int8Linear(decoder[1]))  # "1" went wrong
    x = torch.randn(5, 16)

    def encode(texts):  # one vector per "text": a row of x
        with torch.no_grad():
            return decoder(x[: len(texts)]).numpy()

    with torch.no_grad():
        reference = floats["1"](floats["0"](x)).numpy()
    cosines = cosines_with_one_float32_layer(decoder, units, encode, ["a"] * 5, reference)
    assert cosines["1"] > 0.99 > 0.5 > cosines["0"], cosines  # putting "1" back fixes the vectors; "0" does not
    assert isinstance(decoder[0], Int8Linear) and isinstance(decoder[1], _Noisy)  # left as it was


def test_int8_kernel_follows_the_cpu_and_the_environment(monkeypatch):
    monkeypatch.delenv(INT8_ENGINE_VARIABLE, raising=False)
    monkeypatch.setattr(int8_module, "_cpu_has_vnni", lambda: False)  # AVX2: int16 pair sums, 7-bit weights
    assert int8_kernel() == Int8Kernel(torch.backends.quantized.engine, 63)
    if "onednn" in torch.backends.quantized.supported_engines:
        monkeypatch.setattr(int8_module, "_cpu_has_vnni", lambda: True)  # int32 sums: 8 bits, oneDNN
        assert int8_kernel() == Int8Kernel("onednn", 127)
        monkeypatch.setenv(INT8_ENGINE_VARIABLE, torch.backends.quantized.engine)
        assert int8_kernel() == Int8Kernel(torch.backends.quantized.engine, 127)
    monkeypatch.setenv(INT8_ENGINE_VARIABLE, "tensorrt")
    with pytest.raises(ValueError, match=f"{INT8_ENGINE_VARIABLE}='tensorrt'.*not in this PyTorch build"):
        int8_kernel()
    with pytest.raises(ValueError, match="weight_max is 127"):
        Int8Kernel(torch.backends.quantized.engine, 100)


def test_cli_encode_with_quantize(tmp_path):
    model = make_model_dir(tmp_path / "model", "llama")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS[:4]) + "\n")
    args = ["encode", str(texts), "-o", str(tmp_path / "v.npy"), "--model", str(model), "--device", "cpu"]
    assert main([*args, "--quantize", "int8", "--backend", "torch"]) == 0
    fp32 = Encoder.from_pretrained(model, device="cpu").encode(TEXTS[:4])
    assert _min_cosine(np.load(tmp_path / "v.npy"), fp32) >= 0.99


def _one_layer(linear: torch.nn.Linear) -> torch.nn.Module:
    return _holding(torch.nn.Sequential(copy.deepcopy(linear)))


def _holding(decoder: torch.nn.Module) -> torch.nn.Module:
    """A stand-in for a causal LM: quantize_dynamic_int8 quantizes the linear layers of ``.base_model``."""
    holder = torch.nn.Module()
    holder.base_model = decoder
    return holder


def _outlier_inputs() -> tuple[torch.nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(4, 10, 64)  # (batch, tokens, in)
    x[..., 3] *= 80  # one outlier channel, as the inputs of a decoder's down_proj have
    x[..., 17] *= 30
    return torch.nn.Linear(64, 48), x


def test_smoothing_is_exact_in_float():
    """W * s applied to x / s is the original linear layer: smoothing only moves range between the operands."""
    linear, x = _outlier_inputs()
    peaks = input_peaks(torch.nn.Sequential(linear), lambda: linear(x))["0"]
    assert torch.equal(peaks, x.abs().amax(dim=(0, 1)))  # max |x_j| over every token
    for alpha in (0.0, 0.5, 0.65, 1.0):
        scales = smoothing_scales(peaks, linear.weight, alpha)
        assert scales.shape == (64,) and bool(torch.isfinite(scales).all())
        with torch.no_grad():
            assert torch.allclose(smoothed_linear(linear, scales)(x / scales), linear(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        smoothing_scales(peaks, linear.weight, 1.5)


def _relative_error(layer: torch.nn.Module, linear: torch.nn.Linear, x: torch.Tensor) -> float:
    with torch.no_grad():
        exact = linear(x)
        return float((layer(x) - exact).norm() / exact.norm())


def test_smoothing_and_token_scales_cut_int8_error_on_activation_outliers():
    from torch.ao.quantization import quantize_dynamic

    linear, x = _outlier_inputs()
    torch_int8 = quantize_dynamic(_one_layer(linear).base_model, {torch.nn.Linear}, dtype=torch.qint8)
    plain = quantize_dynamic_int8(_one_layer(linear)).base_model  # token scales and 8-bit activations only
    layer = _one_layer(linear)
    peaks = input_peaks(layer.base_model, lambda: layer.base_model(x))
    smoothed = quantize_dynamic_int8(layer, input_peaks=peaks).base_model
    assert isinstance(smoothed[0], Int8Linear) and isinstance(plain[0], Int8Linear)
    error = {
        name: _relative_error(m, linear, x)
        for name, m in [("torch", torch_int8), ("plain", plain), ("smooth", smoothed)]
    }
    assert error["smooth"] < error["plain"] < 0.5 * error["torch"], error
    assert error["smooth"] < 0.02, error
    with pytest.raises(ValueError, match="no calibrated input peaks"):
        quantize_dynamic_int8(_one_layer(linear), input_peaks={})


@pytest.mark.parametrize("kernel", ["this CPU's", "7-bit"])
def test_int8_linear_does_not_saturate(kernel):
    """8-bit activations with 8-bit weights overflow the int16 pair sums of AVX2's kernels; int8_kernel gives
    8-bit weights only to CPUs with VNNI (int32 sums), and 7-bit weights are safe on every x86 kernel."""
    linear = torch.nn.Linear(256, 16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(16, 128).sign().repeat_interleave(2, dim=1))  # pairs at the extremes
    x = torch.ones(8, 256)
    x[:, 0] = -1  # so the activations' zero point sits low and the other values near 255
    chosen = int8_kernel() if kernel == "this CPU's" else Int8Kernel(torch.backends.quantized.engine, 63)
    assert _relative_error(Int8Linear(linear, kernel=chosen), linear, x) < 0.01


def test_int8_linear_is_close_with_and_without_bias_and_per_token():
    """A text's vector no longer depends on how large another text's activations are in the same batch."""
    linear, x = _outlier_inputs()
    layer = Int8Linear(linear, smoothing_scales(x.abs().amax(dim=(0, 1)), linear.weight))
    assert _relative_error(layer, linear, x) < 0.02
    loud = torch.cat([x[:1], 1000 * x[1:2]])  # a second row a thousand times larger
    with torch.no_grad():
        assert torch.allclose(layer(loud)[0], layer(x[:1])[0], rtol=0.02, atol=0.02 * float(layer(x[:1]).abs().max()))
    no_bias = torch.nn.Linear(64, 48, bias=False)
    assert _relative_error(Int8Linear(no_bias), no_bias, x) < 0.1


class _Siblings(torch.nn.Module):
    """q and k read one input; o reads q's output; k is also fed a copy of the input once (not a sibling then)."""

    def __init__(self, copy_for_k: bool = False):
        super().__init__()
        self.q, self.k, self.o = torch.nn.Linear(16, 24), torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(24, 16)
        self.copy_for_k = copy_for_k

    def forward(self, x):
        return self.o(self.q(x)) + self.k(x.clone() if self.copy_for_k else x).sum(-1, keepdim=True)


def test_calibrate_finds_the_layers_that_read_one_input():
    torch.manual_seed(0)
    model, x = _Siblings(), torch.randn(3, 5, 16)
    calibration = calibrate(model, lambda: (model(x), model(2 * x)))
    assert calibration.siblings == [["q", "k"]]
    assert torch.equal(calibration.peaks["q"], 2 * x.abs().amax(dim=(0, 1)))
    assert set(calibration.peaks) == {"q", "k", "o"}

    def once_apart():  # siblings in one forward but not in the next: not siblings
        model.copy_for_k = False
        model(x)
        model.copy_for_k = True
        model(x)

    assert calibrate(model, once_apart).siblings == []


def test_siblings_share_one_int8_call_and_each_gets_its_own_output():
    torch.manual_seed(0)
    model, x = _Siblings(), torch.randn(3, 5, 16)
    with torch.no_grad():
        exact = model.q(x), model.k(x)
    calibration = calibrate(model, lambda: model(x))
    int8 = quantize_dynamic_int8(_holding(model), input_peaks=calibration).base_model
    shared = int8.q.shared
    assert isinstance(shared, Int8SharedInput) and int8.k.shared is shared and isinstance(int8.o, Int8Linear)
    calls = []
    shared.linear.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        q, k = int8.q(x), int8.k(x)
        assert len(calls) == 1 and shared._output is None  # computed once, let go once both took their part
        assert q.shape == exact[0].shape and k.shape == exact[1].shape
        assert float((q - exact[0]).norm() / exact[0].norm()) < 0.02
        assert float((k - exact[1]).norm() / exact[1].norm()) < 0.02
        int8.q(x)
        x.mul_(2)  # the same tensor, changed in place: computed anew
        assert torch.allclose(int8.k(x), 2 * k, rtol=0.05, atol=0.05 * float(k.abs().max()))
        assert len(calls) == 3
    with torch.inference_mode():  # as encode runs: no version counters, the tensor itself marks the input
        y = torch.randn(2, 16)
        int8.q(y), int8.k(y)
        assert len(calls) == 4


def test_int8_is_calibrated_on_texts_apart_from_the_probe_texts():
    """The probe check would prove nothing if the scales had been fitted on the probe texts themselves."""
    assert not set(INT8_CALIBRATION_TEXTS) & set(INT8_PROBE_TEXTS)
    assert not set(INT8_CALIBRATION_TEXTS) & set(TEXTS)
    # the layers kept in float32 are chosen on the calibration texts and on the empty text alone, which has one form
    assert set(INT8_RULE_TEXTS) & set(INT8_PROBE_TEXTS) == {""}


def test_int8_embedding_table_looks_up_its_rows_within_half_a_step_of_each_block():
    torch.manual_seed(0)
    table = torch.nn.Embedding(1000, 64)
    int8 = int8_embedding(table)
    assert isinstance(int8, Int8Embedding) and int8.rows.dtype == torch.int8
    assert int8.rows.shape == table.weight.shape  # a byte a weight instead of four
    ids = torch.tensor([[0, 5, 999], [3, 3, 7]])
    want, got = table(ids).detach(), int8(ids)
    blocks = want.unflatten(-1, (-1, int8.block))  # each block of a row on its own grid of 255 levels
    step = (blocks.abs().amax(dim=-1, keepdim=True) / 127).expand_as(blocks).flatten(-2)
    assert int8.block == 32 and bool(((got - want).abs() <= step / 2 + 1e-6).all())
    assert float((got - want).abs().max()) > 0  # rounded: not the float32 table kept under another name


def test_int8_embedding_keeps_a_scaled_lookup_and_leaves_other_modules_in_float():
    class Scaled(torch.nn.Embedding):  # as Gemma's: the rows times the square root of the width
        def forward(self, ids):
            return super().forward(ids) * 8.0

    class Shifted(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    torch.manual_seed(0)
    scaled, ids = Scaled(100, 16), torch.tensor([1, 50, 99])
    assert torch.allclose(int8_embedding(scaled)(ids), scaled(ids), rtol=0.01, atol=0.05)
    assert int8_embedding(Shifted(100, 16)) is None  # not rows times a constant: left in float32
    assert int8_embedding(torch.nn.Linear(4, 4)) is None


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_int8_encoder_holds_no_float32_copy_of_its_int8_weights(tmp_path, model_type):
    model = make_model_dir(tmp_path / "model", model_type)
    fp32 = Encoder.from_pretrained(model, device="cpu")
    int8 = Encoder.from_pretrained(model, quantize="int8", backend="torch")
    assert isinstance(int8.backbone.get_input_embeddings(), Int8Embedding)
    float_weights = sum(p.numel() for p in int8.model.parameters() if p.is_floating_point())
    norms = sum(p.numel() for n, p in fp32.model.named_parameters() if "norm" in n)
    assert float_weights == norms  # nothing kept in float32 here: the norms are all that is left
    with pytest.raises(RuntimeError, match="dropped its LM head"):
        int8.model.get_output_embeddings()(torch.zeros(1, fp32.dim))
    assert _min_cosine(int8.encode(TEXTS), fp32.encode(TEXTS)) >= 0.99


def test_release_float_weights_copies_every_float_tensor_out_of_the_loaded_storage(tmp_path):
    encoder = Encoder.from_pretrained(make_model_dir(tmp_path / "model", "llama"), device="cpu")
    before = {name: p.data_ptr() for name, p in encoder.backbone.named_parameters()}
    vectors = encoder.encode(TEXTS)
    release_float_weights(encoder.model)
    after = {name: p.data_ptr() for name, p in encoder.backbone.named_parameters()}
    assert not set(before.values()) & set(after.values())  # copies, so the checkpoint's mapping can go
    assert np.allclose(encoder.encode(TEXTS), vectors, atol=1e-6)
