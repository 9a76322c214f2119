import pytest

from decoder2vec.inputs import normalize_inputs, pad_batch, tokenize
from tiny import make_tokenizer

UNUSUAL_TEXTS = [
    "A plain sentence.",
    "  leading and trailing spaces  ",
    "tab\tseparated\tvalues",
    "two\nlines",
    "!@#$%^&*()",  # the reference implementation's separator string
    "the separator !@#$%^&*() in the middle",
    "special-token text </s> <s> <pad> [SEP] <|im_end|>",
    "emoji 🙂🙃 and CJK 漢字 and accents éàü",
    "\u200bzero-width\u200b and \x00 control",
    ":",
    "x",
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(add_bos=True)


def pooled_and_read(tokenizer, features):
    ids, mask = features.input_ids, features.pool_mask
    pooled = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
    unpooled = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m], skip_special_tokens=True)
    return pooled, unpooled


@pytest.mark.parametrize("text", UNUSUAL_TEXTS)
def test_pooled_tokens_are_exactly_the_text(tokenizer, text):
    # A newline ends the instruction, so the byte-level tokenizer never merges across the boundary.
    [features] = tokenize(
        tokenizer, [("Retrieve passages", text)], max_length=256, instruction_template="{instruction}\n"
    )
    pooled, unpooled = pooled_and_read(tokenizer, features)
    assert pooled == text
    assert unpooled == "Retrieve passages\n"
    assert features.input_ids[0] == tokenizer.bos_token_id and features.pool_mask[0] == 0


@pytest.mark.parametrize("text", UNUSUAL_TEXTS)
def test_default_template_pools_text_and_at_most_the_boundary_space(tokenizer, text):
    [features] = tokenize(tokenizer, [("Retrieve passages", text)], max_length=256)
    pooled, unpooled = pooled_and_read(tokenizer, features)
    # A token that straddles the boundary (": " + word) is pooled: it carries text characters.
    assert pooled in (text, " " + text)
    assert unpooled + pooled == "Retrieve passages: " + text


@pytest.mark.parametrize("text", UNUSUAL_TEXTS)
def test_without_instruction_every_text_token_is_pooled(tokenizer, text):
    [features] = tokenize(tokenizer, [("", text)], max_length=256)
    pooled, _ = pooled_and_read(tokenizer, features)
    assert pooled == text
    assert features.pool_mask == [0] + [1] * (len(features.input_ids) - 1)


def test_special_token_text_is_not_a_special_token(tokenizer):
    [features] = tokenize(tokenizer, [("", "a </s> b")], max_length=64)
    assert tokenizer.eos_token_id not in features.input_ids


def test_append_eos_adds_the_eos_id_not_its_text(tokenizer):
    [features] = tokenize(tokenizer, [("", "hello")], max_length=64, append_eos=True)
    assert features.input_ids[-1] == tokenizer.eos_token_id
    assert features.pool_mask[-1] == 0
    assert tokenizer.decode([t for t, m in zip(features.input_ids, features.pool_mask, strict=True) if m]) == "hello"


def test_truncation_keeps_instruction_and_eos_within_max_length(tokenizer):
    long_text = "word " * 200
    [features] = tokenize(tokenizer, [("Instruct", long_text)], max_length=16, append_eos=True)
    assert len(features.input_ids) == 16
    assert features.input_ids[-1] == tokenizer.eos_token_id
    assert sum(features.pool_mask) > 0


def test_empty_text_pools_nothing_and_tokenizer_without_specials_gets_a_filler():
    [features] = tokenize(make_tokenizer(add_bos=True), [("", "")], max_length=8)
    assert features.input_ids == [1] and features.pool_mask == [0]
    bare = make_tokenizer(add_bos=False)
    [features] = tokenize(bare, [("", "")], max_length=8)
    assert len(features.input_ids) == 1 and features.pool_mask == [0]


def test_normalize_inputs_errors_name_the_index():
    assert normalize_inputs(["a", ("inst", "b")], "q") == [("q", "a"), ("inst", "b")]
    with pytest.raises(TypeError, match=r"texts\[2\] is a int"):
        normalize_inputs(["a", "b", 3], None)
    with pytest.raises(TypeError, match=r"texts\[0\] is a tuple"):
        normalize_inputs([("only one",)], None)
    with pytest.raises(TypeError, match="list of strings"):
        normalize_inputs("a single string", None)


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_batch_positions_count_real_tokens(tokenizer, side):
    features = tokenize(tokenizer, [("", "a b c d"), ("", "a")], max_length=64)
    batch = pad_batch(features, pad_id=0, padding_side=side)
    short = batch["position_ids"][1][batch["attention_mask"][1] == 1]
    assert short.tolist() == list(range(len(features[1].input_ids)))
    assert batch["pool_mask"].sum().item() == sum(sum(f.pool_mask) for f in features)


LONG_TEXTS = [
    "word " * 5000,  # tokens of 5 characters: read from the first characters only
    "a" * 9000,  # one run without spaces: merges can reach far, so the whole text is tokenized
    "=" * 700 + " tail " * 2000,
    "short text",
    ("emoji 🙂 and 漢字 " * 800),
]


@pytest.mark.parametrize(
    "prompt, max_length", [(None, 8), (None, 40), (None, 300), ("echo", 48), ("echo", 300), ("prompteol", 40)]
)
def test_long_texts_give_the_tokens_of_the_whole_text(tokenizer, monkeypatch, prompt, max_length):
    import decoder2vec.inputs as inputs

    options = dict(max_length=max_length, append_eos=True)
    if prompt:
        options["prompt"] = inputs.resolve_prompt(prompt)
    pairs = [("Retrieve", text) for text in LONG_TEXTS] + [("", text) for text in LONG_TEXTS]
    fast = tokenize(tokenizer, pairs, **options)
    monkeypatch.setattr(inputs, "_MIN_CHARS", 10**9)  # no text is shortened before tokenizing
    whole = tokenize(tokenizer, pairs, **options)
    assert [f.input_ids for f in fast] == [f.input_ids for f in whole]
    assert [f.pool_mask for f in fast] == [f.pool_mask for f in whole]
    assert all(len(f.input_ids) <= max_length for f in fast)
