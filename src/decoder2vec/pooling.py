"""Pooling: from last hidden states to one vector per text.

Every mode reads only the positions given by ``pool_mask`` (the text's tokens; with a prompt, the
tokens of the text's last copy or the prompt's final token, see :mod:`decoder2vec.inputs`) and
``attention_mask`` (real tokens), so results are the same with left and with right padding.

* ``mean``: average over the text's tokens.
* ``weighted_mean``: position-weighted average over the text's tokens, weight 1, 2, ..., n from
  the first text token to the last (as in LLM2Vec and SGPT): later tokens have seen more context.
* ``last_token``: the last real token of the input (the appended EOS when the encoder adds one).
* ``bos``: the first real token of the input (the BOS token when the tokenizer adds one).

A text with no tokens of its own (the empty string) falls back to all real tokens for ``mean``
and ``weighted_mean``, so its vector is finite and the same for every empty string.
"""

from __future__ import annotations

import torch

__all__ = ["POOLING_MODES", "pool"]

POOLING_MODES = ("mean", "weighted_mean", "last_token", "bos")


def pool(
    hidden: torch.Tensor,  # (batch, seq, dim)
    attention_mask: torch.Tensor,  # (batch, seq), 1 for real tokens
    pool_mask: torch.Tensor,  # (batch, seq), 1 for the text's tokens
    mode: str,
) -> torch.Tensor:  # (batch, dim)
    """Pool ``hidden`` into one vector per row."""
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling {mode!r}; choose one of: {', '.join(POOLING_MODES)}")
    attention_mask = attention_mask.to(torch.long)
    if mode in ("last_token", "bos"):
        positions = torch.arange(hidden.shape[1], device=hidden.device).expand_as(attention_mask)
        real = positions.masked_fill(attention_mask == 0, -1 if mode == "last_token" else hidden.shape[1])
        index = real.max(dim=1).values if mode == "last_token" else real.min(dim=1).values  # (batch,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]

    mask = pool_mask.to(torch.long) * attention_mask
    empty = mask.sum(dim=1, keepdim=True) == 0  # (batch, 1)
    mask = torch.where(empty, attention_mask, mask)
    if mode == "weighted_mean":
        weights = mask.cumsum(dim=1) * mask  # 1..n over the pooled tokens, 0 elsewhere
    else:
        weights = mask
    weights = weights.to(hidden.dtype).unsqueeze(-1)  # (batch, seq, 1)
    summed = (hidden * weights).sum(dim=1)  # (batch, dim)
    return summed / weights.sum(dim=1).clamp(min=1e-9)
