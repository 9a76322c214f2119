"""Word-level probes (CoNLL-2003 POS, chunks, NER) for several encoders: the LLM2Vec paper's comparison.

Each row is a model with its attention (and adapters); the token states of train, dev and test are computed
once per row and shared by the three tasks and the four word poolings (mean, first, last, previous). A linear
probe is trained on train, its epoch chosen on dev, and scored on test (accuracy x100 for POS and chunks,
entity micro-F1 x100 for NER). Rows are appended to a JSONL file as they finish and the markdown table is
rewritten after each, so a long run leaves partial results::

    python bench/word_tasks.py                                    # SmolLM2 and Gemma 3, causal and bidirectional
    python bench/word_tasks.py --rows smollm2-135m:causal --adapter mntp=/tmp/d2v/adapters/smollm2/mntp
    python bench/word_tasks.py --compare-classifiers --rows smollm2-135m:causal   # AdamW probe vs scikit-learn

``--train-sentences`` subsamples train (seeded, default 2,000 sentences); ``--dev-sentences`` and
``--test-sentences`` do the same for dev and test (default: all; set them only when time is short, and say so).
An ``--adapter NAME=DIR[,DIR]`` row is SmolLM2 (``--adapter-model``), bidirectional, with those adapters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from decoder2vec import Encoder
from decoder2vec.eval.report import library_versions
from decoder2vec.eval.tasks import default_data_dir, subsample
from decoder2vec.eval.word import (
    WORD_POOLING,
    WordEvaluator,
    cached_token_states,
    read_conll,
    train_probe,
    word_vectors,
)

DEFAULT_ROWS = "smollm2-135m:causal,smollm2-135m:bidirectional,gemma3-270m:causal,gemma3-270m:bidirectional"
TASKS = {"pos": "POS acc", "chunk": "chunk acc", "ner": "NER F1"}


def _log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def _rows(args) -> list[dict]:
    rows = []
    for text in [r for r in args.rows.split(",") if r]:
        model, _, mode = text.partition(":")
        if mode not in ("causal", "bidirectional"):
            raise SystemExit(f"--rows entry {text!r} must be MODEL:causal or MODEL:bidirectional")
        rows.append(
            {"name": f"{model} {mode}", "model": model, "bidirectional": mode == "bidirectional", "adapter": []}
        )
    for text in args.adapter:
        name, equals, folders = text.partition("=")
        if not equals or not folders:
            raise SystemExit(f"--adapter {text!r} is not NAME=DIR[,DIR]")
        missing = [f for f in folders.split(",") if not Path(f).is_dir()]
        if missing:
            _log(f"skip row {name!r}: adapter folder(s) {missing} not found (pending)")
            continue
        model = args.adapter_model
        rows.append({"name": f"{model} {name}", "model": model, "bidirectional": True, "adapter": folders.split(",")})
    return rows


def _splits(args):
    folder = (Path(args.data_dir) if args.data_dir else default_data_dir()) / "conll2003"
    limits = {"train": args.train_sentences, "dev": args.dev_sentences, "test": args.test_sentences}
    return {split: subsample(read_conll(folder / f"{split}.txt"), limits[split]) for split in limits}


def _evaluate_row(row: dict, splits: dict, args) -> dict:
    start = time.perf_counter()
    encoder = Encoder.from_pretrained(
        row["model"], bidirectional=row["bidirectional"], adapter=row["adapter"] or None, dtype="float32", device="cpu"
    )
    _log(f"{row['name']}: loaded in {time.perf_counter() - start:.0f} s")
    forward_seconds = {}
    for split, data in splits.items():
        states = cached_token_states(encoder, data, batch_size=args.batch_size, show_progress=False)
        forward_seconds[split] = round(states.seconds, 1)
        _log(f"{row['name']}: {split} token states, {len(data)} sentences in {states.seconds:.0f} s")
    scores = {}
    for column in TASKS:
        for pooling in args.word_pooling.split(","):
            metrics = WordEvaluator(
                splits["train"], splits["dev"], splits["test"], column=column, word_pooling=pooling
            )
            result = metrics(encoder)
            scores[f"{column}/{pooling}"] = {k: round(v, 2) for k, v in result.items()}
            _log(f"{row['name']}: {column} {pooling} {metrics.primary_metric} {result[metrics.primary_metric]:.2f}")
    if args.compare_classifiers:
        scores["classifiers"] = _compare_classifiers(encoder, splits, args)
    return {**row, "forward_seconds": forward_seconds, "scores": scores, "seconds": round(time.perf_counter() - start)}


def _compare_classifiers(encoder, splits, args) -> dict:
    """Mean-pooled word vectors, POS: the AdamW probe against scikit-learn's LogisticRegression (lbfgs)."""
    from sklearn.linear_model import LogisticRegression

    vectors = {
        s: word_vectors(cached_token_states(encoder, d, batch_size=args.batch_size), "mean") for s, d in splits.items()
    }
    labels = {s: np.asarray([t for tags in d.pos for t in tags]) for s, d in splits.items()}
    names = sorted(set(labels["train"]))
    index = {name: i for i, name in enumerate(names)}
    start = time.perf_counter()
    predict, info = train_probe(
        vectors["train"],
        np.asarray([index[t] for t in labels["train"]]),
        vectors["dev"],
        lambda ids: float((np.asarray(names)[ids] == labels["dev"]).mean()),
        num_labels=len(names),
    )
    torch_seconds = time.perf_counter() - start
    torch_accuracy = float((np.asarray(names)[predict(vectors["test"])] == labels["test"]).mean()) * 100
    mean, std = vectors["train"].mean(axis=0), vectors["train"].std(axis=0) + 1e-6
    start = time.perf_counter()
    best = (-1.0, None, None)
    for c in (0.1, 1.0):  # the same kind of model selection on dev
        classifier = LogisticRegression(C=c, max_iter=1000).fit((vectors["train"] - mean) / std, labels["train"])
        dev_accuracy = float((classifier.predict((vectors["dev"] - mean) / std) == labels["dev"]).mean())
        if dev_accuracy > best[0]:
            best = (dev_accuracy, c, classifier)
    sklearn_seconds = time.perf_counter() - start
    sklearn_accuracy = float((best[2].predict((vectors["test"] - mean) / std) == labels["test"]).mean()) * 100
    result = {
        "adamw_probe": {"seconds": round(torch_seconds, 1), "test_accuracy": round(torch_accuracy, 2), **info},
        "sklearn_logistic_regression": {
            "seconds": round(sklearn_seconds, 1),
            "test_accuracy": round(sklearn_accuracy, 2),
            "C": best[1],
        },
    }
    _log(f"classifiers: {json.dumps(result)}")
    return result


def _best(scores: dict, column: str) -> tuple[float, str]:
    """The test score of the word pooling with the best dev score (never chosen on test)."""
    primary = "f1" if column == "ner" else "accuracy"
    found = [
        (v["dev_score"], v[primary], key.split("/")[1]) for key, v in scores.items() if key.startswith(f"{column}/")
    ]
    return max(found)[1:] if found else (float("nan"), "")


def _table(results: list[dict], args) -> str:
    poolings = args.word_pooling.split(",")
    lines = [
        "| model | attention | " + " | ".join(f"{TASKS[c]} (pooling best on dev)" for c in TASKS) + " | seconds |",
        "|---|---|" + "---:|" * (len(TASKS) + 1),
    ]
    for r in results:
        cells = [f"{score:.2f} ({pooling})" for score, pooling in (_best(r["scores"], c) for c in TASKS)]
        adapters = f" + {', '.join(Path(a).name for a in r['adapter'])}" if r["adapter"] else ""
        attention = ("bidirectional" if r["bidirectional"] else "causal") + adapters
        lines.append(f"| {r['model']} | {attention} | " + " | ".join(cells) + f" | {r['seconds']} |")
    lines += ["", "Every word pooling (test score; dev score in brackets):", ""]
    header = " | ".join(f"{TASKS[c]} {p}" for c in TASKS for p in poolings)
    lines += [f"| row | {header} |", "|---|" + "---:|" * (len(TASKS) * len(poolings))]
    for r in results:
        cells = []
        for c in TASKS:
            primary = "f1" if c == "ner" else "accuracy"
            for p in poolings:
                v = r["scores"].get(f"{c}/{p}")
                cells.append(f"{v[primary]:.2f} ({v['dev_score']:.1f})" if v else "")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated MODEL:causal|bidirectional")
    parser.add_argument("--adapter", action="append", default=[], help="NAME=DIR[,DIR]: a row with adapters")
    parser.add_argument("--adapter-model", default="smollm2-135m", help="the base model of --adapter rows")
    parser.add_argument("--word-pooling", default=",".join(WORD_POOLING))
    parser.add_argument("--train-sentences", type=int, default=2000, help="seeded sample of train (None: all)")
    parser.add_argument("--dev-sentences", type=int, default=None, help="seeded sample of dev (default: all)")
    parser.add_argument("--test-sentences", type=int, default=None, help="seeded sample of test (default: all)")
    parser.add_argument("--data-dir", default=None, help="folder holding conll2003/ (default: $DECODER2VEC_DATA)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--compare-classifiers", action="store_true", help="also time scikit-learn on POS")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "word_tasks.md"))
    args = parser.parse_args()

    rows, splits = _rows(args), _splits(args)
    sizes = {s: (len(d), sum(len(w) for w in d.words)) for s, d in splits.items()}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    jsonl = output.with_suffix(".jsonl")
    results = []
    for row in rows:
        results.append(_evaluate_row(row, splits, args))
        with jsonl.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({**results[-1], "sizes": sizes, "created": time.strftime("%F %T")}) + "\n")
        versions = library_versions()
        header = [
            "# Word-level probes on CoNLL-2003 (bench/word_tasks.py)",
            "",
            f"Command: `python bench/word_tasks.py {' '.join(sys.argv[1:])}`",
            "",
            "Sentences (words): "
            + ", ".join(f"{s} {n:,} ({w:,})" for s, (n, w) in sizes.items())
            + f"; seeded samples where smaller than the file. CPU float32, {torch.get_num_threads()} thread(s), "
            f"{platform.machine()}, torch {versions['torch']}, transformers {versions['transformers']}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}.",
            "",
            "",
        ]
        tmp = output.with_name(f".{output.name}.tmp")
        tmp.write_text("\n".join(header) + _table(results, args) + "\n", encoding="utf-8")
        os.replace(tmp, output)
        _log(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
