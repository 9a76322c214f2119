import math

import pytest
import torch

from decoder2vec import Encoder
from decoder2vec.train import InfoNCELoss, SimCSEConfig, set_dropout


def test_infonce_hand_example():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    positives = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    # cosine matrix is the identity; with temperature 1 each row's loss is -log(e / (e + 1))
    expected = math.log(1 + math.exp(-1))
    assert InfoNCELoss(temperature=1.0)(anchors, positives).item() == pytest.approx(expected, abs=1e-6)
    # extra rows in positives are additional negatives
    extra = torch.cat([positives, torch.tensor([[1.0, 0.0]])])
    assert InfoNCELoss(temperature=1.0)(anchors, extra).item() == pytest.approx(
        (math.log(2 + math.exp(-1)) + math.log(1 + 2 * math.exp(-1))) / 2,
        abs=1e-6,
    )


def _two_views(encoder, texts):
    features = encoder.tokenize(texts)
    vectors = encoder(encoder.collate(features + features))
    return vectors[: len(texts)], vectors[len(texts) :]


@pytest.mark.parametrize("attention, hidden", [(0.3, 0.0), (0.0, 0.1)])
def test_dropout_makes_two_views_differ_in_training_only(tiny_llama_dir, attention, hidden):
    encoder = Encoder.from_pretrained(str(tiny_llama_dir), device="cpu")
    texts = ["A man is playing a guitar.", "A woman is slicing an onion."]
    first, second = _two_views(encoder.train(), texts)
    assert torch.allclose(first, second, atol=1e-6)  # a Llama has no dropout of its own
    hooks = set_dropout(encoder.model, attention=attention, hidden=hidden)
    first, second = _two_views(encoder.train(), texts)
    assert not torch.allclose(first, second, atol=1e-4)
    with torch.no_grad():
        first, second = _two_views(encoder.eval(), texts)
    assert torch.allclose(first, second, atol=1e-6)
    for hook in hooks:
        hook.remove()
    set_dropout(encoder.model, attention=0.0)
    first, second = _two_views(encoder.train(), texts)
    assert torch.allclose(first, second, atol=1e-6)


def test_hidden_dropout_needs_decoder_layers():
    with pytest.raises(ValueError, match="cannot find the decoder layers"):
        set_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2)), hidden=0.1)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"attention_dropout": 1.0}, "attention_dropout"),
        ({"temperature": 0}, "temperature"),
        ({"pack_tokens": -1}, "pack_tokens"),
    ],
)
def test_config_validation(override, message):
    with pytest.raises(ValueError, match=message):
        SimCSEConfig(**override)
