"""The Encoder's public behaviour: shapes, order, batch invariance, instructions, bad input."""

import json
import random

import numpy as np
import pytest
import torch

from decoder2vec import POOLING_MODES, Encoder, ModelSourceError


def mixed_texts(count: int = 50, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the cat dog sat on a mat while paris is capital of france numbers 3.14 emoji 🙂 漢字".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(count)]


@pytest.fixture(scope="module")
def encoders(_tiny_llama_session):
    return {b: Encoder.from_pretrained(_tiny_llama_session, bidirectional=b) for b in (True, False)}


@pytest.mark.parametrize("pooling", POOLING_MODES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
def test_embedding_does_not_depend_on_the_batch(encoders, pooling, padding_side, bidirectional):
    encoder = encoders[bidirectional]
    encoder.config.pooling, encoder.config.padding_side = pooling, padding_side
    texts = mixed_texts()
    alone = np.stack([encoder.encode([t])[0] for t in texts])
    batched = encoder.encode(texts, batch_size=16)
    shuffled_order = list(reversed(range(len(texts))))
    shuffled = encoder.encode([texts[i] for i in shuffled_order], batch_size=7)[np.argsort(shuffled_order)]
    assert np.abs(alone - batched).max() <= 1e-5
    assert np.abs(alone - shuffled).max() <= 1e-5


def test_left_and_right_padding_agree(encoders):
    encoder = encoders[True]
    texts = mixed_texts(20, seed=1)
    encoder.config.padding_side = "left"
    left = encoder.encode(texts, batch_size=8)
    encoder.config.padding_side = "right"
    right = encoder.encode(texts, batch_size=8)
    assert np.abs(left - right).max() <= 1e-5


def test_encode_outputs(encoders):
    encoder = encoders[True]
    texts = ["first text", "a second, longer text than the first", "third"]
    vectors = encoder.encode(texts)
    assert vectors.shape == (3, encoder.dim) and vectors.dtype == np.float32
    normalized = encoder.encode(texts, normalize=True, convert_to="torch")
    assert isinstance(normalized, torch.Tensor)
    torch.testing.assert_close(normalized.norm(dim=1), torch.ones(3))
    # results come back in input order whatever the batching
    reordered = encoder.encode(texts[::-1], batch_size=1)[::-1]
    assert np.abs(vectors - reordered).max() <= 1e-5
    assert encoder.encode([]).shape == (0, encoder.dim)


def test_hidden_states_every_layer_ends_with_the_states_encode_pools(encoders):
    encoder = encoders[True]
    encoder.config.pooling, encoder.config.padding_side = "mean", "right"
    texts = mixed_texts(6, seed=2)
    batch = encoder.collate(encoder.tokenize(texts))
    with torch.inference_mode():
        last = encoder.hidden_states(batch)
        layers = encoder.hidden_states(batch, every_layer=True)
        pooled = encoder(batch)
    assert len(layers) == encoder.model.config.num_hidden_layers + 1  # the embeddings, then every layer
    assert torch.equal(layers[-1], last) and last.shape[:2] == batch["input_ids"].shape
    assert not torch.allclose(layers[-2], last)  # the raw stream below the final norm differs
    np.testing.assert_allclose(pooled.numpy(), encoder.encode(texts), atol=1e-5)


def test_instruction_changes_the_vector_but_is_not_pooled(encoders):
    encoder = encoders[True]
    encoder.config.pooling = "mean"
    plain = encoder.encode(["what is the capital of france"])
    instructed = encoder.encode(["what is the capital of france"], instruction="Retrieve passages")
    paired = encoder.encode([("Retrieve passages", "what is the capital of france")])
    assert not np.allclose(plain, instructed)
    np.testing.assert_allclose(instructed, paired, atol=1e-6)
    # per-text instructions in one batch give the same vectors as one instruction at a time
    mixed = encoder.encode([("Retrieve passages", "a"), ("Classify the topic", "a"), "a"])
    np.testing.assert_allclose(mixed[0], encoder.encode(["a"], instruction="Retrieve passages")[0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], encoder.encode(["a"], instruction="Classify the topic")[0], atol=1e-5)
    np.testing.assert_allclose(mixed[2], encoder.encode(["a"])[0], atol=1e-5)


def test_empty_string_gives_a_finite_vector(encoders):
    encoder = encoders[True]
    vectors = encoder.encode(["", "", "text"])
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(vectors[0], vectors[1])


def test_long_texts_are_truncated_to_max_length(_tiny_llama_session):
    encoder = Encoder.from_pretrained(_tiny_llama_session, max_length=8)
    long_text = "the cat sat on the mat " * 50
    assert len(encoder.tokenize([long_text])[0].input_ids) == 8
    np.testing.assert_allclose(encoder.encode([long_text]), encoder.encode([long_text + " and more words"]))


def test_bad_input_errors(encoders):
    encoder = encoders[True]
    with pytest.raises(TypeError, match=r"texts\[1\] is a NoneType"):
        encoder.encode(["ok", None])
    with pytest.raises(TypeError, match="list of strings"):
        encoder.encode("one string")
    with pytest.raises(ValueError, match="convert_to"):
        encoder.encode(["a"], convert_to="list")


def test_unknown_pooling_lists_choices(_tiny_llama_session):
    with pytest.raises(ValueError, match="mean, weighted_mean, last_token, bos"):
        Encoder.from_pretrained(_tiny_llama_session, pooling="max")


def test_saved_config_is_restored(tiny_llama_dir):
    Encoder.from_pretrained(tiny_llama_dir, pooling="weighted_mean", max_length=64).save_config(tiny_llama_dir)
    assert json.loads((tiny_llama_dir / "decoder2vec_config.json").read_text())["pooling"] == "weighted_mean"
    restored = Encoder.from_pretrained(tiny_llama_dir)
    assert (restored.config.pooling, restored.config.max_length) == ("weighted_mean", 64)
    assert Encoder.from_pretrained(tiny_llama_dir, pooling="bos").config.pooling == "bos"  # arguments win


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft on transformers 5
def test_adapters_are_merged_with_the_vectors_of_the_live_adapter(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config).save_pretrained(tmp_path / "lora")
    texts = mixed_texts(12)
    merged = Encoder.from_pretrained(tiny_llama_dir, adapter=tmp_path / "lora", device="cpu")
    live = Encoder.from_pretrained(tiny_llama_dir, adapter=tmp_path / "lora", device="cpu", merge_adapters=False)
    assert not isinstance(merged.model, PeftModel) and isinstance(live.model, PeftModel)
    assert not any("lora_" in name for name, _ in merged.model.named_parameters())
    ours, theirs = merged.encode(texts), live.encode(texts)
    base = Encoder.from_pretrained(tiny_llama_dir, device="cpu").encode(texts)
    assert np.abs(theirs - base).max() > 1e-2  # the adapter changes the vectors: the test can tell
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()


def test_missing_source_says_what_to_do(tmp_path):
    with pytest.raises(ModelSourceError, match="not found"):
        Encoder.from_pretrained(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelSourceError, match="config.json"):
        Encoder.from_pretrained(tmp_path)


def test_corrupt_and_truncated_safetensors(tiny_llama_dir):
    weights = tiny_llama_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelSourceError, match="corrupt or truncated|download or export the model again"):
        Encoder.from_pretrained(tiny_llama_dir)
    weights.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelSourceError, match="(?i)corrupt|truncated"):
        Encoder.from_pretrained(tiny_llama_dir)


def test_unsupported_architecture(tiny_llama_dir):
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["model_type"] = "t5"
    config["architectures"] = ["T5ForConditionalGeneration"]
    (tiny_llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="t5"):
        Encoder.from_pretrained(tiny_llama_dir)


def test_encoding_on_several_devices_matches_one(_tiny_llama_session):
    encoder = Encoder.from_pretrained(_tiny_llama_session, device="cpu")
    texts = mixed_texts(30, seed=3)
    single = encoder.encode(texts, batch_size=4)
    spread = encoder.encode(texts, batch_size=4, devices=["cpu", "cpu", "cpu"])  # three replicas, three threads
    np.testing.assert_allclose(spread, single, atol=1e-6)
    assert len(encoder._replica_cache[1]) == 3
    encoder.train()
    assert encoder._replica_cache is None  # copies are dropped once the weights may change
