"""Seconds per training step of MNTP and SimCSE on SmolLM2-135M, and MNTP's masked-only logits against full logits.

Batch 32 x 32 tokens, LoRA r=16 on every projection, AdamW, fp32 on the CPU with 2 threads (as the
2-core CI machine). Both MNTP variants run in this process on the same batches; the ratio is full / masked.

    .venv/bin/python bench/train_step.py [--steps 3] [--threads 2] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import time

import torch

from decoder2vec import Encoder
from decoder2vec.train import MNTPConfig, SimCSEConfig
from decoder2vec.train.run import _add_lora, _BatchOrder
from decoder2vec.train.stages import build_stage

DATA = os.environ.get("DECODER2VEC_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def seconds_per_step(config, steps: int, warmup: int = 1) -> tuple[float, float]:
    """(mean seconds per step after warm-up, last loss) for a fresh LoRA adapter on the base model."""
    torch.manual_seed(config.seed)
    encoder = Encoder.from_pretrained(config.model, bidirectional=True, device="cpu")
    encoder.model = _add_lora(encoder.model, config)
    stage = build_stage(config, encoder)
    parameters = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate)
    order = _BatchOrder(len(stage.examples), config.batch_size, 1, 0, config.seed)
    stage.module.train()
    times = []
    for step in range(warmup + steps):
        examples = [stage.examples[i] for i in order.indices(step)]
        start = time.perf_counter()
        loss = stage.step(stage.module, examples, torch.Generator().manual_seed(step), backward=torch.Tensor.backward)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    result = sum(times[warmup:]) / steps, loss.item()
    del encoder, stage, optimizer, parameters
    gc.collect()  # the next variant loads its own model: free this one first
    return result


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common = dict(model=args.model, batch_size=32, max_seq_length=32, lora_r=16, lora_alpha=32, progress=False)
    mntp = dict(common, data=[f"{DATA}/text/wikitext2_valid.tokens"])
    print(
        f"{args.model}, batch 32 x 32 tokens, LoRA r=16 on all projections, {args.threads} threads, "
        f"{args.steps} timed steps after 1 warm-up (load average {os.getloadavg()[0]:.1f})",
        flush=True,
    )
    masked, masked_loss = seconds_per_step(MNTPConfig(**mntp), args.steps)
    print(
        f"MNTP, logits at masked positions only: {masked:6.2f} s/step (loss {masked_loss:.3f}), "
        f"peak RSS so far {peak_rss_mb():.0f} MB",
        flush=True,
    )
    full, full_loss = seconds_per_step(MNTPConfig(**mntp, full_logits=True), args.steps)
    print(
        f"MNTP, full-vocabulary logits:          {full:6.2f} s/step (loss {full_loss:.3f}), "
        f"peak RSS so far {peak_rss_mb():.0f} MB",
        flush=True,
    )
    print(f"  full / masked-only: {full / masked:.2f}x", flush=True)
    simcse, simcse_loss = seconds_per_step(
        SimCSEConfig(**common, data=[f"{DATA}/text/wiki_sentences.txt"]), args.steps
    )
    print(f"SimCSE (32 sentences, 64 sequences a pass): {simcse:6.2f} s/step (loss {simcse_loss:.3f})", flush=True)
    print(f"peak RSS: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
