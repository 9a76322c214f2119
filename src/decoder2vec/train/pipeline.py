"""The pipeline: a recipe's stages (MNTP, SimCSE) trained in order for one or more seeds, then evaluated.

For each seed: train every stage on top of the previous one (its adapter merged first), optionally replace the
last stage's adapter by the exact average of its last checkpoints (:func:`~decoder2vec.train.average_adapters`),
optionally scale that update back toward the untrained model (``base + s * update`` for each ``s`` of ``scales``,
the one that scores best on ``select_task`` — STS-B dev, never a test set — kept), and score the result on the
evaluation tasks (STS-B test by default; SICK-R, TREC, MRPC on request). The untrained
model is scored once. With several seeds it prints one row per seed, the mean and the spread (max - min), the
figures to report: one seed says little about a recipe.

    from decoder2vec.train.pipeline import PipelineConfig, run_pipeline
    results = run_pipeline(PipelineConfig(recipe="small-cpu", seeds=[0, 1, 2], output_dir="runs/demo"))

``decoder2vec pipeline`` is the command-line face of :func:`run_pipeline`; ``make demo`` runs it with the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import option
from .config import STAGES
from .recipes import DEFAULT_CPU_RECIPE, DEFAULT_GPU_RECIPE, load_recipe, recipe_options

__all__ = ["PipelineConfig", "default_recipe", "run_pipeline"]

STAGE_DATA = {"mntp": "mntp", "simcse": "simcse"}  # catalog names of each stage's training text


@dataclass
class PipelineConfig:
    """What ``decoder2vec pipeline`` runs. Fields left None come from the recipe's ``pipeline`` section."""

    recipe: str | None = option(None, help="recipe name or YAML file (default: small-cpu without a GPU, else llm2vec)")
    model: str | None = option(None, help="base model (default: the recipe's; else the embedded SmolLM2-135M)")
    stages: list[str] | None = option(None, help="stages in order, e.g. mntp simcse (default: the recipe's)")
    seeds: list[int] | None = option(None, help="one full run per seed (default: the recipe's, else 42)")
    average_last: int | None = option(None, help="average the last stage's last k checkpoints (0 or 1: final only)")
    checkpoint_every: int | None = option(None, help="checkpoint interval of the last stage (for average_last)")
    scales: list[float] | None = option(
        None, help="fractions of the trained update to try, the best on select_task kept (default: the recipe's, 1)"
    )
    select_task: str = option("stsb-dev", help="task that chooses among scales (a dev set, never a test set)")
    eval_tasks: list[str] | None = option(None, help="tasks scored after training (default: stsb = STS-B test)")
    baseline_tasks: list[str] | None = option(
        None, help="tasks the untrained model is scored on (default: eval_tasks; none: skip)"
    )
    instruction: str | None = option("", help="instruction for every evaluation task ('' none, None task defaults)")
    causal_baseline: bool = option(False, help="also score the untrained model with causal attention")
    score_each_stage: bool = option(False, help="score STS-B test after every stage, not only the last")
    data_dir: str | None = option(None, help="data folder (default: $DECODER2VEC_DATA, then the Hugging Face hub)")
    output_dir: str | None = option(None, help="where runs go (default: runs/pipeline-DATE-TIME)")
    eval_limit: int | None = option(None, help="score a seeded sample of N examples per evaluation file")
    resume: bool = option(False, help="continue interrupted runs in output_dir")
    progress: bool = option(True, help="progress bars")
    stage_options: dict = option(default_factory=dict, help="per-stage overrides: {stage: {field: value}}")

    def __post_init__(self):
        # lists may come as "0,1,2" or ["0", "1,2"] from the command line
        for name, kind in (
            ("stages", str),
            ("seeds", int),
            ("scales", float),
            ("eval_tasks", str),
            ("baseline_tasks", str),
        ):
            value = getattr(self, name)
            if value is None:
                continue
            items = [value] if isinstance(value, str | int) else list(value)
            parts = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
            if name == "baseline_tasks" and parts in ([], ["none"]):  # none: skip the untrained model
                self.baseline_tasks = []
                continue
            try:
                setattr(self, name, [kind(p) for p in parts])
            except ValueError:
                raise ValueError(f"{name} must be a comma-separated list of {kind.__name__}s, not {value!r}") from None
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if self.scales is not None and not all(0 < s <= 4 for s in self.scales):
            raise ValueError(
                f"scales must be fractions of the trained update in (0, 4], e.g. 1,0.5; not {self.scales}"
            )


def default_recipe() -> str:
    import torch

    return DEFAULT_GPU_RECIPE if torch.cuda.is_available() else DEFAULT_CPU_RECIPE


def _resolved(config: PipelineConfig) -> tuple[PipelineConfig, dict]:
    """``config`` with every None filled from the recipe's pipeline section or the built-in fallback."""
    recipe_name = config.recipe or default_recipe()
    recipe = load_recipe(recipe_name)
    section = recipe.get("pipeline") or {}
    fallback = {
        "model": "smollm2-135m",
        "stages": ["mntp", "simcse"],
        "seeds": [42],
        "average_last": 0,
        "checkpoint_every": 50,
        "scales": [1.0],
        "eval_tasks": ["stsb"],
    }
    values = {}
    for name, default in fallback.items():
        given = getattr(config, name)
        values[name] = given if given is not None else section.get(name, default)
    unknown = sorted(set(section) - set(fallback) - {"description"})
    if unknown:
        raise ValueError(f"recipe {recipe_name!r}: unknown pipeline option(s) {', '.join(unknown)}")
    for stage in values["stages"]:
        if stage not in STAGE_DATA:
            raise ValueError(f"pipeline stages must be among {', '.join(STAGE_DATA)}; got {stage!r}")
    output = config.output_dir or time.strftime("runs/pipeline-%Y%m%d-%H%M%S")
    return dataclasses.replace(config, recipe=recipe_name, output_dir=output, **values), recipe


def _scores(encoder, tasks: list[str], config: PipelineConfig, log) -> dict[str, float]:
    from ..eval.report import run_tasks
    from ..eval.tasks import resolve_tasks

    report = run_tasks(
        encoder,
        resolve_tasks(tasks),
        data_dir=config.data_dir,
        instruction=config.instruction,
        limit=config.eval_limit,
        log=log,
    )
    return {task["name"]: round(task["main_score"], 2) for task in report["tasks"]}


def run_pipeline(config: PipelineConfig, log=print) -> dict:
    """Train and score as ``config`` says; returns the results (also written to ``output_dir/pipeline_results.json``)."""
    from ..catalog import resolve_dataset
    from ..model import Encoder
    from .average import average_adapters
    from .run import train

    config, _ = _resolved(config)
    output = Path(config.output_dir)
    if config.resume and not output.is_dir():
        raise ValueError(f"--resume: {output} does not exist; give the output folder of the interrupted pipeline")
    data = {stage: str(resolve_dataset(STAGE_DATA[stage], data_dir=config.data_dir)) for stage in config.stages}
    choosing = len(config.scales) > 1
    for task in config.eval_tasks + [config.select_task] * choosing:  # fail on a missing file now, not in an hour
        from ..eval.tasks import resolve_task_files, resolve_tasks

        for spec in resolve_tasks([task]):
            resolve_task_files(spec, config.data_dir)
    start = time.perf_counter()
    results: dict = {
        "recipe": config.recipe,
        "model": config.model,
        "stages": config.stages,
        "seeds": config.seeds,
        "eval_tasks": config.eval_tasks,
        "scales": config.scales,
        "untrained": {},
        "runs": [],
    }

    def scored(label: str, encoder, tasks) -> dict[str, float]:
        began = time.perf_counter()
        scores = _scores(encoder, tasks, config, log=None)
        log(
            f"{label:<34} "
            + "  ".join(f"{k} {v:6.2f}" for k, v in scores.items())
            + f"   ({time.perf_counter() - began:.0f} s)"
        )
        return scores

    baseline_tasks = config.eval_tasks if config.baseline_tasks is None else config.baseline_tasks
    if config.causal_baseline and baseline_tasks:
        causal = Encoder.from_pretrained(config.model, bidirectional=False)
        results["untrained"]["causal"] = scored("untrained, causal", causal, baseline_tasks)
        del causal
    if baseline_tasks:
        results["untrained"]["bidirectional"] = scored(
            "untrained, bidirectional", Encoder.from_pretrained(config.model), baseline_tasks
        )

    # each stage's options: the recipe's as applied to this model (read once), then the command line's
    stage_options = {
        stage: {**recipe_options(config.recipe, stage, config.model), **(config.stage_options.get(stage) or {})}
        for stage in config.stages
    }
    for seed in config.seeds:
        run_started = time.perf_counter()
        seed_dir = output / f"seed-{seed}"
        row: dict = {"seed": seed, "train_seconds": {}, "stage_scores": {}}
        previous: list[str] = []
        for index, stage in enumerate(config.stages):
            last = index == len(config.stages) - 1
            options = dict(stage_options[stage])
            if last and config.average_last > 1:
                options.update(checkpoint_every=config.checkpoint_every, keep_checkpoints=config.average_last)
            stage_config = STAGES[stage](
                **options,
                model=config.model,
                data=[data[stage]],
                adapter=previous or None,
                seed=seed,
                output_dir=str(seed_dir / stage),
                resume=config.resume,
                progress=config.progress,
            )
            log(
                f"seed {seed}: {stage} {stage_config.steps} steps x {stage_config.batch_size} x "
                f"{stage_config.max_seq_length} tokens, lr {stage_config.learning_rate}"
            )
            trained = train(stage_config)
            row["train_seconds"][stage] = trained.log[-1]["seconds"] if trained.log else 0.0
            previous = [stage_config.output_dir]  # its stack/ holds the stages before it
            if config.score_each_stage and not last:
                row["stage_scores"][stage] = scored(f"seed {seed}: after {stage}", trained.encoder, ["stsb"])
            del trained
        final = previous[0]
        sources = [Path(final)]
        if config.average_last > 1:
            checkpoints = sorted((Path(final) / "checkpoints").glob("step-*"), key=lambda p: p.name)
            sources = checkpoints[-config.average_last :]
            row["averaged_checkpoints"] = [p.name for p in sources]
        if choosing:
            row["scale_scores"] = {}
            for scale in config.scales:
                candidate = average_adapters(sources, seed_dir / f"scale-{scale:g}", scale=scale)
                encoder = Encoder.from_pretrained(config.model, adapter=str(candidate))
                score = scored(f"seed {seed}: update x {scale:g}", encoder, [config.select_task])
                row["scale_scores"][f"{scale:g}"] = score[config.select_task]
                del encoder
            best = max(config.scales, key=lambda s: row["scale_scores"][f"{s:g}"])  # the first of equals
            row["scale"] = best
            final = str(seed_dir / "final")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(seed_dir / f"scale-{best:g}", final)  # the candidate already written, kept
            for scale in config.scales:
                shutil.rmtree(seed_dir / f"scale-{scale:g}", ignore_errors=True)
        elif config.scales != [1.0] or len(sources) > 1:
            row["scale"] = config.scales[0]
            final = str(average_adapters(sources, seed_dir / "final", scale=config.scales[0]))
        row["adapter"] = final
        row["scores"] = scored(
            f"seed {seed}: trained", Encoder.from_pretrained(config.model, adapter=final), config.eval_tasks
        )
        row["minutes"] = round((time.perf_counter() - run_started) / 60, 1)
        results["runs"].append(row)
        _write_json(output / "pipeline_results.json", {**results, "config": dataclasses.asdict(config)})

    results["summary"] = summarize(results["runs"], config.eval_tasks)
    results["minutes"] = round((time.perf_counter() - start) / 60, 1)
    results["config"] = dataclasses.asdict(config)
    results["recipe_options"] = stage_options
    _write_json(output / "pipeline_results.json", results)
    log("")
    log(results_table(results))
    final = results["runs"][-1]["adapter"]
    log(f"\ndone in {results['minutes']} min; load with Encoder.from_pretrained({config.model!r}, adapter={final!r})")
    return results


def summarize(runs: list[dict], tasks: list[str]) -> dict[str, dict[str, float]]:
    """Per task: mean, spread (max - min), min and max of the seeds' scores."""
    summary = {}
    for task in tasks:
        values = [run["scores"][task] for run in runs if task in run.get("scores", {})]
        if values:
            summary[task] = {
                "mean": round(statistics.fmean(values), 2),
                "spread": round(max(values) - min(values), 2),
                "min": min(values),
                "max": max(values),
            }
    return summary


def results_table(results: dict) -> str:
    """A markdown table: untrained rows, one row per seed (with the scale kept, when one was chosen), mean, spread."""
    tasks = results["eval_tasks"]
    chosen = any("scale" in run for run in results["runs"])
    extra = " scale |" if chosen else ""
    lines = [
        "| run | " + " | ".join(tasks) + " |" + extra + " minutes |",
        "|---|" + "---|" * (len(tasks) + 1 + chosen),
    ]
    blank = " |" if chosen else ""
    for label, scores in results["untrained"].items():
        cells = " | ".join(f"{scores.get(t, float('nan')):.2f}" for t in tasks)
        lines.append(f"| untrained, {label} | {cells} |{blank} |")
    for run in results["runs"]:
        cells = " | ".join(f"{run['scores'].get(t, float('nan')):.2f}" for t in tasks)
        scale = f" {run['scale']:g} |" if "scale" in run else blank
        lines.append(f"| seed {run['seed']} | {cells} |{scale} {run['minutes']} |")
    summary = results.get("summary") or {}
    if len(results["runs"]) > 1 and summary:
        lines.append("| **mean** | " + " | ".join(f"**{summary[t]['mean']:.2f}**" for t in tasks) + f" |{blank} |")
        spread = " | ".join(f"{summary[t]['spread']:.2f}" for t in tasks)
        lines.append(f"| spread (max - min) | {spread} |{blank} |")
    return "\n".join(lines)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)
