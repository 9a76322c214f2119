"""Unsupervised SimCSE: a sentence embedded twice under independent dropout is its own positive.

The batch of ``n`` sentences is doubled (``[s_1..s_n, s_1..s_n]``) and embedded in one forward pass,
so the two copies of each sentence see different dropout masks. :class:`InfoNCELoss` then asks each
first view to pick its second view among all ``n`` second views (the other sentences are negatives).
The training stage embeds the doubled batch as padding-free packs (``pack_tokens``, see
:mod:`decoder2vec.packing`): the same loss and gradients as the padded batch, without computing padding.

Decoder-only models have little or no dropout (Llama: none in hidden states, 0 in attention), so two
views are nearly identical and the task becomes trivial. :func:`set_dropout` adds the noise:
attention dropout (read by the attention modules of transformers) and *hidden dropout*, dropout on
each decoder layer's residual update (its output minus its input), as BERT drops its sub-layer outputs.

Reference: Gao et al., "SimCSE: Simple Contrastive Learning of Sentence Embeddings", EMNLP 2021.

Example::

    loss_fn = InfoNCELoss(temperature=0.05)
    vectors = encoder(encoder.collate(features + features))  # (2n, dim)
    loss = loss_fn(vectors[:n], vectors[n:])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..depth import decoder_layers

__all__ = ["InfoNCELoss", "set_dropout"]


class InfoNCELoss(nn.Module):
    """Cross-entropy of cosine similarities / temperature, where row i of ``anchors`` matches row i of ``positives``.

    ``anchors`` (n, dim) and ``positives`` (m, dim), m >= n: rows n..m-1 of ``positives`` are extra
    negatives. Returns the mean loss over anchors.
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature

    def forward(self, anchors: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        scores = F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T  # (n, m) cosine
        labels = torch.arange(len(anchors), device=anchors.device)
        return F.cross_entropy(scores / self.temperature, labels)


def set_dropout(model: nn.Module, *, attention: float = 0.0, hidden: float = 0.0) -> list:
    """Set attention dropout and add hidden dropout to a transformers decoder (maybe PEFT-wrapped).

    Dropout only acts in training mode. Returns the hook handles; ``handle.remove()`` takes hidden
    dropout off again. Raises when the model has no ``layers`` list to put hidden dropout on.
    """
    config = getattr(model, "config", None)
    if hasattr(config, "attention_dropout"):
        config.attention_dropout = attention
    for module in model.modules():
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = attention
    if hidden == 0:
        return []
    layers = _decoder_layers(model)

    def residual_dropout(module, args, kwargs, output):
        before = args[0] if args else kwargs["hidden_states"]
        after = output[0] if isinstance(output, tuple) else output
        dropped = before + F.dropout(after - before, p=hidden, training=module.training)
        return (dropped, *output[1:]) if isinstance(output, tuple) else dropped

    return [layer.register_forward_hook(residual_dropout, with_kwargs=True) for layer in layers]


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    try:
        return decoder_layers(model)[1]
    except ValueError:
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__} for hidden dropout; set hidden_dropout 0"
        ) from None
