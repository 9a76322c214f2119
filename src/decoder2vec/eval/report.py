"""Run a list of tasks on one encoder, and write, print and compare the results.

A report is a JSON object: the model source, adapter(s), the encoder configuration (pooling, bidirectional,
...), the instruction override, library versions, and per task its type, main metric and score, every
metric, the instruction it ran with, its files and the seconds it took.

Example::

    from decoder2vec.eval.report import markdown_table, run_tasks, write_report
    from decoder2vec.eval.tasks import resolve_tasks

    report = run_tasks(encoder, resolve_tasks("stsb,trec"))
    print(markdown_table(report))
    write_report(report, "smollm2.json")
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from .tasks import TASK_TYPES, TaskSpec, build_evaluator, default_data_dir, task_instruction

__all__ = ["compare_table", "library_versions", "markdown_table", "read_report", "run_tasks", "write_report"]

REPORT_FORMAT = 1
_LIBRARIES = ("decoder2vec", "torch", "transformers", "peft", "numpy", "scikit-learn", "scipy", "mteb")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape a score (None when one is missing), and Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_tasks(
    encoder,
    specs: Sequence[TaskSpec],
    *,
    data_dir: str | Path | None = None,
    instruction: str | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    adapter: Sequence[str] | str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Evaluate ``encoder`` on every task of ``specs`` in order; returns the report (a JSON-ready dict).

    ``instruction`` replaces every task's default query instruction ("" runs without one); ``limit`` evaluates a
    seeded sample of that many examples per file (see :func:`~decoder2vec.eval.tasks.build_evaluator`); ``log``
    gets a line per finished task.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    config = getattr(encoder, "config", None)
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
    report = {
        "format": REPORT_FORMAT,
        "model": str(getattr(encoder, "source", "") or ""),
        "adapter": [adapter]
        if isinstance(adapter, str | os.PathLike)
        else (list(map(str, adapter)) if adapter else None),
        "pooling": config.get("pooling"),
        "bidirectional": config.get("bidirectional"),
        "encoder_config": config,
        "instruction_override": instruction,
        "data_dir": str(data_dir),
        "limit": limit,
        "versions": library_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tasks": [],
    }
    for spec in specs:
        start = time.perf_counter()
        evaluator = build_evaluator(spec, data_dir, instruction=instruction, batch_size=batch_size, limit=limit)
        metrics = evaluator(encoder)
        seconds = time.perf_counter() - start
        main_metric = getattr(evaluator, "primary_metric", TASK_TYPES[spec.type].main_metric)
        result = {
            "name": spec.name,
            "type": spec.type,
            "main_metric": main_metric,
            "main_score": metrics[main_metric],
            "metrics": metrics,
            "instruction": task_instruction(spec, instruction),
            "files": {role: str(data_dir / path) for role, path in spec.files.items()},
            "seconds": round(seconds, 2),
        }
        report["tasks"].append(result)
        if log:
            log(f"{spec.name}: {main_metric} {metrics[main_metric]:.2f} ({seconds:.1f} s)")
    return report


def write_report(report: dict, path: str | Path) -> Path:
    """Write ``report`` as JSON atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_report(path: str | Path) -> dict:
    """A report written by :func:`write_report`; a clear error when the file is something else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"report {str(path)!r} not found; write one with `decoder2vec eval ... --output FILE`")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"report {path} is not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(report, dict) or not isinstance(report.get("tasks"), list):
        raise ValueError(f"{path} is not a decoder2vec eval report (no 'tasks' list)")
    return report


def _describe(report: dict) -> str:
    mode = {True: "bidirectional", False: "causal"}.get(report.get("bidirectional"), "?")
    adapter = f" + {', '.join(report['adapter'])}" if report.get("adapter") else ""
    sample = f", {report['limit']} examples per file" if report.get("limit") else ""
    return f"{report.get('model')}{adapter} ({report.get('pooling')} pooling, {mode}{sample})"


def markdown_table(report: dict) -> str:
    """The report as a markdown table: task, type, main metric, score (x100) and seconds."""
    lines = [
        f"Model: {_describe(report)}",
        "",
        "| task | type | main metric | score | seconds |",
        "|---|---|---|---:|---:|",
    ]
    for task in report["tasks"]:
        lines.append(
            f"| {task['name']} | {task['type']} | {task['main_metric']} | {task['main_score']:.2f} | {task['seconds']:.1f} |"
        )
    return "\n".join(lines)


def compare_table(
    first: dict, second: dict, *, labels: tuple[str, str] = ("A", "B"), all_metrics: bool = False
) -> str:
    """Two reports side by side with the difference (second - first) per task, or per metric with ``all_metrics``.

    Tasks only one report has show a blank in the other column.
    """
    by_name = [{task["name"]: task for task in report["tasks"]} for report in (first, second)]
    names = list(dict.fromkeys([*by_name[0], *by_name[1]]))
    lines = [
        f"{labels[0]}: {_describe(first)}",
        f"{labels[1]}: {_describe(second)}",
        "",
        f"| task | type | metric | {labels[0]} | {labels[1]} | difference |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name in names:
        a, b = by_name[0].get(name), by_name[1].get(name)
        task = a or b
        metrics = list(dict.fromkeys([*(a or {}).get("metrics", {}), *(b or {}).get("metrics", {})]))
        for metric in metrics if all_metrics else [task["main_metric"]]:
            x = a["metrics"].get(metric) if a else None
            y = b["metrics"].get(metric) if b else None
            difference = f"{y - x:+.2f}" if x is not None and y is not None else ""
            cells = [f"{v:.2f}" if v is not None else "" for v in (x, y)]
            lines.append(f"| {name} | {task['type']} | {metric} | {cells[0]} | {cells[1]} | {difference} |")
    return "\n".join(lines)
