"""Training-free prompt embeddings on STS-B dev: plain mean pooling vs PromptEOL vs echo, untrained models.

For each model and attention (causal, bidirectional) one Encoder is loaded and scored three ways:

* ``mean``      the text alone, mean over its tokens (the library's default);
* ``prompteol`` ``This sentence : "{text}" means in one word:"``, the last token (Jiang et al. 2023);
* ``echo``      ``Rewrite the sentence: {text}\\nRewritten sentence: {text}``, mean over the second copy
  (Springer et al. 2024).

Each row is Spearman x100 of cosine similarity on STS-B dev (``$DECODER2VEC_DATA/sts/stsb_dev.tsv``,
else the Hugging Face hub through ``decoder2vec.catalog``), the seconds it took, and its difference from ``mean`` in the same run.
Rows are appended to a JSON-lines file as they finish, so an interrupted run resumes where it stopped.

    OMP_NUM_THREADS=1 nice -n 19 python bench/prompt_embeddings.py --limit 750 \\
        --output bench/results/prompt_embeddings.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from decoder2vec import Encoder
from decoder2vec.catalog import resolve_dataset
from decoder2vec.eval.sts import STSEvaluator, STSPairs, read_sts_tsv

MODES = {  # name -> EncoderConfig settings
    "mean": {"prompt": "{text}", "pooling": "mean"},
    "prompteol": {"prompt": "prompteol", "pooling": "mean"},  # the preset pools only the prompt's last token
    "echo": {"prompt": "echo", "pooling": "mean"},
}


def read_pairs(limit: int | None, stride: int) -> STSPairs:
    """STS-B dev, every ``stride``-th pair (the file is sorted by genre: a stride keeps all three), then ``limit``."""
    pairs = read_sts_tsv(resolve_dataset("stsb", "dev"))
    picked = slice(None, None, stride)
    pairs = STSPairs(pairs.sentences1[picked], pairs.sentences2[picked], pairs.scores[picked])
    if limit:
        pairs = STSPairs(pairs.sentences1[:limit], pairs.sentences2[:limit], pairs.scores[:limit])
    return pairs


def mean_tokens(encoder: Encoder, pairs: STSPairs) -> float:
    features = encoder.tokenize(sorted(set(pairs.sentences1 + pairs.sentences2)))
    return sum(len(f.input_ids) for f in features) / len(features)


def run(
    models: list[str],
    modes: list[str],
    attentions: list[str],
    pairs: STSPairs,
    subset: str,
    output: Path,
    batch_size: int,
    threads: int,
) -> list[dict]:
    results = output.with_suffix(".jsonl")
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    key = lambda row: (row["model"], row["attention"], row["mode"], row["pairs"])  # noqa: E731
    finished = {key(row) for row in done}
    for attention in attentions:  # causal rows of every model first
        for model in models:
            bidirectional = attention == "bidirectional"
            todo = [m for m in modes if (model, attention, m, len(pairs.scores)) not in finished]
            if not todo:
                continue
            encoder = Encoder.from_pretrained(model, bidirectional=bidirectional, device="cpu", dtype="float32")
            base = encoder.config
            for mode in todo:
                encoder.config = dataclasses.replace(base, **MODES[mode])
                start = time.perf_counter()
                scores = STSEvaluator(pairs, batch_size=batch_size)(encoder)
                seconds = time.perf_counter() - start
                row = {
                    "model": model,
                    "attention": attention,
                    "mode": mode,
                    "pairs": len(pairs.scores),
                    "subset": subset,
                    "spearman": round(scores["spearman"], 2),
                    "seconds": round(seconds, 1),
                    "mean_tokens": round(mean_tokens(encoder, pairs), 1),
                }
                print(json.dumps(row), flush=True)
                with results.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                done.append(row)
                output.write_text(table(done, threads))  # the table so far, in case the run is stopped
            del encoder
    return done


def table(rows: list[dict], threads: int) -> str:
    baseline = {(r["model"], r["attention"], r["pairs"]): r for r in rows if r["mode"] == "mean"}
    lines = [
        "| model | attention | embedding | STS-B dev Spearman x100 | vs mean | seconds | vs mean | tokens per text |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = baseline.get((r["model"], r["attention"], r["pairs"]))
        delta = f"{r['spearman'] - base['spearman']:+.2f}" if base else "-"
        ratio = f"{r['seconds'] / base['seconds']:.2f}x" if base else "-"
        lines.append(
            f"| {r['model']} | {r['attention']} | {r['mode']} | {r['spearman']:.2f} | {delta} | "
            f"{r['seconds']:.0f} | {ratio} | {r['mean_tokens']} |"
        )
    subsets = sorted({r["subset"] for r in rows})
    return "\n".join(
        [
            "# Prompt-based embeddings, untrained models, STS-B dev",
            "",
            f"`bench/prompt_embeddings.py`; STS-B dev, {'; '.join(subsets)}; float32 on the CPU, "
            f"{threads} thread(s), niced on a shared 2-core machine (seconds are comparable within this table only).",
            '`mean`: the text alone, mean pooling. `prompteol`: `prompt="prompteol"` (last token of '
            '`This sentence : "{text}" means in one word:"`). `echo`: `prompt="echo"` (mean over the second copy of '
            "`Rewrite the sentence: {text}\\nRewritten sentence: {text}`). Tokens per text: the mean input length "
            "over the distinct sentences, special tokens and template included.",
            "",
            *lines,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--limit", type=int, default=None, help="use the first N dev pairs (default: all 1,500)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument(
        "--attentions", nargs="+", default=["causal", "bidirectional"], choices=["causal", "bidirectional"]
    )
    parser.add_argument("--stride", type=int, default=1, help="use every N-th dev pair (before --limit)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="bench/results/prompt_embeddings.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    pairs = read_pairs(args.limit, args.stride)
    subset = f"{len(pairs.scores)} pairs" + (f" (every {args.stride}th of 1,500)" if args.stride > 1 else "")
    rows = run(args.models, args.modes, args.attentions, pairs, subset, output, args.batch_size, args.threads)
    output.write_text(table(rows, args.threads))
    print(table(rows, args.threads))


if __name__ == "__main__":
    main()
