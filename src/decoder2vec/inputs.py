"""From texts to model inputs: instruction + text, and the mask of the tokens that are pooled.

The model reads ``instruction_template.format(instruction=...)`` followed by the text. Which
tokens belong to the text is decided from the tokenizer's character offsets: a token is pooled
when its character span overlaps the text's span. Nothing is inserted into the text and nothing
is searched for inside it, so any text (with separators, markup, emoji, control characters) works.
Special-token strings typed inside a text (``</s>``, ``<|im_end|>``) are read as plain text.

A :class:`TextPrompt` writes the text into a template first (``{text}`` once or more) and says which
tokens are pooled: the tokens of the text's last copy (``text``; echo embeddings) or the input's final
token (``prompt_end``; PromptEOL). The instruction, when there is one, comes before the template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "POOLED_TOKENS",
    "PROMPT_PRESETS",
    "Features",
    "TextInput",
    "TextPrompt",
    "normalize_inputs",
    "pad_batch",
    "resolve_prompt",
    "tokenize",
]

TextInput = str | tuple[str, str]  # a text, or an (instruction, text) pair


@dataclass
class Features:
    """One tokenized input."""

    input_ids: list[int]
    pool_mask: list[int]  # 1 where the token belongs to the text (before the pooling mode is applied)


POOLED_TOKENS = ("text", "prompt_end")


@dataclass(frozen=True)
class TextPrompt:
    """How a text is written into the model's input, and which of the input's tokens are pooled.

    ``template`` holds ``{text}`` once or more; every other character, braces included, is literal.
    ``pooled`` is ``text`` (the tokens of the last copy of the text) or ``prompt_end`` (the last token
    of the whole input, the one after which the model would write its answer).
    """

    template: str = "{text}"
    pooled: str = "text"

    def __post_init__(self):
        if not isinstance(self.template, str) or "{text}" not in self.template:
            raise ValueError(
                f"prompt {self.template!r} is neither a preset ({', '.join(PROMPT_PRESETS)}) "
                "nor a template with a '{text}' placeholder"
            )
        if self.pooled not in POOLED_TOKENS:
            raise ValueError(f"pooled_tokens must be one of: {', '.join(POOLED_TOKENS)}; not {self.pooled!r}")

    @property
    def copies(self) -> int:
        return self.template.count("{text}")

    @property
    def is_plain(self) -> bool:
        return self.template == "{text}" and self.pooled == "text"

    def render(self, prefix: str, text: str) -> tuple[str, tuple[int, int]]:
        """``prefix`` + the template filled with ``text``; and the character span of the text's last copy."""
        parts = self.template.split("{text}")
        full = prefix + text.join(parts)
        end = len(full) - len(parts[-1])
        return full, (end - len(text), end)


PROMPT_PRESETS: dict[str, TextPrompt] = {
    # Jiang et al. 2023, "Scaling Sentence Embeddings with Large Language Models": the hidden state
    # that would predict the one word is the sentence's vector.
    "prompteol": TextPrompt('This sentence : "{text}" means in one word:"', "prompt_end"),
    # Springer et al. 2024, "Repetition Improves Language Model Embeddings": tokens of the second copy
    # have seen the whole text even under a causal mask.
    "echo": TextPrompt("Rewrite the sentence: {text}\nRewritten sentence: {text}", "text"),
}


def resolve_prompt(prompt: str = "{text}", pooled_tokens: str | None = None) -> TextPrompt:
    """A preset name or a template (with ``{text}``), and an optional override of what is pooled."""
    preset = PROMPT_PRESETS.get(prompt)
    if preset is not None:
        return TextPrompt(preset.template, pooled_tokens or preset.pooled)
    return TextPrompt(prompt, pooled_tokens or "text")


def normalize_inputs(texts: Sequence[TextInput], instruction: str | None) -> list[tuple[str, str]]:
    """Validate ``texts`` and return (instruction, text) pairs; '' means no instruction."""
    if isinstance(texts, str | tuple):
        raise TypeError("texts must be a list of strings (or of (instruction, text) pairs), not a single value")
    pairs = []
    for index, item in enumerate(texts):
        if isinstance(item, str):
            pairs.append((instruction or "", item))
        elif isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(part, str) for part in item):
            pairs.append((item[0], item[1]))
        else:
            raise TypeError(
                f"texts[{index}] is a {type(item).__name__}, expected a str or an (instruction, text) pair of str"
            )
    return pairs


def tokenize(
    tokenizer,
    pairs: list[tuple[str, str]],
    *,
    max_length: int,
    instruction_template: str = "{instruction}: ",
    append_eos: bool = False,
    prompt: TextPrompt | None = None,
) -> list[Features]:
    """Tokenize (instruction, text) pairs; keep the pooled tokens in ``pool_mask``.

    Texts are truncated so that the whole input, special tokens and appended EOS included, has at
    most ``max_length`` tokens. With ``append_eos`` the tokenizer's EOS token id (never its text) is
    added after the text, so ``last_token`` pooling reads a real EOS. With a ``prompt`` that has text
    after the text's last copy, or several copies, the text itself is shortened (every copy alike) and
    the input tokenized again, so the template's end is always read.
    """
    if not pairs:
        return []
    prompt = prompt or TextPrompt()
    prefixes = [instruction_template.format(instruction=inst) if inst else "" for inst, _ in pairs]
    eos = tokenizer.eos_token_id if append_eos else None
    budget = max_length - (1 if eos is not None else 0)
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for text; use max_length >= 2")
    # A long text is tokenized from its first `limit` characters only (a 1 MB row read for 512 tokens would
    # otherwise cost its whole tokenization, in time and memory); a row is accepted from that shortened text
    # only when what it keeps ends in the first half of it, far from the cut, else it is tokenized whole.
    limit = max(_MIN_CHARS, _CHARS_PER_TOKEN * budget)
    texts = [text if len(text) <= limit else text[:limit] for _, text in pairs]
    rendered = [prompt.render(prefix, text) for prefix, text in zip(prefixes, texts, strict=True)]
    ends_with_text = prompt.copies == 1 and prompt.template.endswith("{text}")
    # With the text last, the tokenizer's own truncation (cut the end) is exact; otherwise rows that
    # are too long are shortened one by one in _fit.
    encoded = _encode(tokenizer, [full for full, _ in rendered], budget if ends_with_text else None)
    features = []
    rows = zip(prefixes, pairs, texts, rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True)
    for prefix, (_, text), short, (_, span), ids, offsets in rows:
        if len(ids) > budget:
            ids, offsets, span = _fit(tokenizer, prefix, prompt, short, budget, max_length)
        if len(short) < len(text) and _kept_chars(offsets, span, ends_with_text) > limit // 2:
            # too close to the cut: the whole text, as without it
            ids, offsets, span = _tokenize_whole(tokenizer, prefix, prompt, text, budget, max_length)
        mask = _pool_mask(offsets, span, prompt.pooled)
        ids = list(ids)
        if eos is not None:
            ids.append(eos)
            mask.append(0)
        if not ids:  # an empty text with a tokenizer that adds no special tokens
            ids, mask = [_filler_id(tokenizer)], [0]
        features.append(Features(input_ids=ids, pool_mask=mask))
    return features


def _tokenize_whole(tokenizer, prefix: str, prompt: TextPrompt, text: str, budget: int, max_length: int):
    """(ids, offsets, span) of one whole text in its prompt, shortened to ``budget`` tokens as tokenize does."""
    full, span = prompt.render(prefix, text)
    ends_with_text = prompt.copies == 1 and prompt.template.endswith("{text}")
    encoded = _encode(tokenizer, [full], budget if ends_with_text else None)
    ids, offsets = encoded["input_ids"][0], encoded["offset_mapping"][0]
    if len(ids) > budget:
        return _fit(tokenizer, prefix, prompt, text, budget, max_length)
    return ids, offsets, span


_MIN_CHARS = 1024  # texts up to this long are always tokenized whole
_CHARS_PER_TOKEN = 32  # 8x the ~4 characters of an English BPE token


def _kept_chars(offsets, span: tuple[int, int], ends_with_text: bool) -> int:
    """How far into the text's last copy the kept input reaches, in characters."""
    if not ends_with_text:
        return span[1] - span[0]  # _fit cut the text itself: all of what is left is read
    ends = [end for begin, end in offsets if end > begin and begin < span[1]]
    return max(ends, default=span[0]) - span[0]


def _encode(tokenizer, fulls: list[str], truncate_to: int | None):
    return tokenizer(
        fulls,
        add_special_tokens=True,
        truncation=truncate_to is not None,
        max_length=truncate_to,
        return_offsets_mapping=True,
        return_attention_mask=False,
        split_special_tokens=True,  # "</s>" typed inside a text is text, not an EOS token
        verbose=False,  # over-long rows are expected here: they are cut below
    )


def _pool_mask(offsets, span: tuple[int, int], pooled: str) -> list[int]:
    """1 for the tokens that overlap the text's span (``text``) or for the input's last token (``prompt_end``).

    Special tokens have empty character spans (start == end) and are never pooled.
    """
    if pooled == "prompt_end":
        mask = [0] * len(offsets)
        real = [i for i, (begin, end) in enumerate(offsets) if end > begin]
        if real:
            mask[real[-1]] = 1
        return mask
    start, stop = span
    if stop == start:  # an empty text owns no token, not even one that spans the template around it
        return [0] * len(offsets)
    return [1 if end > begin and end > start and begin < stop else 0 for begin, end in offsets]


def _fit(tokenizer, prefix: str, prompt: TextPrompt, text: str, budget: int, max_length: int):
    """Cut ``text`` at a token boundary until prefix + prompt fits ``budget`` tokens; (ids, offsets, span).

    Every copy of the text is the same cut text, so echo's two copies stay equal. The cut is estimated
    from the last copy's tokens and checked by tokenizing again (tokens can merge differently at the cut).
    """
    while True:
        full, span = prompt.render(prefix, text)
        encoded = _encode(tokenizer, [full], None)
        ids, offsets = encoded["input_ids"][0], encoded["offset_mapping"][0]
        if len(ids) <= budget:
            return ids, offsets, span
        if not text:
            raise ValueError(
                f"max_length={max_length} is too short for the prompt {prompt.template!r}: with the instruction "
                f"and special tokens it takes {len(ids)} tokens before any text; raise max_length"
            )
        in_copy = [i for i, (begin, end) in enumerate(offsets) if end > begin and end > span[0] and begin < span[1]]
        drop = -(-(len(ids) - budget) // prompt.copies)  # from every copy, rounded up
        keep = len(in_copy) - drop
        cut = offsets[in_copy[keep]][0] - span[0] if keep > 0 else 0
        text = text[: max(0, min(cut, len(text) - 1))]  # always shorter, so the loop ends


def _filler_id(tokenizer) -> int:
    for candidate in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if candidate is not None:
            return candidate
    return 0


def pad_batch(
    features: list[Features], *, pad_id: int, padding_side: str, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Pad to the longest input. Position ids count real tokens only, so left padding shifts nothing."""
    longest = max(len(f.input_ids) for f in features)
    ids, attention, pool = [], [], []
    for f in features:
        gap = longest - len(f.input_ids)
        real = [1] * len(f.input_ids)
        if padding_side == "left":
            ids.append([pad_id] * gap + f.input_ids)
            attention.append([0] * gap + real)
            pool.append([0] * gap + f.pool_mask)
        else:
            ids.append(f.input_ids + [pad_id] * gap)
            attention.append(real + [0] * gap)
            pool.append(f.pool_mask + [0] * gap)
    attention_mask = torch.tensor(attention, device=device)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "input_ids": torch.tensor(ids, device=device),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "pool_mask": torch.tensor(pool, device=device),
    }
