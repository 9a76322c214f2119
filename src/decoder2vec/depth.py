"""Embeddings from an intermediate layer: keep the first N decoder layers of a model and drop the rest.

A decoder's last layers specialize in predicting the next token; the layers below often hold better sentence
representations (untrained bidirectional Gemma 3 270M, mean pooling, STS-B dev: 65.9 from layer 18 of 18,
76.2 from layer 13 after the final norm; ``bench/layers.py``). Cutting the stack there, rather than asking for
every layer's hidden states, also makes encoding and training cheaper by the layers dropped. The model's final
norm still runs on the kept layers' output, so the cut model is an ordinary, smaller model of the same class:
``save_pretrained`` writes it with ``num_hidden_layers = N`` and any library loads it as it is.
"""

from __future__ import annotations

import torch

__all__ = ["decoder_layers", "keep_first_layers"]


def decoder_layers(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """(the module that owns it, the ``layers`` ModuleList) of a transformers decoder, maybe PEFT-wrapped."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and hasattr(module, "norm"):
            return module, layers
    raise ValueError(f"{type(model).__name__} has no decoder `layers` list next to a final `norm`")


def keep_first_layers(model: torch.nn.Module, count: int | None) -> None:
    """Drop every decoder layer above the first ``count`` (None: keep all), in place, config included."""
    if count is None:
        return
    owner, layers = decoder_layers(model)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= len(layers):
        raise ValueError(
            f"num_layers must be an integer from 1 to the model's {len(layers)} decoder layers, not {count!r}"
        )
    if count == len(layers):
        return
    owner.layers = torch.nn.ModuleList(list(layers)[:count])
    config = model.config.get_text_config()
    config.num_hidden_layers = count
    if isinstance(getattr(config, "layer_types", None), list):  # Gemma 2/3, Qwen 2/3: one attention kind a layer
        config.layer_types = config.layer_types[:count]
