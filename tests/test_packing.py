"""Padding-free packs (decoder2vec.packing): the same losses, gradients and vectors as padded batches."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from decoder2vec import Encoder
from decoder2vec.packing import PackedEmbedder, can_pack, collate_packed, forward_packed, pack_indices
from decoder2vec.train import SimCSEConfig
from decoder2vec.train.run import _add_lora
from decoder2vec.train.stages import simcse_stage
from tiny import CONFIGS, make_model_dir, make_tokenizer

SENTENCES = [
    "A man is playing a guitar.",
    "A woman is slicing an onion.",
    "The cat sits on the mat while the dog sleeps.",
    "Paris is the capital and most populous city of France.",
    "Numbers like 3.14, 42 and 1,000,000 appear in text.",
    "Hi",
    "Unusual characters: tab\there, emoji 🙂, accents éàü.",
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Tiny llama, and tiny Gemma 3 text models with a sliding window larger (64) and smaller (4) than the texts."""
    root = tmp_path_factory.mktemp("packing-models")
    dirs = {
        "llama": make_model_dir(root / "llama", "llama"),
        "gemma3_window4": make_model_dir(root / "g4", "gemma3_text"),
    }
    config = CONFIGS["gemma3_text"]()
    config.sliding_window = 64
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "g64")
    make_tokenizer().save_pretrained(root / "g64")
    dirs["gemma3_window64"] = root / "g64"
    return dirs


def _lora_encoder(path, attn_implementation, bidirectional=True):
    """An encoder with a LoRA adapter whose B matrices are random (peft starts them at 0: no gradient for A)."""
    encoder = Encoder.from_pretrained(
        str(path), device="cpu", attn_implementation=attn_implementation, bidirectional=bidirectional
    )
    encoder.model = _add_lora(encoder.model, SimCSEConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    return encoder.train()


def _loss_and_gradients(encoder, config):
    stage = simcse_stage(config, encoder)
    encoder.zero_grad()
    loss = stage.step(stage.module, SENTENCES, torch.Generator().manual_seed(0), backward=torch.Tensor.backward)
    gradients = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}
    for undo in stage.cleanup:
        undo()
    return loss, gradients


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("model, bidirectional", [("llama", True), ("llama", False), ("gemma3_window64", True)])
def test_packed_simcse_step_equals_padded_in_loss_and_gradients(
    model_dirs, tmp_path, model, bidirectional, attn_implementation
):
    """The issue's acceptance test: packing changes neither the loss nor any LoRA gradient (within 1e-5)."""
    data = tmp_path / "sentences.txt"
    data.write_text("\n".join(SENTENCES) + "\n")
    encoder = _lora_encoder(model_dirs[model], attn_implementation, bidirectional)
    common = dict(data=[str(data)], max_seq_length=16, attention_dropout=0.0, lora_dropout=0.0, temperature=0.5)
    features = encoder.tokenize(SENTENCES, max_length=16)
    assert can_pack(encoder, max(len(f.input_ids) for f in features))
    assert len(pack_indices([len(f.input_ids) for f in features * 2], 24)) > 2  # several rows, padding in some
    packed_loss, packed = _loss_and_gradients(encoder, SimCSEConfig(**common, pack_tokens=24))
    padded_loss, padded = _loss_and_gradients(encoder, SimCSEConfig(**common, pack_tokens=0))
    assert abs(packed_loss.item() - padded_loss.item()) <= 1e-5 and padded_loss.item() > 0.1
    trainable = {name for name, p in encoder.named_parameters() if p.requires_grad}
    assert packed.keys() == padded.keys() == trainable and any("lora_A" in name for name in trainable)
    for name, gradient in padded.items():
        assert gradient.abs().max() > 1e-4, name  # a real gradient, not zeros compared with zeros
        torch.testing.assert_close(packed[name], gradient, rtol=0, atol=1e-5, msg=name)


def test_packing_falls_back_to_padding_when_a_text_is_longer_than_the_sliding_window(model_dirs):
    """Gemma 3 with a 4-token window: a packed mask would let tokens 5 apart see each other, so it pads."""
    encoder = Encoder.from_pretrained(str(model_dirs["gemma3_window4"]), device="cpu")
    features = encoder.tokenize(SENTENCES)
    assert not can_pack(encoder, max(len(f.input_ids) for f in features))
    assert can_pack(encoder, 4) and not can_pack(encoder)
    embedder = PackedEmbedder(encoder, max_tokens=64)
    batch = embedder.collate(features)
    assert "token_index" not in batch  # the padded batch
    with torch.no_grad():
        padded = encoder(encoder.collate(features))
        torch.testing.assert_close(embedder(batch), padded)
        forced = forward_packed(encoder, collate_packed(encoder, features, max_tokens=64))
    assert (forced - padded).abs().max() > 1e-3  # what packing anyway would have done: wrong vectors


def test_flash_attention_and_other_kernels_do_not_pack(model_dirs):
    encoder = Encoder.from_pretrained(str(model_dirs["llama"]), device="cpu")
    assert can_pack(encoder, 512)
    encoder.model.config._attn_implementation = "flash_attention_2"
    assert not can_pack(encoder, 8)


def test_two_views_of_a_text_get_different_dropout_when_packed(model_dirs):
    encoder = Encoder.from_pretrained(str(model_dirs["llama"]), device="cpu").train()
    encoder.model.config.attention_dropout = 0.3
    for module in encoder.model.modules():
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.3
    features = encoder.tokenize(SENTENCES)
    embedder = PackedEmbedder(encoder, max_tokens=64)
    batch = embedder.collate(features + features)
    assert "token_index" in batch
    vectors = embedder(batch)
    first, second = vectors[: len(SENTENCES)], vectors[len(SENTENCES) :]
    assert ((first - second).abs().amax(dim=1) > 1e-4).all()  # every text's two views differ
    with torch.no_grad():
        vectors = embedder.eval()(batch)  # no dropout: the two copies agree
    torch.testing.assert_close(vectors[: len(SENTENCES)], vectors[len(SENTENCES) :], rtol=0, atol=1e-5)


def test_pack_indices_first_fit_by_decreasing_length():
    assert pack_indices([5, 3, 8, 2, 2], 10) == [[2, 3], [0, 1, 4]]
    assert pack_indices([12, 1], 10) == [[0], [1]]  # a text longer than a row fills one alone


def test_collate_packed_layout(model_dirs):
    encoder = Encoder.from_pretrained(str(model_dirs["llama"]), device="cpu")
    features = encoder.tokenize(["Hi", "A man is playing a guitar."])
    lengths = [len(f.input_ids) for f in features]
    batch = collate_packed(encoder, features, max_tokens=64)
    assert batch["input_ids"].shape == (1, sum(lengths))  # one row, no padding
    assert batch["position_ids"][0].tolist() == list(range(lengths[1])) + list(range(lengths[0]))
    allowed = batch["attention_mask"][0, 0] == 0
    assert allowed[: lengths[1], : lengths[1]].all() and allowed[lengths[1] :, lengths[1] :].all()
    assert not allowed[: lengths[1], lengths[1] :].any() and not allowed[lengths[1] :, : lengths[1]].any()
    assert batch["input_ids"][0].flatten()[batch["token_index"][0, : lengths[0]]].tolist() == features[0].input_ids
