"""``decoder2vec train mntp|simcse|supervised`` and ``decoder2vec pipeline`` (MNTP then SimCSE, with STS-B).

Every stage option comes from the stage's config dataclass: ``--config FILE`` (YAML or JSON) gives a
base, ``--field-name value`` options override it. The pipeline runs the measured small-CPU recipe on
the shared data and prints STS-B test Spearman before and after each stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from ..config import add_arguments, load_config
from .config import STAGES, MNTPConfig, SimCSEConfig

__all__ = ["register"]

DEFAULT_DATA = os.environ.get("DECODER2VEC_DATA", os.path.join("..", "shared", "data"))


def _train(args: argparse.Namespace) -> None:
    from .run import train

    cls = STAGES[args.stage]
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None
    }
    config = load_config(cls, args.config, **overrides)
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


def _sts(encoder, pairs, label: str, results: dict) -> None:
    from ..eval.sts import STSEvaluator

    start = time.perf_counter()
    score = STSEvaluator(pairs, batch_size=32)(encoder)["spearman"]
    results[label] = round(score, 2)
    print(f"STS-B test Spearman {label:<24} {score:6.2f}   ({time.perf_counter() - start:.0f} s)", flush=True)


def _train_and_score(config, name: str, label: str, pairs, results: dict) -> None:
    """Train one pipeline stage, record its training time, and score the trained encoder on STS-B."""
    from .run import train

    print(
        f"{name}: {config.steps} steps x batch {config.batch_size} x {config.max_seq_length} tokens, "
        f"lr {config.learning_rate}",
        flush=True,
    )
    trained = train(config)
    results[f"{config.stage}_train_seconds"] = trained.log[-1]["seconds"] if trained.log else 0
    _sts(trained.encoder, pairs, label, results)


def _pipeline(args: argparse.Namespace) -> None:
    from ..eval.sts import STSPairs, read_sts_tsv
    from ..model import Encoder

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data = Path(args.data_dir)
    files = {
        "mntp": data / "text" / "wikitext2_valid.tokens",
        "simcse": data / "text" / "wiki_sentences.txt",
        "sts": data / "sts" / "stsb_test.tsv",
    }
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; pass --data-dir (the shared data folder) or set DECODER2VEC_DATA"
            )
    pairs = read_sts_tsv(files["sts"])
    if args.eval_pairs:
        pairs = STSPairs(
            pairs.sentences1[: args.eval_pairs], pairs.sentences2[: args.eval_pairs], pairs.scores[: args.eval_pairs]
        )
    if args.output_dir is None and args.resume:
        raise ValueError("--resume needs --output-dir: the folder of the interrupted pipeline")
    output = Path(args.output_dir or time.strftime("runs/pipeline-%Y%m%d-%H%M%S"))
    start = time.perf_counter()
    results: dict = {"model": args.model}
    common = {"model": args.model, "resume": args.resume, "progress": not args.no_progress}

    if args.causal_baseline:
        _sts(Encoder.from_pretrained(args.model, bidirectional=False), pairs, "untrained causal", results)
    _sts(Encoder.from_pretrained(args.model), pairs, "untrained bidirectional", results)

    mntp = MNTPConfig(**common, data=[str(files["mntp"])], output_dir=str(output / "mntp"), **_given(args, "mntp"))
    _train_and_score(mntp, "MNTP", "after MNTP", pairs, results)

    simcse = SimCSEConfig(
        **common,
        data=[str(files["simcse"])],
        adapter=[mntp.output_dir],
        output_dir=str(output / "simcse"),
        **_given(args, "simcse"),
    )
    _train_and_score(simcse, "SimCSE", "after MNTP + SimCSE", pairs, results)

    results["minutes"] = round((time.perf_counter() - start) / 60, 1)
    results["recipe"] = {"mntp": dataclasses.asdict(mntp), "simcse": dataclasses.asdict(simcse)}
    (output / "pipeline_results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"done in {results['minutes']} min; load with Encoder.from_pretrained({args.model!r}, adapter={str(output / 'simcse')!r})"
    )


def _given(args: argparse.Namespace, stage: str) -> dict:
    names = {"steps": "steps", "lr": "learning_rate", "batch_size": "batch_size", "max_seq_length": "max_seq_length"}
    return {
        field: getattr(args, f"{stage}_{name}")
        for name, field in names.items()
        if getattr(args, f"{stage}_{name}") is not None
    }


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="train a stage: mntp | simcse | supervised")
    stages = train.add_subparsers(dest="stage", metavar="STAGE")
    for name, cls in STAGES.items():
        parser = stages.add_parser(name, help=(cls.__doc__ or "").strip().splitlines()[0])
        parser.add_argument(
            "--config", default=None, help="YAML or JSON file of options; command-line options override it"
        )
        add_arguments(parser, cls)
        parser.set_defaults(handler=_train)
    train.set_defaults(handler=lambda args: train.print_help())

    pipeline = subparsers.add_parser("pipeline", help="MNTP then SimCSE on the shared data, STS-B before and after")
    pipeline.add_argument("--model", default="smollm2-135m", help="base model (default: the embedded SmolLM2-135M)")
    pipeline.add_argument("--data-dir", default=DEFAULT_DATA, help="shared data folder with text/ and sts/")
    pipeline.add_argument(
        "--output-dir", default=None, help="where the mntp/ and simcse/ runs go (default: runs/pipeline-DATE-TIME)"
    )
    pipeline.add_argument("--causal-baseline", action="store_true", help="also score the untrained causal model")
    pipeline.add_argument("--eval-pairs", type=int, default=None, help="score only the first N STS-B test pairs")
    pipeline.add_argument("--resume", action="store_true", help="continue interrupted runs in output-dir")
    pipeline.add_argument("--no-progress", action="store_true", help="no progress bars")
    pipeline.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    for stage in ("mntp", "simcse"):
        pipeline.add_argument(f"--{stage}-steps", type=int, default=None, help=f"{stage} optimizer steps")
        pipeline.add_argument(f"--{stage}-lr", type=float, default=None, help=f"{stage} learning rate")
        pipeline.add_argument(f"--{stage}-batch-size", type=int, default=None, help=f"{stage} batch size")
        pipeline.add_argument(f"--{stage}-max-seq-length", type=int, default=None, help=f"{stage} tokens per sequence")
    pipeline.set_defaults(handler=_pipeline)
