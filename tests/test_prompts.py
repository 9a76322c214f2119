"""Prompt-based embeddings: PromptEOL (last token of a one-word prompt) and echo (second copy of the text).

The pooled tokens are checked token by token against the decoded input, and the Encoder's vectors
against the backbone's hidden states read at positions found independently of decoder2vec.inputs.
"""

import json

import numpy as np
import pytest
import torch

from decoder2vec import Encoder
from decoder2vec.inputs import PROMPT_PRESETS, TextPrompt, _fit, resolve_prompt, tokenize
from decoder2vec.model import EncoderConfig
from decoder2vec.train.stages import _tokenize
from tiny import make_tokenizer

ECHO = PROMPT_PRESETS["echo"]
PROMPTEOL = PROMPT_PRESETS["prompteol"]
TEXTS = [
    "A plain sentence.",
    'He said "yes" and left.',  # quotes, as in PromptEOL's own template
    '"',
    "two\nlines\n",
    "  leading and trailing spaces  ",
    "emoji 🙂🙃 and CJK 漢字",
    "{text} and {} braces",
    "means in one word:",  # the template's own words inside the text
    "x",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(add_bos=True)


def split_by_mask(tokenizer, features):
    """(decoded tokens before the pooled run, the pooled run, after it); the pooled run must be contiguous."""
    ids, mask = features.input_ids, features.pool_mask
    pooled = [i for i, m in enumerate(mask) if m]
    if pooled:
        assert pooled == list(range(pooled[0], pooled[-1] + 1)), "pooled tokens are not one contiguous run"
        first, last = pooled[0], pooled[-1] + 1
    else:
        first = last = len(ids)

    def read(part):
        return tokenizer.decode(part, skip_special_tokens=True)

    return read(ids[:first]), read(ids[first:last]), read(ids[last:])


def check_pooled_is_the_copy(split: tuple[str, str, str], text: str, lead: str, tail: str = ""):
    """The pooled run is ``text``, plus at most whitespace of the template merged into its edge tokens."""
    before, pooled, after = split
    assert before + pooled + after == lead + text + tail
    assert len(before) <= len(lead) and len(after) <= len(tail)  # it covers the whole copy
    assert lead[len(before) :].strip() == "" and tail[: len(tail) - len(after)].strip() == ""


@pytest.mark.parametrize("instruction", ["", "Retrieve passages"])
@pytest.mark.parametrize("text", TEXTS)
def test_echo_pools_exactly_the_second_copy(tokenizer, text, instruction):
    [features] = tokenize(tokenizer, [(instruction, text)], max_length=256, prompt=ECHO)
    prefix = f"{instruction}: " if instruction else ""
    lead = prefix + f"Rewrite the sentence: {text}\nRewritten sentence: "
    assert features.input_ids[0] == tokenizer.bos_token_id and features.pool_mask[0] == 0
    if text:
        check_pooled_is_the_copy(split_by_mask(tokenizer, features), text, lead)
    else:  # nothing of its own to pool: pooling falls back to every real token
        assert sum(features.pool_mask) == 0
        assert split_by_mask(tokenizer, features) == (lead, "", "")


@pytest.mark.parametrize("text", [t for t in TEXTS if t])
def test_echo_with_text_after_the_copy_pools_neither_the_first_copy_nor_the_end(tokenizer, text):
    prompt = TextPrompt("Q:\n{text}\nAgain:\n{text}\nEnd.", "text")
    [features] = tokenize(tokenizer, [("", text)], max_length=256, prompt=prompt)
    check_pooled_is_the_copy(split_by_mask(tokenizer, features), text, f"Q:\n{text}\nAgain:\n", "\nEnd.")


@pytest.mark.parametrize("instruction", ["", "Retrieve passages"])
@pytest.mark.parametrize("text", TEXTS)
def test_prompteol_pools_only_the_last_token(tokenizer, text, instruction):
    [features] = tokenize(tokenizer, [(instruction, text)], max_length=256, prompt=PROMPTEOL)
    prefix = f"{instruction}: " if instruction else ""
    assert features.pool_mask == [0] * (len(features.input_ids) - 1) + [1]
    read = tokenizer.decode(features.input_ids, skip_special_tokens=True)
    assert read == prefix + f'This sentence : "{text}" means in one word:"'
    assert tokenizer.decode(features.input_ids[-1:]).endswith('"')


def test_prompteol_last_token_is_before_an_appended_eos(tokenizer):
    [features] = tokenize(tokenizer, [("", "hello")], max_length=64, prompt=PROMPTEOL, append_eos=True)
    assert features.input_ids[-1] == tokenizer.eos_token_id
    assert features.pool_mask[-2:] == [1, 0] and sum(features.pool_mask) == 1


def test_prompteol_truncation_keeps_the_end_of_the_prompt(tokenizer):
    text = "The cat sits on the mat while the dog sleeps. " * 40
    for max_length in (41, 44, 60):  # the prompt and instruction alone take 38 tokens here
        [features] = tokenize(tokenizer, [("Instruct", text)], max_length=max_length, prompt=PROMPTEOL)
        assert max_length - 2 <= len(features.input_ids) <= max_length
        read = tokenizer.decode(features.input_ids, skip_special_tokens=True)
        head, tail = 'Instruct: This sentence : "', '" means in one word:"'
        assert read.startswith(head) and read.endswith(tail)
        assert text.startswith(read[len(head) : -len(tail)])
        assert features.pool_mask[-1] == 1 and sum(features.pool_mask) == 1


@pytest.mark.parametrize("text", ["word " * 200, "🙂" * 120, "two\nlines " * 60])
@pytest.mark.parametrize("append_eos", [False, True])
def test_echo_truncation_cuts_both_copies_alike(tokenizer, text, append_eos):
    max_length = 40
    [features] = tokenize(tokenizer, [("", text)], max_length=max_length, prompt=ECHO, append_eos=append_eos)
    ids = features.input_ids[:-1] if append_eos else features.input_ids
    # an emoji is 3 byte tokens here and is kept whole: up to 2 tokens of room left per copy, 1 for rounding
    assert max_length - 5 <= len(features.input_ids) <= max_length
    read = tokenizer.decode(ids, skip_special_tokens=True)
    first, second = read.removeprefix("Rewrite the sentence: ").split("\nRewritten sentence: ")
    assert first == second and text.startswith(first) and first
    assert "\ufffd" not in read  # never a cut inside a character's bytes
    lead = f"Rewrite the sentence: {first}\nRewritten sentence: "
    check_pooled_is_the_copy(split_by_mask(tokenizer, features), second, lead)


def test_a_prompt_longer_than_max_length_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="max_length=8 is too short for the prompt"):
        tokenize(tokenizer, [("", "a long enough text " * 5)], max_length=8, prompt=ECHO)


@pytest.mark.parametrize("text", ["word " * 200, "A man is playing a guitar. " * 30])
def test_cutting_the_text_matches_the_tokenizers_truncation_on_a_plain_prompt(tokenizer, text):
    # _fit (used when the template goes on after the text) against the tokenizer's own truncation
    [plain] = tokenize(tokenizer, [("Instruct", text)], max_length=32)
    ids, _, _ = _fit(tokenizer, "Instruct: ", TextPrompt(), text, budget=32, max_length=32)
    assert list(ids) == plain.input_ids


def test_plain_prompt_tokenizes_as_before(tokenizer):
    pairs = [("", "A plain sentence."), ("Retrieve", "word " * 100), ("", "")]
    plain = tokenize(tokenizer, pairs, max_length=32, prompt=TextPrompt())
    assert plain == tokenize(tokenizer, pairs, max_length=32)


def test_resolve_prompt_presets_overrides_and_errors():
    assert resolve_prompt("echo") == ECHO
    assert resolve_prompt("prompteol", "text") == TextPrompt(PROMPTEOL.template, "text")
    assert resolve_prompt('Say "{text}" in one word:', None).pooled == "text"
    with pytest.raises(ValueError, match="prompteol, echo"):
        resolve_prompt("echoo")
    with pytest.raises(ValueError, match="pooled_tokens must be one of: text, prompt_end"):
        EncoderConfig(prompt="echo", pooled_tokens="middle")


# ---------------------------------------------------------------------- the Encoder


def hidden_states(encoder, text: str) -> torch.Tensor:  # (seq, dim): the backbone on one unpadded input
    ids = encoder.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return encoder.backbone(input_ids=ids).last_hidden_state[0].float()


@pytest.mark.parametrize("bidirectional", [True, False])
def test_encoder_prompteol_vector_is_the_hidden_state_of_the_last_token(tiny_llama_dir, bidirectional):
    encoder = Encoder.from_pretrained(tiny_llama_dir, prompt="prompteol", bidirectional=bidirectional, device="cpu")
    texts = ["A man is playing a guitar.", 'a "quoted" word', ""]
    vectors = encoder.encode(texts, convert_to="torch")
    for text, vector in zip(texts, vectors, strict=True):
        expected = hidden_states(encoder, f'This sentence : "{text}" means in one word:"')[-1]
        torch.testing.assert_close(vector, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "weighted_mean"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_encoder_echo_vector_pools_the_second_copy(tiny_llama_dir, bidirectional, pooling):
    encoder = Encoder.from_pretrained(
        tiny_llama_dir, prompt="echo", pooling=pooling, bidirectional=bidirectional, device="cpu"
    )
    texts = ["A man is playing a guitar.", "Paris is the capital of France."]
    vectors = encoder.encode(texts, convert_to="torch")
    for text, vector in zip(texts, vectors, strict=True):
        lead = f"Rewrite the sentence: {text}\nRewritten sentence: "
        hidden = hidden_states(encoder, lead + text)
        ids, lead_ids = (encoder.tokenizer(t)["input_ids"] for t in (lead + text, lead))
        # the copy starts after the lead's tokens, or with the lead's last space when it merges into the first word
        start = (
            len(lead_ids) if ids[: len(lead_ids)] == lead_ids else len(encoder.tokenizer(lead.rstrip())["input_ids"])
        )
        copy = hidden[start:]  # (copy tokens, dim)
        weights = torch.arange(1, len(copy) + 1, dtype=copy.dtype)[:, None] if pooling == "weighted_mean" else 1
        expected = (copy * weights).sum(0) / (weights.sum() if pooling == "weighted_mean" else len(copy))
        torch.testing.assert_close(vector, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prompt", ["prompteol", "echo"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_vectors_do_not_depend_on_the_batch(tiny_llama_dir, prompt, padding_side, bidirectional):
    encoder = Encoder.from_pretrained(
        tiny_llama_dir, prompt=prompt, padding_side=padding_side, bidirectional=bidirectional, device="cpu"
    )
    texts = ["short", "A much longer sentence with emoji 🙂 and\nnewlines.", "", 'quote " here', "x " * 40]
    batched = encoder.encode(texts, batch_size=8)
    alone = np.stack([encoder.encode([t])[0] for t in texts])
    assert np.isfinite(batched).all()
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)


def test_prompt_is_saved_and_loaded_with_the_config(tiny_llama_dir, tmp_path):
    template = "Text:\n{text}\nSame text:\n{text}"
    encoder = Encoder.from_pretrained(tiny_llama_dir, prompt=template, pooling="mean", device="cpu")
    encoder.save_config(tiny_llama_dir)
    saved = json.loads((tiny_llama_dir / "decoder2vec_config.json").read_text())
    assert saved["prompt"] == template and saved["pooled_tokens"] is None
    loaded = Encoder.from_pretrained(tiny_llama_dir, device="cpu")
    assert loaded.config.text_prompt == TextPrompt(template, "text")
    texts = ["A cat.", ""]
    np.testing.assert_allclose(loaded.encode(texts), encoder.encode(texts), rtol=0, atol=1e-6)
    # a setting given at load time wins over the saved one, and a preset brings its own pooled tokens
    assert Encoder.from_pretrained(tiny_llama_dir, prompt="prompteol", device="cpu").config.text_prompt == PROMPTEOL


def test_cli_prompt_option(tiny_llama_dir, tmp_path):
    from decoder2vec.cli import main

    texts = tmp_path / "texts.txt"
    texts.write_text("A man is playing a guitar.\nA dog runs.\n")
    out = tmp_path / "out.npy"
    command = ["encode", str(texts), "-o", str(out), "--model", str(tiny_llama_dir), "--device", "cpu"]
    assert main([*command, "--prompt", "echo", "--pooled-tokens", "prompt_end"]) == 0
    encoder = Encoder.from_pretrained(tiny_llama_dir, prompt="echo", pooled_tokens="prompt_end", device="cpu")
    expected = encoder.encode(["A man is playing a guitar.", "A dog runs."])
    np.testing.assert_allclose(np.load(out), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prompt", ["prompteol", "echo"])
def test_training_tokenizes_with_the_encoders_prompt(tiny_llama_dir, prompt):
    encoder = Encoder.from_pretrained(tiny_llama_dir, prompt=prompt, device="cpu")
    texts = ["A man is playing a guitar.", "word " * 100]
    features = _tokenize(encoder, texts, 64, "Retrieve")
    assert features == encoder.tokenize(texts, "Retrieve", max_length=64)
    assert all(len(f.input_ids) <= 64 for f in features) and len(features[1].input_ids) > 60
    first = encoder.tokenizer.decode(features[0].input_ids, skip_special_tokens=True)
    assert first == "Retrieve: " + PROMPT_PRESETS[prompt].render("", texts[0])[0]


def test_sentence_transformers_export_refuses_a_prompt(tiny_llama_dir, tmp_path):
    from decoder2vec.export import ExportError, export_model

    encoder = Encoder.from_pretrained(tiny_llama_dir, prompt="echo", device="cpu")
    with pytest.raises(ExportError, match="cannot express prompt='echo'.*--format merged"):
        export_model(encoder, tmp_path / "st", format="sentence-transformers")
    assert not (tmp_path / "st").exists()
    merged = export_model(encoder, tmp_path / "merged", format="merged")
    assert Encoder.from_pretrained(merged, device="cpu").config.text_prompt == ECHO
