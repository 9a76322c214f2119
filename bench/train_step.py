"""Seconds per training step on SmolLM2-135M: our MNTP and SimCSE steps against the same work done the plain way.

- MNTP, batch 8 x 64 tokens: ours computes the LM head's logits only where a token is masked; plain computes
  full-vocabulary logits at every position (as a causal LM loss does), then the same loss.
- SimCSE, batch 16 x 32 tokens, attention dropout 0.3: ours embeds both dropout views in one forward pass of
  padding-free packs; plain embeds a padded batch twice, one forward pass per view.
- Both: ours trains LoRA as training does by default (``fused_lora``, decoder2vec.train.fused_lora: one autograd
  function per projection, a cheap dropout mask shared by the projections that read one input); plain runs peft's
  own forward (a Bernoulli draw per projection, then separate scaling and addition), as the reference does.

LoRA r=16 on every projection, AdamW, fp32 on the CPU with 2 threads (the 2-core CI machine), the shapes of
the LLM2Vec reference's measurements in issue 10. Ours and plain run in one process on the same model, from
the same LoRA and optimizer state, on the same batches, alternating over rounds (ours, plain, ours, plain)
so that drift of a shared machine hits both; each variant's first block follows one untimed warm-up step.
The ratio is plain / ours, of wall-clock seconds and of the process's CPU time (with 1 thread, CPU time is the
compute itself and barely moves when other jobs share the machine). MNTP's two variants compute the same loss
up to the dropout draws (printed side by side).

    .venv/bin/python bench/train_step.py [--steps 2] [--rounds 2] [--threads 2] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import resource
import statistics
import time

import torch

from decoder2vec import Encoder
from decoder2vec.catalog import resolve_dataset
from decoder2vec.train import InfoNCELoss, MNTPConfig, SimCSEConfig
from decoder2vec.train.fused_lora import fuse_lora
from decoder2vec.train.run import _add_lora, _BatchOrder
from decoder2vec.train.stages import build_stage


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compare(config, variants: dict, steps: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """{variant: {"wall", "cpu": seconds of each timed step, "loss": round 1's losses}}.

    A variant is ``step(stage, examples, generator) -> loss`` (it calls backward).
    """
    torch.manual_seed(config.seed)
    encoder = Encoder.from_pretrained(config.model, bidirectional=True, device="cpu")
    encoder.model = _add_lora(encoder.model, config)
    stage = build_stage(config, encoder)
    parameters = [p for p in encoder.parameters() if p.requires_grad]
    start_state = copy.deepcopy([p.detach() for p in parameters])
    order = _BatchOrder(len(stage.examples), config.batch_size, 1, 0, config.seed)
    stage.module.train()
    results = {name: {"wall": [], "cpu": [], "loss": []} for name in variants}
    for round_ in range(rounds):
        for name, run_step in variants.items():
            with torch.no_grad():  # every block starts from the same weights and a fresh optimizer
                for parameter, value in zip(parameters, start_state, strict=True):
                    parameter.copy_(value)
            optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate)
            warmup = 1 if round_ == 0 else 0  # step 0 of the first round is not timed
            for step in range(1 - warmup, 1 + steps):
                examples = [stage.examples[i] for i in order.indices(step)]
                generator = torch.Generator().manual_seed(step)
                torch.manual_seed(config.seed + step)  # the same dropout draws for a variant in every round
                wall, cpu = time.perf_counter(), time.process_time()
                loss = run_step(stage, examples, generator)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if step:
                    results[name]["wall"].append(wall)
                    results[name]["cpu"].append(cpu)
                    if round_ == 0:
                        results[name]["loss"].append(loss.item())
            wall = statistics.mean(results[name]["wall"][-steps:])
            cpu = statistics.mean(results[name]["cpu"][-steps:])
            print(f"  round {round_ + 1}, {name}: {wall:.2f} s/step wall, {cpu:.2f} s/step CPU", flush=True)
    for undo in stage.cleanup:
        undo()
    del encoder, stage, parameters, start_state
    gc.collect()  # the next comparison loads its own model: free this one first
    return results


def peft_forward(stage, examples, generator):
    return stage.step(stage.module, examples, generator, backward=torch.Tensor.backward)


def ours(stage, examples, generator):
    undo = fuse_lora(stage.module)  # as training does (fused_lora: true); undone so that plain gets peft's forward
    try:
        return peft_forward(stage, examples, generator)
    finally:
        undo()


def mntp_full_logits(stage, examples, generator):
    stage.module.full_logits = True
    try:
        return peft_forward(stage, examples, generator)
    finally:
        stage.module.full_logits = False


def simcse_two_passes(config):
    loss_fn = InfoNCELoss(config.temperature)

    def step(stage, examples, generator):
        encoder = stage.module.encoder
        batch = encoder.collate(encoder.tokenize(examples, max_length=config.max_seq_length))
        loss = loss_fn(encoder(batch), encoder(batch))  # one padded forward pass per view
        loss.backward()
        return loss.detach()

    return step


def report(title: str, results: dict) -> float:
    """Print both variants and plain / ours; returns the wall-clock ratio."""
    (ours_name, ours_r), (plain_name, plain_r) = results.items()
    print(title)
    for label, name, r in (("ours ", ours_name, ours_r), ("plain", plain_name, plain_r)):
        steps = ", ".join(f"{s:.2f}" for s in r["wall"])
        print(
            f"  {label} ({name}): {statistics.mean(r['wall']):6.2f} s/step wall ({steps}), "
            f"{statistics.mean(r['cpu']):6.2f} s/step CPU time"
        )
    losses = [", ".join(f"{x:.5f}" for x in r["loss"]) for r in (ours_r, plain_r)]
    print(f"  losses of round 1, ours: {losses[0]}; plain: {losses[1]}")
    ratio = statistics.mean(plain_r["wall"]) / statistics.mean(ours_r["wall"])
    cpu_ratio = statistics.mean(plain_r["cpu"]) / statistics.mean(ours_r["cpu"])
    print(f"  plain / ours: {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU time (peak RSS so far {peak_rss_mb():.0f} MB)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant and round (after 1 warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (ours, plain)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common = dict(model=args.model, lora_r=16, lora_alpha=32, progress=False)
    print(
        f"{args.model}, LoRA r=16 on all projections, AdamW, fp32 CPU, {args.threads} threads, {args.rounds} rounds "
        f"x {args.steps} timed steps per variant (+1 warm-up each), load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    mntp = MNTPConfig(**common, batch_size=8, max_seq_length=64, data=[str(resolve_dataset("mntp"))])
    mntp_results = compare(
        mntp,
        {"logits at masked positions only": ours, "full-vocabulary logits": mntp_full_logits},
        args.steps,
        args.rounds,
    )
    mntp_ratio = report("MNTP, 8 x 64 tokens", mntp_results)
    simcse = SimCSEConfig(
        **common, batch_size=16, max_seq_length=32, attention_dropout=0.3, data=[str(resolve_dataset("simcse"))]
    )
    simcse_results = compare(
        simcse,
        {
            f"both views in one pass of packs <= {simcse.pack_tokens} tokens": ours,
            "padded batch, two passes": simcse_two_passes(simcse),
        },
        args.steps,
        args.rounds,
    )
    simcse_ratio = report("SimCSE, 16 x 32 tokens, attention dropout 0.3", simcse_results)
    print(f"targets (issue 10): MNTP >= 1.5x: {mntp_ratio:.2f}x; SimCSE >= 1.3x: {simcse_ratio:.2f}x")
    print(f"peak RSS: {peak_rss_mb():.0f} MB (whole process, two models loaded one after another)")


if __name__ == "__main__":
    main()
