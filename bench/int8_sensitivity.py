"""How far int8 rounding moves a model's sentence vectors, by quantization scheme (simulated in float32).

Every linear layer of the decoder (not the LM head) computes ``linear(q(x), q(W))`` where ``q`` rounds to
symmetric int8 and back, with one scale per tensor, per token (activations: one row of ``x``) or per output
channel (weights: one row of ``W``), or leaves its operand in float32. Nothing runs in int8 arithmetic, so the
figures isolate rounding from kernels: they say which scheme an int8 path must implement for a model to keep its
vectors (issue 13's check: cosine >= 0.99 to the float32 vector, per vector), whatever the speed.

Schemes: PyTorch's and onnxruntime's dynamic int8 round activations per tensor (the whole batch shares one
scale) and weights per tensor; LLM.int8-style per-token activations with per-channel weights is the finest here.

    python bench/int8_sensitivity.py --model smollm2-135m [--adapter DIR ...] [--causal] [--pairs 150]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from decoder2vec import Encoder
from decoder2vec.catalog import resolve_dataset

SCHEMES = [  # (activations, weights); None: float32
    ("tensor", "tensor"),
    ("token", "tensor"),
    ("token", "channel"),
    (None, "tensor"),
    (None, "channel"),
    ("tensor", None),
]


def rounded(x: torch.Tensor, per: str | None) -> torch.Tensor:
    """``x`` rounded to symmetric int8 and back: one scale for the tensor, or one per row (token or channel)."""
    if per is None:
        return x
    peak = x.abs().amax(dim=-1, keepdim=True) if per in ("token", "channel") else x.abs().max()
    scale = peak.clamp(min=1e-12) / 127
    return (x / scale).round().clamp(-127, 127) * scale


def simulate(linears: list[torch.nn.Linear], weights: dict, activations: str | None, per_weight: str | None) -> None:
    for module in linears:
        module.weight.data = rounded(weights[module], per_weight)

        def forward(x, module=module):
            return torch.nn.functional.linear(rounded(x, activations), module.weight, module.bias)

        module.forward = forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", nargs="+", default=None, help="trained adapters, merged first")
    parser.add_argument("--causal", action="store_true", help="keep the causal mask")
    parser.add_argument("--pairs", type=int, default=150, help="STS-B test pairs whose sentences are embedded")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [line.split("\t") for line in resolve_dataset("stsb:test").read_text().splitlines()[1:]][: args.pairs]
    texts = [r[-2] for r in rows] + [r[-1] for r in rows]
    encoder = Encoder.from_pretrained(
        args.model, adapter=args.adapter, pooling="mean", device="cpu", bidirectional=not args.causal
    )
    if hasattr(encoder.model, "merge_and_unload"):
        encoder.model = encoder.model.merge_and_unload()
    start = time.perf_counter()
    reference = encoder.encode(texts, batch_size=32, show_progress=False)
    linears = [m for n, m in encoder.model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    weights = {m: m.weight.data.clone() for m in linears}
    mode = "causal" if args.causal else "bidirectional"
    print(f"{args.model} {mode}{' + adapters ' + ' '.join(args.adapter) if args.adapter else ''}, mean pooling, "
          f"{len(texts)} STS-B test sentences, {len(linears)} linear layers simulated "
          f"({time.perf_counter() - start:.0f} s a pass)")  # fmt: skip
    print(f"{'activations':<13}{'weights':<10}{'min cosine':>12}{'mean cosine':>13}{'vectors >= 0.99':>17}")
    for activations, per_weight in SCHEMES:
        simulate(linears, weights, activations, per_weight)
        vectors = encoder.encode(texts, batch_size=32, show_progress=False)
        cosine = (vectors * reference).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
        print(f"{activations or 'float32':<13}{per_weight or 'float32':<10}{cosine.min():>12.4f}{cosine.mean():>13.4f}"
              f"{(cosine >= 0.99).mean():>16.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
