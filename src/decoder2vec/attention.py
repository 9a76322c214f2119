"""Bidirectional attention for decoder-only models, with no copied modeling code.

transformers >= 5.2 builds its attention masks from ``config.is_causal``: when it is False, the
mask helpers return a bidirectional (padding-only) mask. Attention kernels that do not take a mask
(sdpa without padding, flash attention) read the ``is_causal`` attribute of each attention module,
so that attribute is switched too. Afterwards a probe proves the switch worked: changing the last
token must change the first token's hidden state (by more than rounding, relative to the states'
scale), and changing the ids at padded positions, left or right, must not change any real token's
state. An architecture where either fails raises :class:`BidirectionalUnsupportedError`; a model never
silently stays causal or lets padding leak.

Per-architecture facts live in :data:`ARCHITECTURES` (add one with :func:`register_architecture`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = [
    "ARCHITECTURES",
    "ArchitectureSupport",
    "AttentionProbe",
    "BidirectionalUnsupportedError",
    "attends_to_future",
    "check_bidirectional",
    "probe_attention",
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


@dataclass(frozen=True)
class AttentionProbe:
    """What :func:`probe_attention` measured: largest changes of hidden states, relative to their scale.

    The padding figures are ``max |a - b| / max |a|`` over the states compared (shapes differ between the runs
    compared, so rounding of the largest values is allowed for); above ``tolerance`` is a leak. The future-token
    figures are ``max |a - b| / rms(a)``: the two runs compared are the same computation but for the last token,
    so a causal model gives exactly 0, and the scale must not be the few huge outlier dimensions some models have
    (untrained SmolLM2 bidirectional: token 0 moves by 2.3e-5 of its largest value, 3.6e-4 of its rms). Above
    ``future_tolerance`` the first token reads the last.
    """

    future_alone: float  # token 0 when only the last token changes, at batch size 1 (masks may be skipped)
    future_padded: float  # the same inside a padded batch (a real mask)
    padding_changes: float  # real tokens when only the ids at padded positions change (left and right padding)
    padding_vs_alone: float  # real tokens of a padded row against the same text alone
    tolerance: float  # relative change that counts for padding: max(1e-4, 8 * the dtype's machine epsilon)
    future_tolerance: float = 1e-5  # for the future token (relative to the rms): max(1e-5, 8 * epsilon)

    @property
    def attends_to_future(self) -> bool:
        return self.future_alone > self.future_tolerance and self.future_padded > self.future_tolerance

    @property
    def padding_is_masked(self) -> bool:
        return self.padding_changes <= self.tolerance and self.padding_vs_alone <= self.tolerance


def _relative_change(reference: torch.Tensor, other: torch.Tensor, scale_by: str = "max") -> float:
    reference, other = reference.float(), other.float()
    if not (torch.isfinite(reference).all() and torch.isfinite(other).all()):
        return float("inf")
    scale = reference.abs().max() if scale_by == "max" else reference.pow(2).mean().sqrt()
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
    return ((reference - other).abs().max() / scale).item()


@torch.inference_mode()
def probe_attention(backbone: torch.nn.Module, vocab_size: int, device: torch.device | str = "cpu") -> AttentionProbe:
    """Run a few 4-token inputs through ``backbone`` and measure what each token's state depends on.

    Rows of the padded batch: two full rows that differ only in their last token; a 2-token text
    right-padded, then the same with other ids in the padding; the same two left-padded (position ids
    counting real tokens, as :func:`decoder2vec.inputs.pad_batch` makes them).
    """
    low = min(10, vocab_size - 6)
    pad, junk = 0, low + 5
    a, b, c, d = low, low + 1, low + 2, low + 3
    dtype = next(backbone.parameters()).dtype
    tolerance = max(1e-4, 8 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-4
    future_tolerance = max(1e-5, 8 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-5

    def states(ids: list[list[int]], mask: list[list[int]]) -> torch.Tensor:  # (rows, 4, dim) float32
        mask_ = torch.tensor(mask, device=device)
        positions = (mask_.cumsum(dim=1) - 1).clamp(min=0)
        out = backbone(
            input_ids=torch.tensor(ids, device=device), attention_mask=mask_, position_ids=positions, use_cache=False
        )
        return out.last_hidden_state.float()

    first, second = [a, b, c, d], [a, b, c, low + 4]
    alone = [states([row], [[1] * 4])[0, 0] for row in (first, second)]  # token 0 at batch size 1
    short_alone = states([[a, b]], [[1, 1]])[0]  # (2, dim)
    rows = [first, second, [a, b, pad, pad], [a, b, junk, junk], [pad, pad, a, b], [junk, junk, a, b]]
    masks = [[1] * 4, [1] * 4, [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    batch = states(rows, masks)  # (6, 4, dim)
    right, left = batch[2:4, :2], batch[4:6, 2:]  # the real tokens of the padded rows: (2, 2, dim) each
    return AttentionProbe(
        future_alone=_relative_change(alone[0], alone[1], scale_by="rms"),
        future_padded=_relative_change(batch[0, 0], batch[1, 0], scale_by="rms"),
        padding_changes=max(_relative_change(right[0], right[1]), _relative_change(left[0], left[1])),
        padding_vs_alone=max(_relative_change(short_alone, right[0]), _relative_change(short_alone, left[0])),
        tolerance=tolerance,
        future_tolerance=future_tolerance,
    )


def attends_to_future(backbone: torch.nn.Module, vocab_size: int, device: torch.device | str = "cpu") -> bool:
    """True when token 0's last hidden state depends on the last token, alone and in a padded batch."""
    return probe_attention(backbone, vocab_size, device).attends_to_future


def check_bidirectional(backbone: torch.nn.Module, config, bidirectional: bool, device) -> None:
    """Raise when the model does not behave as asked (bidirectional, or causal), or padding leaks."""
    probe = probe_attention(backbone, config.vocab_size, device)
    model_type = getattr(config, "model_type", "?")
    implementation = getattr(config, "_attn_implementation", "?")
    measured = (
        f"(relative changes: future token {probe.future_alone:.2e} alone, {probe.future_padded:.2e} padded; "
        f"padding {probe.padding_changes:.2e}, padded vs alone {probe.padding_vs_alone:.2e}; "
        f"tolerances {probe.future_tolerance:.0e} future, {probe.tolerance:.0e} padding)"
    )
    future = probe.attends_to_future
    if bidirectional and not future:
        raise BidirectionalUnsupportedError(
            f"architecture {model_type!r} under attention implementation {implementation!r} stays causal after "
            "setting config.is_causal=False. Try attn_implementation='eager', upgrade transformers, or load with "
            f"bidirectional=False. Supported: {', '.join(sorted(ARCHITECTURES))} {measured}"
        )
    if not bidirectional and (
        probe.future_alone > probe.future_tolerance or probe.future_padded > probe.future_tolerance
    ):
        raise BidirectionalUnsupportedError(
            f"architecture {model_type!r} attends to future tokens although causal attention was asked for; "
            f"this model is not a decoder-only model {measured}"
        )
    if not probe.padding_is_masked:
        raise BidirectionalUnsupportedError(
            f"architecture {model_type!r} under attention implementation {implementation!r}: padded positions "
            f"change the real tokens' hidden states, so vectors would depend on the batch. Try "
            f"attn_implementation='eager' or upgrade transformers {measured}"
        )
