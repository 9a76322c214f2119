"""Bidirectional attention for decoder-only models, with no copied modeling code.

transformers >= 5.2 builds its attention masks from ``config.is_causal``: when it is False, the
mask helpers return a bidirectional (padding-only) mask. Attention kernels that do not take a mask
(sdpa without padding, flash attention) read the ``is_causal`` attribute of each attention module,
so that attribute is switched too. Afterwards a probe proves the switch worked: changing the last
token must change the first token's hidden state. An architecture where it does not raises
:class:`BidirectionalUnsupportedError`; a model never silently stays causal.

Per-architecture facts live in :data:`ARCHITECTURES` (add one with :func:`register_architecture`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = [
    "ARCHITECTURES",
    "ArchitectureSupport",
    "BidirectionalUnsupportedError",
    "attends_to_future",
    "register_architecture",
    "set_bidirectional",
]


class BidirectionalUnsupportedError(RuntimeError):
    """The model ignores the bidirectional switch: it would stay causal."""


@dataclass(frozen=True)
class ArchitectureSupport:
    """What is known about one ``config.model_type``."""

    attention_implementations: tuple[str, ...] = ("eager", "sdpa")  # tested here under these
    extra_config: dict = field(default_factory=dict)  # config attributes to set when bidirectional
    notes: str = ""


ARCHITECTURES: dict[str, ArchitectureSupport] = {}


def register_architecture(model_type: str, support: ArchitectureSupport) -> None:
    """Record what is known about an architecture (tested attention backends, extra switches)."""
    ARCHITECTURES[model_type] = support


register_architecture("llama", ArchitectureSupport(notes="SmolLM2, Llama 2/3"))
register_architecture("mistral", ArchitectureSupport())
register_architecture("qwen2", ArchitectureSupport())
register_architecture("qwen3", ArchitectureSupport())
register_architecture(
    "gemma2",
    ArchitectureSupport(
        attention_implementations=("eager",),
        extra_config={"use_bidirectional_attention": True},
        notes="transformers offers no sdpa for Gemma2 (logit soft-capping); eager is used",
    ),
)
register_architecture(
    "gemma3_text",
    ArchitectureSupport(extra_config={"use_bidirectional_attention": True}, notes="Gemma 3 270M/1B text models"),
)
register_architecture("phi3", ArchitectureSupport())


def set_bidirectional(model: torch.nn.Module, bidirectional: bool) -> None:
    """Switch every attention layer of ``model`` (a transformers model, maybe PEFT-wrapped)."""
    config = model.config
    config.is_causal = not bidirectional
    support = ARCHITECTURES.get(getattr(config, "model_type", ""), ArchitectureSupport())
    for name in support.extra_config:
        if hasattr(config, name):
            setattr(config, name, bidirectional)
    for module in model.modules():
        if isinstance(getattr(module, "is_causal", None), bool):
            module.is_causal = not bidirectional
        sub_config = getattr(module, "config", None)
        if sub_config is not None and sub_config is not config and hasattr(sub_config, "is_causal"):
            sub_config.is_causal = not bidirectional


@torch.inference_mode()
def attends_to_future(backbone: torch.nn.Module, vocab_size: int, device: torch.device | str = "cpu") -> bool:
    """True when token 0's last hidden state depends on the last token, alone and in a padded batch."""
    low = min(10, vocab_size - 6)
    first = torch.tensor([[low, low + 1, low + 2, low + 3]], device=device)
    second = first.clone()
    second[0, -1] = low + 4  # the two rows differ only in their last token

    def first_token_states(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0].float()

    ones = torch.ones_like(first)
    alone = [first_token_states(ids, ones) for ids in (first, second)]  # batch size 1: masks may be skipped
    # a padded batch: a shorter third row forces a real mask
    short = torch.tensor([[low, low + 1, 0, 0]], device=device)
    short_mask = torch.tensor([[1, 1, 0, 0]], device=device)
    padded = first_token_states(torch.cat([first, second, short]), torch.cat([ones, ones, short_mask]))
    return not torch.equal(alone[0], alone[1]) and not torch.equal(padded[0], padded[1])


def check_bidirectional(backbone: torch.nn.Module, config, bidirectional: bool, device) -> None:
    """Raise when the model does not behave as asked (bidirectional, or causal)."""
    future = attends_to_future(backbone, config.vocab_size, device)
    if bidirectional and not future:
        model_type = getattr(config, "model_type", "?")
        raise BidirectionalUnsupportedError(
            f"architecture {model_type!r} under attention implementation "
            f"{getattr(config, '_attn_implementation', '?')!r} stays causal after setting config.is_causal=False. "
            "Try attn_implementation='eager', upgrade transformers, or load with bidirectional=False. "
            "Supported: " + ", ".join(sorted(ARCHITECTURES))
        )
    if not bidirectional and future:
        raise BidirectionalUnsupportedError(
            f"architecture {getattr(config, 'model_type', '?')!r} attends to future tokens although causal "
            "attention was asked for; this model is not a decoder-only model."
        )
