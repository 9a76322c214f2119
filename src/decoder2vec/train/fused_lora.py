"""LoRA's training forward in one autograd function per projection, with a cheap dropout shared by siblings.

peft computes an adapted projection as ``base(x) + lora_B(lora_A(dropout(x))) * scaling``. During training
that costs, beyond the matrix products: a fresh Bernoulli draw over the input for every projection (torch's
CPU ``bernoulli_`` runs at 7-14 ns an element, over a fifth of a SmolLM2 MNTP step), the dropout's multiply
and its backward, then a scaling multiply and an addition over the whole output, forward and backward.

:func:`fuse_lora` swaps in, for the duration of training, a forward that computes the same function with
fewer passes over memory::

    out = x W^T + b;   out += c * ((keep * x) A^T) B^T      with c = scaling / (1 - p), inside the addmm

- The dropout mask comes from 64-bit random words read as four 16-bit lanes (a lane is dropped when it falls below
  ``round(p * 65536)``: p is kept to 1/65536). Drawing it costs a quarter of ``bernoulli_``'s random numbers.
- Projections that read the very same input tensor (q, k and v; gate and up) share one mask and one dropped
  copy of the input, as one fused qkv projection under peft would (Phi-3, GPT-2 and Falcon have exactly that).
- Backward is written out: ``dB = c g^T h``, ``dA = (c g B)^T (keep * x)``, ``dx = g W + keep * ((c g B) A)``.

Each element is still kept with probability 1 - p and rescaled by 1 / (1 - p), so the layer's expectation is
unchanged; the random stream differs from peft's (and siblings' masks are now equal rather than independent).
Projections this does not cover keep peft's own forward: merged or disabled adapters, several active adapters,
DoRA and other variants, quantized or trainable base layers, ``fan_in_fan_out`` weights, autocast.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["draw_keep_mask", "fuse_lora"]

_LANES = 4  # 16-bit lanes per 64-bit random word


def draw_keep_mask(
    shape: torch.Size, p: float, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A tensor of 1 where an element is kept and 0 where it is dropped, which it is with probability
    round(p * 2**16) / 2**16.

    Uses the default generator of ``device`` (seeded by ``torch.manual_seed``), four elements per random word.
    The mask is a float tensor because multiplying by it is ~10x faster on CPUs than any op taking a bool mask.
    """
    count = 1
    for size in shape:
        count *= size
    words = torch.empty((count + _LANES - 1) // _LANES, dtype=torch.int64, device=device)
    words.random_(-(2**63), 2**63 - 1)  # every bit random (plain random_() leaves the sign bit 0)
    threshold = round(p * 65536) - 32768  # lanes are int16: uniform on [-32768, 32767]
    lanes = words.view(torch.int16)[:count].to(torch.float32)
    keep = lanes.sub_(threshold - 0.5).sign_().clamp_(min=0.0)  # 1 at or above the threshold, else 0
    return keep.view(shape).to(dtype)


class _Dropped:
    """The dropped copy of the last input seen, so that projections reading the same tensor share one mask."""

    def __init__(self) -> None:
        self.source: weakref.ref | None = None
        self.version = -1
        self.p = 0.0
        self.keep: torch.Tensor | None = None
        self.dropped: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x with dropped elements zeroed, the keep mask); (x, None) when p is 0."""
        if p == 0.0:
            return x, None
        if self.source is not None and self.source() is x and self.version == x._version and self.p == p:
            return self.dropped, self.keep
        keep = draw_keep_mask(x.shape, p, x.device, x.dtype)
        self.source, self.version, self.p = weakref.ref(x), x._version, p
        with torch.no_grad():  # the function's backward gives x its gradient; no graph for this copy
            self.keep, self.dropped = keep, x * keep
        return self.dropped, self.keep

    def clear(self) -> None:
        self.source = self.keep = self.dropped = None


class _LoRALinear(torch.autograd.Function):
    """out = x W^T + b + c (dropped A^T) B^T, for a frozen W and b; gradients for x, A and B."""

    @staticmethod
    def forward(ctx, x, dropped, keep, weight, bias, lora_a, lora_b, coeff):
        rows = x.reshape(-1, x.shape[-1])
        out = F.linear(rows, weight, bias)
        h = dropped.reshape(-1, x.shape[-1]).mm(lora_a.t())
        out.addmm_(h, lora_b.t(), alpha=coeff)
        ctx.save_for_backward(dropped, keep, weight, lora_a, lora_b, h)
        ctx.coeff = coeff
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        dropped, keep, weight, lora_a, lora_b, h = ctx.saved_tensors
        coeff = ctx.coeff
        g = grad.reshape(-1, grad.shape[-1])
        grad_b = g.t().mm(h).mul_(coeff)
        gh = g.mm(lora_b).mul_(coeff)  # (rows, r): the gradient reaching lora_A's output
        grad_a = gh.t().mm(dropped.reshape(-1, dropped.shape[-1]))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g.mm(weight)
            if keep is None:
                grad_x.addmm_(gh, lora_a)
            else:
                grad_x.addcmul_(gh.mm(lora_a), keep.reshape(grad_x.shape))
            grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1])
        return grad_x, None, None, None, None, grad_a, grad_b, None


def _fusable(module: nn.Module) -> bool:
    from peft.tuners.lora import Linear as LoraLinear

    if type(module) is not LoraLinear or type(module.base_layer) is not nn.Linear:
        return False
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    if len(adapters) != 1 or module.fan_in_fan_out or adapters[0] in getattr(module, "lora_variant", {}):
        return False
    adapter = adapters[0]
    base = module.base_layer
    dropout = module.lora_dropout[adapter]
    return (
        not base.weight.requires_grad
        and (base.bias is None or not base.bias.requires_grad)
        and module.lora_A[adapter].bias is None
        and module.lora_B[adapter].bias is None
        and isinstance(dropout, (nn.Dropout, nn.Identity))
    )


def _fused_forward(shared: _Dropped, peft_forward: Callable) -> Callable:
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self.active_adapters[0] if len(self.active_adapters) == 1 else None
        if (
            args
            or kwargs
            or self.disable_adapters
            or self.merged
            or adapter not in self.lora_A
            or torch.is_autocast_enabled(x.device.type)
        ):
            return peft_forward(x, *args, **kwargs)
        lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if x.dtype != lora_a.dtype or x.dtype != self.base_layer.weight.dtype:
            return peft_forward(x, *args, **kwargs)
        dropout = self.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0
        dropped, keep = shared(x, p)
        coeff = self.scaling[adapter] / (1.0 - p)
        base = self.base_layer
        return _LoRALinear.apply(x, dropped, keep, base.weight, base.bias, lora_a, lora_b, coeff)

    return forward


def fuse_lora(model: nn.Module) -> Callable[[], None]:
    """Give every eligible peft LoRA projection of ``model`` the fused forward; returns a function that undoes it.

    Idempotent per module (a projection already fused is left alone). The returned undo restores peft's forward.
    """
    shared = _Dropped()
    fused = []
    for module in model.modules():
        if "forward" in vars(module) or not _fusable(module):
            continue
        module.forward = types.MethodType(_fused_forward(shared, module.forward), module)
        fused.append(module)

    def undo() -> None:
        for module in fused:
            vars(module).pop("forward", None)
        shared.clear()

    return undo
