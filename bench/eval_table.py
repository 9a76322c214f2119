"""Evaluate an untrained model, causal (the baseline) and bidirectional, on the report tasks; print the table.

Writes one JSON report per mode and a markdown table with the main score and seconds of every task, plus the
difference bidirectional - causal (measured in the same run)::

    python bench/eval_table.py                                     # SmolLM2-135M, stsb,sickr,trec,mrpc
    python bench/eval_table.py --model path/to/model --tasks stsb --output-dir /tmp/eval
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from decoder2vec import Encoder
from decoder2vec.eval.report import library_versions, run_tasks, write_report
from decoder2vec.eval.tasks import default_data_dir, resolve_tasks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pooling", default="mean")
    parser.add_argument("--tasks", default="stsb,sickr,trec,mrpc")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="a seeded sample of N examples per file")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default="smollm2", help="file name stem of the outputs")
    args = parser.parse_args()

    specs = resolve_tasks(args.tasks)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    output_dir = Path(args.output_dir)
    reports = {}
    for mode, bidirectional in (("causal", False), ("bidirectional", True)):
        start = time.perf_counter()
        encoder = Encoder.from_pretrained(
            args.model, pooling=args.pooling, bidirectional=bidirectional, dtype="float32", device="cpu"
        )
        print(f"[{mode}] loaded {args.model} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        reports[mode] = run_tasks(
            encoder,
            specs,
            data_dir=data_dir,
            batch_size=args.batch_size,
            limit=args.limit,
            log=lambda line, mode=mode: print(f"[{mode}] {line}", file=sys.stderr, flush=True),
        )
        write_report(reports[mode], output_dir / f"eval_{args.name}_{mode}.json")
        del encoder

    versions = library_versions()
    lines = [
        f"# {args.model}, untrained, {args.pooling} pooling, fp32, CPU: causal vs bidirectional",
        "",
        f"Command: `python bench/eval_table.py --model {args.model} --tasks {args.tasks}"
        + (f" --limit {args.limit}`" if args.limit else "`")
        + f"; data: `{data_dir}`.",
        f"Sample: {args.limit} examples per file (seeded; train and test alike), not the full sets."
        if args.limit
        else "Full test sets.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {versions['torch']} "
        f"({torch.get_num_threads()} threads), transformers {versions['transformers']}, "
        f"scikit-learn {versions['scikit-learn']}.",
        "Scores x100; default per-task query instruction; seconds = reading files + embedding + scoring.",
        "",
        "| task | type | main metric | causal | s | bidirectional | s | bidirectional - causal |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for causal, bidirectional in zip(reports["causal"]["tasks"], reports["bidirectional"]["tasks"], strict=True):
        lines.append(
            f"| {causal['name']} | {causal['type']} | {causal['main_metric']} | {causal['main_score']:.2f} "
            f"| {causal['seconds']:.0f} | {bidirectional['main_score']:.2f} | {bidirectional['seconds']:.0f} "
            f"| {bidirectional['main_score'] - causal['main_score']:+.2f} |"
        )
    lines += ["", "Instructions:"]
    lines += [f"- {task['name']}: {task['instruction']!r}" for task in reports["causal"]["tasks"]]
    table = "\n".join(lines) + "\n"
    print(table)
    tmp = output_dir / f".eval_table_{args.name}.md.tmp"
    tmp.write_text(table, encoding="utf-8")
    os.replace(tmp, output_dir / f"eval_table_{args.name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
