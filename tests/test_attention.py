"""Bidirectional attention per architecture: a later token must change token 0's final hidden state, padding must
never change a real token's, and every architecture of the support table gives the same vectors in any batch."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from decoder2vec import POOLING_MODES, BidirectionalUnsupportedError, Encoder, ModelSourceError
from decoder2vec.attention import check_bidirectional, probe_attention
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
        # the load-time probe: a clear margin both ways, and padding that never reaches a real token
        probe = probe_attention(encoder.backbone, encoder.model.config.vocab_size)
        if bidirectional:
            assert min(probe.future_alone, probe.future_padded) > 1000 * probe.future_tolerance, probe
        else:
            assert max(probe.future_alone, probe.future_padded) <= 1e-6, probe
        assert probe.padding_changes <= 1e-6 and probe.padding_vs_alone <= 1e-5, probe


def mixed_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = "the cat dog sat on a mat while paris is capital of france numbers 3.14 emoji 🙂 漢字".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(count)]


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("model_type,implementation", CASES)
def test_vectors_do_not_depend_on_batch_or_padding(model_dirs, model_type, implementation, bidirectional):
    """Each text alone, in padded batches (left and right) and in another order: the same vector within 1e-5."""
    encoder = Encoder.from_pretrained(
        model_dirs[model_type], bidirectional=bidirectional, attn_implementation=implementation, device="cpu"
    )
    texts = mixed_texts(10, seed=list(CONFIGS).index(model_type))
    order = [3, 7, 0, 9, 1, 5, 2, 8, 6, 4]
    worst = {}
    for pooling in POOLING_MODES:
        encoder.config.pooling = pooling
        encoder.config.padding_side = "right"
        alone = np.stack([encoder.encode([text])[0] for text in texts])
        for side in ("left", "right"):
            encoder.config.padding_side = side
            batched = encoder.encode(texts, batch_size=10)
            shuffled = encoder.encode([texts[i] for i in order], batch_size=4)[np.argsort(order)]
            worst[pooling, side] = max(np.abs(alone - batched).max(), np.abs(alone - shuffled).max())
    assert max(worst.values()) <= 1e-5, worst


class _Backbone(torch.nn.Module):
    """A real backbone, broken on purpose: it ignores the padding mask, or adds rounding-size noise."""

    def __init__(self, backbone, ignore_mask=False, noise=0.0):
        super().__init__()
        self.backbone, self.ignore_mask, self.noise = backbone, ignore_mask, noise

    def forward(self, input_ids, attention_mask, position_ids=None, use_cache=False):
        if self.ignore_mask:
            attention_mask = torch.ones_like(attention_mask)
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        # noise of about 1e-7 of the states' scale that depends on the last token: 1-ulp differences, not attention
        hidden = hidden + self.noise * hidden.abs().max() * (input_ids[:, -1:, None] % 7)
        return SimpleNamespace(last_hidden_state=hidden)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
def test_padding_that_reaches_real_tokens_is_an_error(model_dirs, bidirectional):
    encoder = Encoder.from_pretrained(model_dirs["llama"], bidirectional=bidirectional)
    config = encoder.model.config
    check_bidirectional(encoder.backbone, config, bidirectional, "cpu")  # the real model passes
    leaky = _Backbone(encoder.backbone, ignore_mask=True)
    assert probe_attention(leaky, config.vocab_size).padding_changes > 1e-2
    with pytest.raises(BidirectionalUnsupportedError, match="padded positions change"):
        check_bidirectional(leaky, config, bidirectional, "cpu")


def test_rounding_noise_is_not_bidirectional_attention(model_dirs):
    """A causal model whose states move by 1e-7 of their scale with the last token still counts as causal
    (an exact comparison would have called it bidirectional)."""
    encoder = Encoder.from_pretrained(model_dirs["llama"], bidirectional=False)
    config = encoder.model.config
    noisy = _Backbone(encoder.backbone, noise=1e-7)
    probe = probe_attention(noisy, config.vocab_size)
    assert 0 < probe.future_alone < probe.future_tolerance and not probe.attends_to_future
    check_bidirectional(noisy, config, False, "cpu")
    with pytest.raises(BidirectionalUnsupportedError, match="stays causal"):
        check_bidirectional(noisy, config, True, "cpu")


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
