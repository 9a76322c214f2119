"""Masked next-token prediction (MNTP): the LLM2Vec adaptation step for bidirectional attention.

A fraction of the tokens is masked BERT-style (80 % mask token, 10 % random token, 10 % unchanged).
The label of a masked token at position ``i`` is predicted from the hidden state at position ``i - 1``
through the model's own LM head, as the decoder was pretrained to do, but with bidirectional attention.
The LM head runs only at those positions: a full-vocabulary logit tensor for every position is never built.

Reference: BehnamGhader et al., "LLM2Vec: Large Language Models Are Secretly Powerful Text Encoders", 2024.

Example::

    collator = MNTPCollator(encoder.tokenizer, mask_probability=0.2)
    batch = collator([ids1, ids2], generator=torch.Generator().manual_seed(0))
    loss = MNTPLoss(encoder)(batch)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..inputs import Features, pad_batch

__all__ = ["IGNORE_INDEX", "MNTPCollator", "MNTPLoss", "mask_token_id"]

IGNORE_INDEX = -100


def mask_token_id(tokenizer, fallback: str = "_") -> int:
    """The tokenizer's mask token, else the single token that ``fallback`` encodes to."""
    if tokenizer.mask_token_id is not None:
        return tokenizer.mask_token_id
    ids = tokenizer.convert_tokens_to_ids(fallback)
    if ids is None or ids == tokenizer.unk_token_id:
        encoded = tokenizer(fallback, add_special_tokens=False).input_ids
        if len(encoded) != 1:
            raise ValueError(f"mask_token {fallback!r} is not a single token of this tokenizer; choose another")
        ids = encoded[0]
    return ids


class MNTPCollator:
    """Token id lists -> a padded batch with masked ``input_ids`` and ``labels`` (-100 where not masked).

    Position 0 is never masked (nothing precedes it), nor are special tokens or padding. Every batch
    has at least one masked token. Randomness comes from the ``generator`` passed per call, so a run
    that resumes at step k draws the same masks as one that never stopped.
    """

    def __init__(self, tokenizer, *, mask_probability: float = 0.2, mask_token: str = "_", pad_id: int | None = None):
        self.mask_probability = mask_probability
        self.mask_id = mask_token_id(tokenizer, mask_token)
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.pad_id = (
            pad_id
            if pad_id is not None
            else next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
        )

    def __call__(
        self, sequences: list[list[int]], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        features = [Features(input_ids=list(ids), pool_mask=[1] * len(ids)) for ids in sequences]
        batch = pad_batch(features, pad_id=self.pad_id, padding_side="right")
        batch.pop("pool_mask")
        input_ids = batch["input_ids"]  # (batch, seq)
        maskable = batch["attention_mask"].bool() & ~torch.isin(input_ids, self.special_ids)
        maskable[:, 0] = False
        chosen = (torch.rand(input_ids.shape, generator=generator) < self.mask_probability) & maskable
        if not chosen.any():
            candidates = maskable.flatten().nonzero().flatten()
            if len(candidates) == 0:
                raise ValueError("an MNTP batch has no maskable token; sequences need at least 2 non-special tokens")
            pick = candidates[torch.randint(len(candidates), (1,), generator=generator)]
            chosen.view(-1)[pick] = True
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        draw = torch.rand(input_ids.shape, generator=generator)
        random_ids = torch.randint(self.vocab_size, input_ids.shape, generator=generator)
        masked = input_ids.clone()
        masked[chosen & (draw < 0.8)] = self.mask_id
        swap = chosen & (draw >= 0.8) & (draw < 0.9)
        masked[swap] = random_ids[swap]
        batch["input_ids"] = masked
        batch["labels"] = labels
        return batch


class MNTPLoss(nn.Module):
    """Cross-entropy of the LM head's prediction, from position i-1, of each masked token at position i.

    Input: a batch from :class:`MNTPCollator` (``input_ids``, ``attention_mask``, ``position_ids``,
    ``labels``). Output: the mean loss over masked tokens (a scalar). ``full_logits=True`` computes the
    logits of every position first, as a plain causal LM loss would; it gives the same value and exists
    to measure what the masked-only path saves.
    """

    def __init__(self, encoder, *, full_logits: bool = False):
        super().__init__()
        self.encoder = encoder
        self.full_logits = full_logits

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder.hidden_states(batch)  # (batch, seq, dim)
        lm_head = self.encoder.model.get_output_embeddings()
        targets = batch["labels"][:, 1:]  # (batch, seq - 1): the label at i, aligned with the state at i - 1
        if self.full_logits:
            logits = self._cap(lm_head(hidden[:, :-1]))  # (batch, seq - 1, vocab)
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
        logits = self._cap(lm_head(hidden[rows, cols]))  # (masked, vocab)
        return F.cross_entropy(logits.float(), targets[rows, cols])

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        # Gemma 2/3 soft-cap their final logits; keep the LM head's prediction what the model was trained with.
        cap = getattr(self.encoder.model.config.get_text_config(), "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits
