"""The ``decoder2vec eval`` command: a report over registered tasks, ``eval compare``, ``eval sts``, ``eval tasks``.

::

    decoder2vec eval --model smollm2-135m --tasks stsb,sickr,trec,mrpc --data-dir /path/to/data -o base.json
    decoder2vec eval --model smollm2-135m --adapter runs/simcse --task mine=sts:my.tsv
    decoder2vec eval compare base.json simcse.json
    decoder2vec eval sts --data stsb_test.tsv --model smollm2-135m --causal
    decoder2vec eval tasks
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

__all__ = ["register"]

DEFAULT_TASKS = "stsb,sickr,trec,mrpc"


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _default_output(args: argparse.Namespace) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(args.model)).name).strip("-") or "model"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(f"eval_{name}_{stamp}.json")


def _run_report(args: argparse.Namespace) -> None:
    from ..cli import load_encoder
    from .report import markdown_table, run_tasks, write_report
    from .tasks import load_task_file, parse_task_option, resolve_tasks

    extra = [spec for path in args.task_file for spec in load_task_file(path)]
    extra += [parse_task_option(text) for text in args.task]
    names = args.tasks if args.tasks is not None else ",".join(s.name for s in extra) or DEFAULT_TASKS
    specs = resolve_tasks(names, extra)  # fails on a bad task name before the model loads
    data_dir = args.data_dir or None  # None: $DECODER2VEC_DATA, then the hub (see decoder2vec.catalog)
    encoder = load_encoder(args)
    report = run_tasks(
        encoder,
        specs,
        data_dir=data_dir,
        instruction=args.instruction,
        batch_size=args.batch_size,
        limit=args.limit,
        adapter=args.adapter,
        log=_log,
    )
    output = write_report(report, args.output or _default_output(args))
    print(markdown_table(report))
    print(f"\nreport: {output}")


def _compare(args: argparse.Namespace) -> None:
    from .report import compare_table, read_report

    first, second = read_report(args.first), read_report(args.second)
    labels = (Path(args.first).stem, Path(args.second).stem)
    if labels[0] == labels[1]:
        labels = ("A", "B")
    print(compare_table(first, second, labels=labels, all_metrics=args.all_metrics))


def _list_tasks(args: argparse.Namespace) -> None:
    from ..catalog import data_folder, hub_cache_folder
    from .tasks import TASKS

    folder = data_folder()
    print(
        f"data folder: {folder or 'none (DECODER2VEC_DATA unset)'} (change with --data-dir or DECODER2VEC_DATA); "
        f"built-in files missing there come from the Hugging Face hub, kept in {hub_cache_folder()}\n"
    )
    print("| task | type | files | default instruction |")
    print("|---|---|---|---|")
    for spec in TASKS.values():
        files = ", ".join(f"{role}={path}" for role, path in spec.files.items())
        print(f"| {spec.name} | {spec.type} | {files} | {spec.instruction or ''} |")


def _eval_sts(args: argparse.Namespace) -> None:
    from ..cli import load_encoder
    from .sts import STSEvaluator, read_sts_tsv

    pairs = read_sts_tsv(args.data)
    encoder = load_encoder(args)
    scores = STSEvaluator(pairs, batch_size=args.batch_size, instruction=args.instruction)(encoder)
    print(f"STS {args.data}: Spearman {scores['spearman']:.2f}  Pearson {scores['pearson']:.2f}  (x100, cosine)")
    summary = {
        "task": "sts",
        "data": str(args.data),
        "model": args.model,
        "pooling": encoder.config.pooling,
        "bidirectional": encoder.config.bidirectional,
        **scores,
    }
    print(json.dumps(summary))


def register(subparsers) -> None:
    from ..cli import add_model_arguments

    evaluate = subparsers.add_parser(
        "eval",
        help="evaluate an encoder on registered tasks and write a report (or: eval compare | sts | tasks)",
        description="Evaluate an encoder on tasks (STS, retrieval, classification, clustering, pairs) read from "
        "local files; print a markdown table and write a JSON report with every metric.",
    )
    evaluate.add_argument("--tasks", default=None, help=f"comma-separated task names (default: {DEFAULT_TASKS})")
    evaluate.add_argument(
        "--data-dir",
        default=None,
        help="folder the built-in tasks read (default: $DECODER2VEC_DATA; files missing there come from the hub)",
    )
    evaluate.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME=TYPE:PATH[,PATH]",
        help="add a task from files, e.g. mysts=sts:my.tsv or news=classification:train.tsv,test.tsv",
    )
    evaluate.add_argument("--task-file", action="append", default=[], help="JSON/YAML file of task definitions")
    evaluate.add_argument(
        "--instruction", default=None, help="replaces every task's default query instruction ('' runs without one)"
    )
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument(
        "--limit", type=int, default=None, help="quick run: a seeded sample of N examples per file (not comparable)"
    )
    evaluate.add_argument("-o", "--output", default=None, help="report JSON path (default: eval_MODEL_TIME.json)")
    add_model_arguments(evaluate)
    evaluate.set_defaults(handler=_run_report)

    commands = evaluate.add_subparsers(dest="eval_command", metavar="{compare,sts,tasks}")
    compare = commands.add_parser("compare", help="two reports side by side with differences")
    compare.add_argument("first", help="report JSON (A)")
    compare.add_argument("second", help="report JSON (B); differences are B - A")
    compare.add_argument("--all-metrics", action="store_true", help="a row per metric, not only the main one")
    compare.set_defaults(handler=_compare)

    sts = commands.add_parser("sts", help="Spearman/Pearson x100 of cosine similarity on an STS TSV")
    sts.add_argument("--data", required=True, help="TSV with sentence1, sentence2, score columns")
    sts.add_argument("--instruction", default=None, help="instruction for both sentences of a pair")
    sts.add_argument("--batch-size", type=int, default=32)
    add_model_arguments(sts)
    sts.set_defaults(handler=_eval_sts)

    tasks = commands.add_parser("tasks", help="list the registered tasks and their files")
    tasks.set_defaults(handler=_list_tasks)
