"""Encoder.from_pretrained(quantize="int8"): close to float32, bidirectional, every pooling mode, batch invariance."""

import numpy as np
import pytest
import torch

from decoder2vec import Encoder
from decoder2vec.cli import main
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
        layer = int8.backbone.layers[0].self_attn.q_proj
        assert type(layer).__module__.startswith("torch.ao.nn.quantized.dynamic"), type(layer)
        assert _min_cosine(int8.encode(TEXTS), fp32.encode(TEXTS)) >= 0.99, pooling


def test_onnxruntime_int8_is_the_default_and_close_to_float32(onnx_cache):
    pytest.importorskip("onnxruntime")
    cache, model = onnx_cache
    for pooling in POOLINGS:
        fp32 = Encoder.from_pretrained(model, pooling=pooling, device="cpu")
        int8 = Encoder.from_pretrained(model, pooling=pooling, quantize="int8")  # the graph is pooling-free
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


def test_int8_refuses_a_model_it_would_move_too_far(tmp_path, monkeypatch):
    """SmolLM2 with bidirectional attention loses 9-10 STS-B points to int8 (bench/int8_sensitivity.py): refuse."""
    import decoder2vec.model as model_module

    folder = make_model_dir(tmp_path / "model", "llama")
    quantize = model_module.quantize_dynamic_int8

    def coarse(model, kind="int8"):  # int8 as it goes on a sensitive model: here, one layer's weights scrambled
        with torch.no_grad():
            layer = model.base_model.layers[-1].mlp.down_proj
            layer.weight.mul_(1e3)
        return quantize(model, kind)

    monkeypatch.setattr(model_module, "quantize_dynamic_int8", coarse)
    with pytest.raises(model_module.QuantizationError, match=r"cosine of only .*float32.*docs/inference.md"):
        Encoder.from_pretrained(folder, quantize="int8", backend="torch")


def test_cli_encode_with_quantize(tmp_path):
    model = make_model_dir(tmp_path / "model", "llama")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS[:4]) + "\n")
    args = ["encode", str(texts), "-o", str(tmp_path / "v.npy"), "--model", str(model), "--device", "cpu"]
    assert main([*args, "--quantize", "int8", "--backend", "torch"]) == 0
    fp32 = Encoder.from_pretrained(model, device="cpu").encode(TEXTS[:4])
    assert _min_cosine(np.load(tmp_path / "v.npy"), fp32) >= 0.99
