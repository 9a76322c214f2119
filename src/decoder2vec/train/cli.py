"""``decoder2vec train mntp|simcse|supervised`` and ``decoder2vec pipeline`` (a recipe's stages, then evaluation).

Every stage option comes from the stage's config dataclass. Values are taken in this order, later winning: the
dataclass defaults (the published LLM2Vec recipe), ``--recipe NAME`` (a shipped recipe such as ``small-cpu``, or a
YAML file), ``--config FILE`` (YAML or JSON), then ``--field-name value`` options. The pipeline runs a recipe
(``small-cpu`` without a GPU) for one or more seeds and prints the scores of each, their mean and spread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from ..config import add_arguments, config_from_args, load_config, read_config_file
from .config import STAGES
from .pipeline import PipelineConfig
from .recipes import available_recipes, recipe_options

__all__ = ["register"]


def _train(args: argparse.Namespace) -> None:
    from .run import train

    cls = STAGES[args.stage]
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None
    }
    from_file = read_config_file(args.config)
    model = overrides.get("model") or from_file.get("model") or cls.__dataclass_fields__["model"].default
    base = recipe_options(args.recipe, args.stage, model)
    base.update(from_file)
    config = load_config(cls, None, **{**base, **overrides})
    result = train(config)
    if int(os.environ.get("RANK", "0")) != 0:  # several processes: one summary line
        return
    last = result.log[-1] if result.log else {}
    print(
        json.dumps(
            {
                "stage": args.stage,
                "run_dir": str(result.run_dir),
                "steps": last.get("step", 0),
                "final_loss": last.get("loss"),
                "seconds": last.get("seconds"),
            }
        )
    )


def _pipeline(args: argparse.Namespace) -> None:
    from .pipeline import run_pipeline

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    stage_options = {}
    for stage in ("mntp", "simcse"):
        given = {field: getattr(args, f"{stage}_{name}") for name, field in _STAGE_SHORTCUTS.items()}
        stage_options[stage] = {k: v for k, v in given.items() if v is not None}
    config = config_from_args(PipelineConfig, args, base={"stage_options": stage_options})
    if config.resume and config.output_dir is None:
        raise ValueError("--resume needs --output-dir: the folder of the interrupted pipeline")
    run_pipeline(config)


_STAGE_SHORTCUTS = {
    "steps": "steps",
    "lr": "learning_rate",
    "batch_size": "batch_size",
    "max_seq_length": "max_seq_length",
}


def register(subparsers) -> None:
    recipes = ", ".join(available_recipes())
    train = subparsers.add_parser("train", help="train a stage: mntp | simcse | supervised")
    stages = train.add_subparsers(dest="stage", metavar="STAGE")
    for name, cls in STAGES.items():
        parser = stages.add_parser(
            name,
            help=(cls.__doc__ or "").strip().splitlines()[0],
            description=f"{(cls.__doc__ or '').strip()} Defaults: the published LLM2Vec recipe (recipes/llm2vec.yaml).",
        )
        parser.add_argument("--recipe", default=None, help=f"base options from a recipe: {recipes}, or a YAML file")
        parser.add_argument(
            "--config", default=None, help="YAML or JSON file of options; command-line options override it"
        )
        add_arguments(parser, cls)
        parser.set_defaults(handler=_train)
    train.set_defaults(handler=lambda args: train.print_help())

    pipeline = subparsers.add_parser(
        "pipeline", help="a recipe's stages for one or more seeds, then STS-B (and more) before and after"
    )
    add_arguments(pipeline, PipelineConfig, exclude=("stage_options",))
    pipeline.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    for stage in ("mntp", "simcse"):
        pipeline.add_argument(f"--{stage}-steps", type=int, default=None, help=f"{stage} optimizer steps")
        pipeline.add_argument(f"--{stage}-lr", type=float, default=None, help=f"{stage} learning rate")
        pipeline.add_argument(f"--{stage}-batch-size", type=int, default=None, help=f"{stage} batch size")
        pipeline.add_argument(f"--{stage}-max-seq-length", type=int, default=None, help=f"{stage} tokens per sequence")
    pipeline.set_defaults(handler=_pipeline)
