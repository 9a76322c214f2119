"""Bidirectional attention per architecture: a later token must change token 0's final hidden state."""

import pytest
import torch

from decoder2vec import BidirectionalUnsupportedError, Encoder, ModelSourceError
from tiny import CONFIGS, make_model_dir

IMPLEMENTATIONS = ["eager", "sdpa"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {name: make_model_dir(tmp_path_factory.mktemp(name), name) for name in CONFIGS}


def first_token_state(encoder: Encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return encoder.backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]


def sees_the_future(encoder: Encoder, vocab_size: int) -> tuple[bool, bool]:
    """(at batch size 1, in a padded batch): does token 0 change when only the last token changes?"""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (1, 7), generator=generator)
    changed = ids.clone()
    changed[0, -1] = 5 + (ids[0, -1] - 5 + 1) % (vocab_size - 5)
    ones = torch.ones_like(ids)
    alone = (first_token_state(encoder, ids, ones) - first_token_state(encoder, changed, ones)).abs().max()
    # padded batch: the row of interest next to a shorter row (right padding) and a left-padded row
    filler = torch.randint(5, vocab_size, (2, 7), generator=generator)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0] * 3 + [1] * 4])
    batch_a = torch.cat([ids, filler])
    batch_b = torch.cat([changed, filler])
    padded = (first_token_state(encoder, batch_a, mask)[0] - first_token_state(encoder, batch_b, mask)[0]).abs().max()
    return bool(alone > 1e-6), bool(padded > 1e-6)


CASES = [(name, impl) for name in CONFIGS for impl in IMPLEMENTATIONS if not (name == "gemma2" and impl == "sdpa")]


@pytest.mark.parametrize("model_type,implementation", CASES)
def test_bidirectional_sees_later_tokens_and_causal_does_not(model_dirs, model_type, implementation):
    for bidirectional in (True, False):
        encoder = Encoder.from_pretrained(
            model_dirs[model_type], bidirectional=bidirectional, attn_implementation=implementation
        )
        assert encoder.model.config._attn_implementation == implementation
        alone, padded = sees_the_future(encoder, encoder.model.config.vocab_size)
        assert (alone, padded) == (bidirectional, bidirectional), (model_type, implementation, bidirectional)


def test_gemma2_under_sdpa_is_a_clear_error(model_dirs):
    with pytest.raises(ModelSourceError, match="gemma2.*eager"):
        Encoder.from_pretrained(model_dirs["gemma2"], attn_implementation="sdpa")
    # without asking, Gemma2 gets the eager backend it supports
    assert Encoder.from_pretrained(model_dirs["gemma2"]).model.config._attn_implementation == "eager"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_flag_equals_an_explicit_full_mask(model_dirs, implementation):
    bidirectional = Encoder.from_pretrained(model_dirs["llama"], attn_implementation=implementation)
    causal = Encoder.from_pretrained(model_dirs["llama"], bidirectional=False, attn_implementation=implementation)
    ids = torch.randint(5, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    full = torch.zeros(2, 1, 9, 9)  # additive 4D mask: every token attends to every token
    with torch.inference_mode():
        flagged = bidirectional.backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        explicit = causal.backbone(input_ids=ids, attention_mask=full).last_hidden_state
    torch.testing.assert_close(flagged, explicit, rtol=0, atol=1e-5)


def test_a_model_that_ignores_the_switch_raises(model_dirs, monkeypatch):
    import decoder2vec.model

    monkeypatch.setattr(decoder2vec.model, "set_bidirectional", lambda model, bidirectional: None)
    with pytest.raises(BidirectionalUnsupportedError, match="stays causal"):
        Encoder.from_pretrained(model_dirs["llama"], bidirectional=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_real_models_become_bidirectional(name):
    for implementation in IMPLEMENTATIONS:
        for bidirectional in (True, False):
            encoder = Encoder.from_pretrained(name, bidirectional=bidirectional, attn_implementation=implementation)
            vocab = encoder.model.config.get_text_config().vocab_size
            assert sees_the_future(encoder, min(vocab, 5000)) == (bidirectional, bidirectional), (
                name,
                implementation,
                bidirectional,
            )
