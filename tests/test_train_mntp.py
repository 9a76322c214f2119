import pytest
import torch

from decoder2vec import Encoder
from decoder2vec.train import MNTPConfig
from decoder2vec.train.mntp import IGNORE_INDEX, MNTPCollator, MNTPLoss, mask_token_id


@pytest.fixture
def encoder(tiny_llama_dir):
    return Encoder.from_pretrained(str(tiny_llama_dir), device="cpu")


def test_collator_masks_a_fifth_bert_style(encoder):
    tokenizer = encoder.tokenizer
    collator = MNTPCollator(tokenizer, mask_probability=0.2)
    sequences = [[tokenizer.bos_token_id] + list(range(10, 200)) for _ in range(40)]
    sequences[0] = sequences[0][:50]  # one short row: padding must never be masked
    batch = collator(sequences, generator=torch.Generator().manual_seed(0))
    original = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in sequences], batch_first=True)
    chosen = batch["labels"] != IGNORE_INDEX
    maskable = batch["attention_mask"].sum() - len(sequences)  # every real token but the first (BOS)
    assert abs(chosen.sum().item() / maskable.item() - 0.2) < 0.02
    assert not chosen[:, 0].any() and not chosen[0, 50:].any()
    assert torch.equal(batch["labels"][chosen], original[chosen])
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])
    replaced = batch["input_ids"][chosen]
    as_mask = (replaced == tokenizer.mask_token_id).float().mean().item()
    unchanged = (replaced == original[chosen]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.03 and abs(unchanged - 0.1) < 0.03


def test_collator_is_deterministic_per_generator_and_masks_at_least_one(encoder):
    collator = MNTPCollator(encoder.tokenizer, mask_probability=0.01)
    a = collator([[5, 6, 7]], generator=torch.Generator().manual_seed(3))
    b = collator([[5, 6, 7]], generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["input_ids"], b["input_ids"]) and (a["labels"] != IGNORE_INDEX).sum() >= 1
    with pytest.raises(ValueError, match="no maskable token"):
        collator([[encoder.tokenizer.bos_token_id]])


def test_mask_token_fallback(encoder):
    tokenizer = encoder.tokenizer
    assert mask_token_id(tokenizer, "_") == tokenizer.mask_token_id
    tokenizer.mask_token = None
    assert mask_token_id(tokenizer, "_") == tokenizer.convert_tokens_to_ids("_")
    with pytest.raises(ValueError, match="not a single token"):
        mask_token_id(tokenizer, "<definitely-not-a-token>")


def test_masked_only_logits_equal_full_logits(encoder):
    """The masked-only path gives the same loss and gradients as full-vocabulary logits at every position."""
    collator = MNTPCollator(encoder.tokenizer, mask_probability=0.3)
    texts = ["A man is playing a guitar.", "The cat sits on the mat while the dog sleeps.", "Paris"]
    ids = [encoder.tokenizer(t).input_ids for t in texts]
    batch = collator(ids, generator=torch.Generator().manual_seed(1))
    results = []
    for full in (False, True):
        encoder.zero_grad()
        loss = MNTPLoss(encoder, full_logits=full)(batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in encoder.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_label_at_i_is_predicted_from_position_i_minus_1(encoder):
    """Changing the token after a masked position must not change its loss under causal attention."""
    causal = Encoder.from_pretrained(str(encoder.source), bidirectional=False, device="cpu")
    batch = MNTPCollator(causal.tokenizer)([[1, 10, 11, 12, 13]], generator=torch.Generator().manual_seed(0))
    batch["labels"][:] = IGNORE_INDEX
    batch["labels"][0, 2] = 11  # predicted from position 1: sees tokens 0..1 only
    first = MNTPLoss(causal)(batch)
    batch["input_ids"][0, 2:] = torch.tensor([20, 21, 22])
    assert torch.allclose(first, MNTPLoss(causal)(batch))


@pytest.mark.parametrize(
    "override, message",
    [({"mask_probability": 0.0}, "mask_probability"), ({"steps": 0}, "steps"), ({"pooling": "max"}, "pooling")],
)
def test_config_validation(override, message):
    with pytest.raises(ValueError, match=message):
        MNTPConfig(**override)
