"""Training-recipe experiments scored on STS-B *dev*: one JSON line per run, appended to a results file.

Each run trains one SimCSE adapter (optionally on top of an MNTP run) with the options given, writes a
checkpoint every N steps, and scores on STS-B dev: every checkpoint, the final adapter, and the exact
average of the last k checkpoints (:func:`decoder2vec.train.average_adapters`). The test set plays no part.

    .venv/bin/python bench/recipe_sweep.py --name lr4e3 --model gemma3-270m \
        --set learning_rate=4e-3 --set steps=30 --seed 0 --checkpoint-every 10 --average-last 2,3

Options after ``--set`` are fields of :class:`decoder2vec.train.SimCSEConfig` (``--mntp-set`` for an MNTP run
trained first, when ``--mntp`` is given). The results of the recipe search are in
``bench/results/recipe_sweep.jsonl`` and summarised in ``bench/results/recipe_smallcpu.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from decoder2vec import Encoder
from decoder2vec.catalog import resolve_dataset
from decoder2vec.eval.sts import STSEvaluator, STSPairs, read_sts_tsv
from decoder2vec.train import MNTPConfig, SimCSEConfig, average_adapters, train


def _parse_sets(items: list[str], cls) -> dict:
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    values = {}
    for item in items:
        name, _, raw = item.partition("=")
        if name not in types:
            raise SystemExit(f"{cls.__name__} has no field {name!r}")
        values[name] = json.loads(raw) if raw[:1] in '[{"' or raw in ("true", "false", "null") else _number(raw)
    return values


def _number(raw: str):
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _score(encoder, pairs) -> float:
    return round(STSEvaluator(pairs, batch_size=32)(encoder)["spearman"], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="SimCSEConfig field=value")
    parser.add_argument("--mntp", action="store_true", help="train an MNTP adapter first")
    parser.add_argument("--mntp-set", action="append", default=[], help="MNTPConfig field=value")
    parser.add_argument("--mntp-adapter", default=None, help="reuse this MNTP run instead of training one")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument(
        "--average-last", default="", help="comma-separated k: score the mean of the last k checkpoints"
    )
    parser.add_argument("--dev-stride", type=int, default=1, help="score every k-th dev pair (1: all 1,500)")
    parser.add_argument("--score-steps", default="", help="comma-separated checkpoint steps to score (default: all)")
    parser.add_argument("--score-untrained", action="store_true", help="also score the model before training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/d2v/sweep")
    parser.add_argument("--output", default="bench/results/recipe_sweep.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pairs = read_sts_tsv(resolve_dataset("stsb", "dev"))  # $DECODER2VEC_DATA, else the hub
    if args.dev_stride > 1:
        k = args.dev_stride
        pairs = STSPairs(pairs.sentences1[::k], pairs.sentences2[::k], pairs.scores[::k])
    run_dir = Path(args.workdir) / args.name
    shutil.rmtree(run_dir, ignore_errors=True)
    record: dict = {"name": args.name, "model": args.model, "seed": args.seed, "dev_pairs": len(pairs.scores)}
    start = time.perf_counter()
    if args.score_untrained:
        record["dev_untrained"] = _score(Encoder.from_pretrained(args.model), pairs)
        print(args.name, "untrained", record["dev_untrained"], flush=True)

    earlier = []
    if args.mntp_adapter:
        earlier = [args.mntp_adapter]
    elif args.mntp:
        mntp_options = {
            "data": [str(resolve_dataset("mntp"))],
            **_parse_sets(args.mntp_set, MNTPConfig),
        }
        mntp = MNTPConfig(
            model=args.model, seed=args.seed, output_dir=str(run_dir / "mntp"), progress=False, **mntp_options
        )
        result = train(mntp)
        record["mntp"] = {k: mntp_options[k] for k in mntp_options if k != "data"}
        record["mntp_seconds"] = result.log[-1]["seconds"]
        record["dev_after_mntp"] = _score(result.encoder, pairs)
        earlier = [mntp.output_dir]
        del result

    options = {"data": [str(resolve_dataset("simcse"))], **_parse_sets(args.set, SimCSEConfig)}
    config = SimCSEConfig(
        model=args.model,
        adapter=earlier or None,
        seed=args.seed,
        output_dir=str(run_dir / "simcse"),
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=1000,
        progress=False,
        **options,
    )
    result = train(config)
    record["simcse"] = {k: options[k] for k in options if k != "data"}
    record["simcse_seconds"] = result.log[-1]["seconds"]
    record["loss"] = [round(entry["loss"], 4) for entry in result.log]
    print(json.dumps({"name": args.name, "simcse_seconds": record["simcse_seconds"]}), flush=True)

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    checkpoints = sorted((run_dir / "simcse" / "checkpoints").glob("step-*"), key=lambda p: p.name)
    encoder = result.encoder
    scores = {}
    wanted = {int(x) for x in args.score_steps.split(",") if x}
    for folder in checkpoints:
        if wanted and int(folder.name.split("-")[1]) not in wanted:
            continue
        set_peft_model_state_dict(encoder.model, load_file(folder / "adapter_model.safetensors"))
        scores[int(folder.name.split("-")[1])] = _score(encoder, pairs)
        print(args.name, folder.name, scores[int(folder.name.split("-")[1])], flush=True)
    record["dev_by_step"] = scores
    del encoder, result

    averages = {}
    for k in [int(x) for x in args.average_last.split(",") if x]:
        if k > len(checkpoints):
            continue
        averaged = average_adapters(checkpoints[-k:], run_dir / f"average-{k}")
        encoder = Encoder.from_pretrained(args.model, adapter=[*earlier, str(averaged)])
        averages[k] = _score(encoder, pairs)
        print(args.name, f"average of last {k}", averages[k], flush=True)
        del encoder
    record["dev_average_last"] = averages
    record["total_seconds"] = round(time.perf_counter() - start, 1)
    with open(args.output, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
