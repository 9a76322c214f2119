"""Padding-free packs: texts laid end to end in rows, each text attending only to itself.

A padded batch computes every text at the longest text's length. A packed batch lays texts end to end
in rows of up to ``max_tokens`` tokens, with position ids restarting at 0 for each text and a
block-diagonal attention mask (causal inside each block when the encoder is causal), so each text sees
exactly what it sees alone or in a padded batch, and almost no padding is computed. The rows' hidden
states are then gathered back per text and pooled with the encoder's own pooling.

The mask is handed to the model as a ready 4D mask, which transformers passes to eager and sdpa
attention as it is (its own causal, bidirectional and sliding-window masks are not built). That is
exact only when the model's own mask would not restrict a text further: models with a sliding window
pack only texts no longer than the window (Gemma 3: 512 tokens), and other attention implementations
(flash attention, flex) do not pack. :func:`can_pack` says which; callers fall back to padded batches.

Used by the server (:func:`encode_packed`) and by SimCSE training (:class:`PackedEmbedder`, one
forward pass of both dropout views without padding).

Example::

    features = encoder.tokenize(texts)
    if can_pack(encoder, max(len(f.input_ids) for f in features)):
        batch = collate_packed(encoder, features, max_tokens=128)
        vectors = forward_packed(encoder, batch)  # (len(texts), dim), with gradients

    embedder = PackedEmbedder(encoder, max_tokens=128)  # the same, falling back to padded batches
    vectors = embedder(embedder.collate(features))
"""

from __future__ import annotations

import torch
from torch import nn

from .pooling import pool

__all__ = ["PackedEmbedder", "can_pack", "collate_packed", "encode_packed", "forward_packed", "pack_indices"]

PACKING_IMPLEMENTATIONS = ("sdpa", "eager")  # attention implementations that take a custom 4D mask as it is


def can_pack(encoder, longest: int | None = None) -> bool:
    """Whether packed batches give the padded batch's result for texts of at most ``longest`` tokens.

    Needs eager or sdpa attention. With a sliding window, a text of ``n`` tokens spans distances up to
    ``n - 1``, which the window (``|i - j| < window``, or ``i - j < window`` when causal) allows whole only
    when ``n <= window``; ``longest=None`` (any length) then answers False.
    """
    config = encoder.model.config.get_text_config()
    if getattr(config, "_attn_implementation", None) not in PACKING_IMPLEMENTATIONS:
        return False
    window = getattr(config, "sliding_window", None)
    return window is None or (longest is not None and longest <= window)


def pack_indices(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of texts per row, first-fit by decreasing length; a text longer than ``max_tokens`` fills a row alone."""
    rows: list[list[int]] = []
    free: list[int] = []  # tokens left in each row
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        row = next((r for r, room in enumerate(free) if room >= length), None)
        if row is None:
            rows.append([])
            free.append(max_tokens)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= length
    return rows


def collate_packed(encoder, features, *, max_tokens: int = 128) -> dict[str, torch.Tensor]:
    """Tokenized texts -> one packed batch: rows of texts end to end, padded to the longest row.

    Keys: ``input_ids``, ``position_ids`` (rows, width); ``attention_mask`` (rows, 1, width, width), additive
    (0 where a token may attend, the dtype's minimum elsewhere; padding attends to itself only, so no row of
    the mask is empty); ``token_index`` (texts, longest): where each text's tokens are in the flattened rows;
    ``text_mask`` and ``pool_mask`` (texts, longest): a right-padded batch's masks, for pooling.
    """
    lengths = [len(f.input_ids) for f in features]
    rows = pack_indices(lengths, max_tokens)
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), encoder.pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment = -1 - torch.arange(len(rows) * width).view(len(rows), width)  # padding: a segment of its own
    token_index = torch.zeros((len(features), max(lengths)), dtype=torch.long)
    text_mask = torch.zeros((len(features), max(lengths)), dtype=torch.long)
    pool_mask = torch.zeros((len(features), max(lengths)), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = lengths[i]
            input_ids[r, start : start + n] = torch.tensor(features[i].input_ids)
            position_ids[r, start : start + n] = torch.arange(n)
            segment[r, start : start + n] = i
            token_index[i, :n] = torch.arange(r * width + start, r * width + start + n)
            text_mask[i, :n] = 1
            pool_mask[i, :n] = torch.tensor(features[i].pool_mask)
            start += n
    allowed = segment[:, :, None] == segment[:, None, :]  # (rows, query, key): same text
    if not encoder.config.bidirectional:
        allowed &= position_ids[:, None, :] <= position_ids[:, :, None]
    dtype = next(encoder.backbone.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    batch = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": mask[:, None],
        "token_index": token_index,
        "text_mask": text_mask,
        "pool_mask": pool_mask,
    }
    return {key: value.to(encoder.device) for key, value in batch.items()}


def forward_packed(encoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A batch from :func:`collate_packed` -> pooled float32 vectors (texts, dim), with gradients."""
    hidden = encoder.hidden_states(batch)  # (rows, width, dim)
    per_text = hidden.flatten(0, 1)[batch["token_index"]]  # (texts, longest, dim): a right-padded batch
    return pool(per_text.float(), batch["text_mask"], batch["pool_mask"], encoder.config.pooling)


class PackedEmbedder(nn.Module):
    """An Encoder that embeds packed batches: ``embedder(embedder.collate(features))`` -> (texts, dim) float32.

    The training module of SimCSE (both dropout views of a batch in one pass, without padding).
    :meth:`collate` packs when that is exact for these texts (see :func:`can_pack`) and otherwise makes the
    encoder's padded batch, which :meth:`forward` hands to the encoder; ``max_tokens=0`` always pads.
    """

    def __init__(self, encoder, max_tokens: int = 128):
        super().__init__()
        self.encoder = encoder
        self.max_tokens = max_tokens

    def collate(self, features) -> dict[str, torch.Tensor]:
        if self.max_tokens and can_pack(self.encoder, max(len(f.input_ids) for f in features)):
            return collate_packed(self.encoder, features, max_tokens=self.max_tokens)
        return self.encoder.collate(features)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return forward_packed(self.encoder, batch) if "token_index" in batch else self.encoder(batch)


def encode_packed(encoder, features, *, max_tokens: int = 512) -> torch.Tensor:
    """Pooled float32 vectors (n, dim) of tokenized texts, one pack of up to ``max_tokens`` tokens per forward pass.

    For inference (the server): runs under ``torch.inference_mode`` and returns vectors on the CPU.
    """
    out = torch.empty(len(features), encoder.dim, dtype=torch.float32)
    with torch.inference_mode():
        for row in pack_indices([len(f.input_ids) for f in features], max_tokens):
            batch = collate_packed(encoder, [features[i] for i in row], max_tokens=max_tokens)
            out[row] = forward_packed(encoder, batch).cpu()
    return out
