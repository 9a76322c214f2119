"""LLM2Vec reference layout: base folder + embedded MNTP adapter (merged), second adapter, llm2vec_config.json."""

import json
import shutil

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from decoder2vec import Encoder, EncoderConfig
from decoder2vec.llm2vec_compat import detect_llm2vec_checkpoint, llm2vec_settings

# peft's get_peft_model reads a transformers property that transformers 5.24 deprecates (not our code)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TEXTS = ["A man is playing a guitar.", "The cat sits on the mat.", "", "Paris is the capital of France."]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(seed: int) -> LoraConfig:
    torch.manual_seed(seed)
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)


@pytest.fixture
def llm2vec_checkpoint(tiny_llama_dir, tmp_path, monkeypatch):
    """(base folder with its MNTP adapter inside, SimCSE adapter folder with llm2vec_config.json)."""
    monkeypatch.setenv("DECODER2VEC_CACHE", str(tmp_path / "cache"))
    base = tiny_llama_dir
    shutil.copytree(base, tmp_path / "pristine")  # the base weights alone, for the hand-built reference
    mntp = get_peft_model(AutoModelForCausalLM.from_pretrained(base), _lora(1))
    mntp.save_pretrained(base)  # the reference keeps the MNTP adapter next to the base weights
    pristine = AutoModelForCausalLM.from_pretrained(tmp_path / "pristine")
    merged = PeftModel.from_pretrained(pristine, base).merge_and_unload()
    simcse_dir = tmp_path / "simcse"
    get_peft_model(merged, _lora(2)).save_pretrained(simcse_dir)
    settings = {"pooling_mode": "weighted_mean", "max_length": 48, "doc_max_length": 400, "skip_instruction": True}
    (simcse_dir / "llm2vec_config.json").write_text(json.dumps(settings))
    return base, simcse_dir, tmp_path / "pristine"


def _reference(pristine, base, simcse_dir, config: EncoderConfig) -> np.ndarray:
    """The same model assembled by hand: base weights, MNTP merged, SimCSE live."""
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pristine), base).merge_and_unload()
    model = PeftModel.from_pretrained(merged, simcse_dir)
    encoder = Encoder(model, AutoTokenizer.from_pretrained(pristine), config).eval()
    return encoder.encode(TEXTS)


def test_loads_base_merges_mntp_keeps_second_adapter_and_reads_pooling(llm2vec_checkpoint):
    base, simcse_dir, pristine = llm2vec_checkpoint
    encoder = Encoder.from_pretrained(base, adapter=simcse_dir, device="cpu", merge_adapters=False)
    assert encoder.config.pooling == "weighted_mean"
    assert encoder.config.max_length == 48
    assert encoder.config.bidirectional is True
    assert isinstance(encoder.model, PeftModel)
    assert list(encoder.model.peft_config) == ["default"]  # one live adapter: the MNTP one was merged
    got = encoder.encode(TEXTS)
    np.testing.assert_allclose(got, _reference(pristine, base, simcse_dir, encoder.config), atol=1e-5)

    merged = Encoder.from_pretrained(base, adapter=simcse_dir, device="cpu", pooling="weighted_mean")
    assert not isinstance(merged.model, PeftModel)  # by default the SimCSE adapter is merged too
    np.testing.assert_allclose(merged.encode(TEXTS), got, atol=1e-5)  # the same vectors, live or merged


def test_mntp_adapter_is_really_merged(llm2vec_checkpoint):
    base, simcse_dir, pristine = llm2vec_checkpoint
    with_mntp = Encoder.from_pretrained(base, device="cpu", pooling="mean").encode(TEXTS)
    (base / "adapter_config.json").rename(base / "hidden.json")  # now an ordinary folder
    without = Encoder.from_pretrained(base, device="cpu", pooling="mean").encode(TEXTS)
    assert np.abs(with_mntp - without).max() > 1e-3


def test_explicit_arguments_win_over_llm2vec_config(llm2vec_checkpoint):
    base, simcse_dir, pristine = llm2vec_checkpoint
    encoder = Encoder.from_pretrained(base, adapter=simcse_dir, device="cpu", pooling="mean", max_length=32)
    assert (encoder.config.pooling, encoder.config.max_length) == ("mean", 32)


def test_ordinary_folder_is_not_a_checkpoint(tiny_llama_dir):
    assert detect_llm2vec_checkpoint(str(tiny_llama_dir), []) is None


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("mean", {"pooling": "mean"}),
        ("weighted_mean", {"pooling": "weighted_mean"}),
        ("eos_token", {"pooling": "last_token", "append_eos": True}),
        ("last_token", {"pooling": "last_token", "append_eos": False}),
        ("bos_token", {"pooling": "bos"}),
    ],
)
def test_pooling_modes_map(mode, expected):
    settings = llm2vec_settings({"pooling_mode": mode, "max_length": 100})
    assert {k: settings[k] for k in expected} == expected and settings["max_length"] == 100


def test_unsupported_pooling_mode_names_the_fix():
    with pytest.raises(ValueError, match="latent_pooling.*pooling="):
        llm2vec_settings({"pooling_mode": "latent_pooling"})


def test_cli_loads_the_layout_too(llm2vec_checkpoint, tmp_path):
    from decoder2vec.cli import main

    base, simcse_dir, _ = llm2vec_checkpoint
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(t for t in TEXTS if t) + "\n")
    out = tmp_path / "vectors.npy"
    assert main(["encode", str(texts), "-o", str(out), "--model", str(base), "--adapter", str(simcse_dir)]) == 0
    expected = Encoder.from_pretrained(base, adapter=simcse_dir, device="cpu").encode([t for t in TEXTS if t])
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)
