"""From texts to model inputs: instruction + text, and the mask of the tokens that are pooled.

The model reads ``instruction_template.format(instruction=...)`` followed by the text. Which
tokens belong to the text is decided from the tokenizer's character offsets: a token is pooled
when its character span overlaps the text's span. Nothing is inserted into the text and nothing
is searched for inside it, so any text (with separators, markup, emoji, control characters) works.
Special-token strings typed inside a text (``</s>``, ``<|im_end|>``) are read as plain text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Features", "TextInput", "normalize_inputs", "pad_batch", "tokenize"]

TextInput = str | tuple[str, str]  # a text, or an (instruction, text) pair


@dataclass
class Features:
    """One tokenized input."""

    input_ids: list[int]
    pool_mask: list[int]  # 1 where the token belongs to the text (before the pooling mode is applied)


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
) -> list[Features]:
    """Tokenize (instruction, text) pairs; keep the text's tokens in ``pool_mask``.

    Texts are truncated so that the whole input, special tokens and appended EOS included, has at
    most ``max_length`` tokens. With ``append_eos`` the tokenizer's EOS token id (never its text) is
    added after the text, so ``last_token`` pooling reads a real EOS.
    """
    if not pairs:
        return []
    prefixes = [instruction_template.format(instruction=inst) if inst else "" for inst, _ in pairs]
    fulls = [prefix + text for prefix, (_, text) in zip(prefixes, pairs, strict=True)]
    eos = tokenizer.eos_token_id if append_eos else None
    budget = max_length - (1 if eos is not None else 0)
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for text; use max_length >= 2")
    encoded = tokenizer(
        fulls,
        add_special_tokens=True,
        truncation=True,
        max_length=budget,
        return_offsets_mapping=True,
        return_attention_mask=False,
        split_special_tokens=True,  # "</s>" typed inside a text is text, not an EOS token
    )
    features = []
    for prefix, ids, offsets in zip(prefixes, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        start = len(prefix)
        # Special tokens have empty spans (start == end) and are never pooled.
        mask = [1 if end > start and end > begin else 0 for begin, end in offsets]
        ids = list(ids)
        if eos is not None:
            ids.append(eos)
            mask.append(0)
        if not ids:  # an empty text with a tokenizer that adds no special tokens
            ids, mask = [_filler_id(tokenizer)], [0]
        features.append(Features(input_ids=ids, pool_mask=mask))
    return features


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
