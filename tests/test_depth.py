"""Embedding from the first N decoder layers (decoder2vec.depth, EncoderConfig.num_layers)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from decoder2vec import Encoder
from decoder2vec.depth import keep_first_layers
from decoder2vec.pooling import pool
from decoder2vec.train import SimCSEConfig, train
from tiny import make_model_dir

TEXTS = ["A man is playing a guitar.", "The cat sits on the mat while the dog sleeps.", "Paris."]


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_vectors_are_the_pooled_states_of_layer_n_after_the_final_norm(model_type, tmp_path):
    folder = make_model_dir(tmp_path / model_type, model_type)
    full = Encoder.from_pretrained(folder, device="cpu")
    batch = full.collate(full.tokenize(TEXTS))
    with torch.no_grad():
        states = full.backbone(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            output_hidden_states=True,
        ).hidden_states  # embeddings, layer 1, layer 2 (the last one normed already)
        expected = pool(full.backbone.norm(states[1]).float(), batch["attention_mask"], batch["pool_mask"], "mean")
    cut = Encoder.from_pretrained(folder, device="cpu", num_layers=1)
    assert len(cut.backbone.layers) == 1 and cut.model.config.get_text_config().num_hidden_layers == 1
    got = cut.encode(TEXTS, convert_to="torch")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - full.encode(TEXTS, convert_to="torch")).abs().max() > 1e-3  # layer 1 is not the output
    # still bidirectional at the cut: the last token changes the first token's state
    cut.verify_attention()


def test_cut_model_saves_as_a_smaller_model_of_the_same_class(tiny_llama_dir, tmp_path):
    cut = Encoder.from_pretrained(tiny_llama_dir, device="cpu", num_layers=1)
    cut.model.save_pretrained(tmp_path / "cut")
    cut.tokenizer.save_pretrained(tmp_path / "cut")
    cut.save_config(tmp_path / "cut")
    weights = load_file(tmp_path / "cut" / "model.safetensors")
    assert not any(".layers.1." in name for name in weights)
    again = Encoder.from_pretrained(tmp_path / "cut", device="cpu")
    assert len(again.backbone.layers) == 1
    torch.testing.assert_close(again.encode(TEXTS, convert_to="torch"), cut.encode(TEXTS, convert_to="torch"))


def test_adapter_trained_at_a_depth_is_loaded_at_that_depth(tiny_llama_dir, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text("\n".join(TEXTS * 4) + "\n")
    config = SimCSEConfig(
        model=str(tiny_llama_dir), data=[str(text_file)], output_dir=str(tmp_path / "run"), steps=2, batch_size=4,
        max_seq_length=16, progress=False, num_layers=1,
    )  # fmt: skip
    result = train(config)
    assert all(".layers.0." in name for name in load_file(result.run_dir / "adapter_model.safetensors"))
    trained = Encoder.from_pretrained(tiny_llama_dir, adapter=result.run_dir, device="cpu")
    assert trained.config.num_layers == 1 and len(trained.backbone.layers) == 1
    torch.testing.assert_close(
        trained.encode(TEXTS, convert_to="torch"),
        result.encoder.encode(TEXTS, convert_to="torch"),
        rtol=1e-4,
        atol=1e-5,
    )


def test_bad_depths_are_refused_with_the_model_s_layer_count(tiny_llama_dir):
    with pytest.raises(ValueError, match="from 1 to the model's 2 decoder layers, not 3"):
        Encoder.from_pretrained(tiny_llama_dir, device="cpu", num_layers=3)
    with pytest.raises(ValueError, match="num_layers must be an integer >= 1"):
        Encoder.from_pretrained(tiny_llama_dir, device="cpu", num_layers=0)
    with pytest.raises(ValueError, match="num_layers must be an integer >= 1"):
        SimCSEConfig(num_layers=0)
    encoder = Encoder.from_pretrained(tiny_llama_dir, device="cpu")
    keep_first_layers(encoder.model, None)  # None and the full count leave the model as it is
    keep_first_layers(encoder.model, 2)
    assert len(encoder.backbone.layers) == 2
