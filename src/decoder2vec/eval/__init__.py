"""Evaluation of an Encoder on local files, one task type per module (``sts``, ``retrieval``,
``classification``, ``clustering``, ``pairs``, ``word``), a task registry (``tasks``), reports (``report``) and an
adapter for MTEB's runner (``mteb``, imported only on request since it needs the mteb package).

The names below load on first use, so ``decoder2vec`` commands that do not evaluate stay quick to start.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "STSEvaluator": "sts",
    "STSPairs": "sts",
    "read_sts_tsv": "sts",
    "RetrievalData": "retrieval",
    "RetrievalEvaluator": "retrieval",
    "read_beir_folder": "retrieval",
    "ClassificationEvaluator": "classification",
    "LabelledTexts": "classification",
    "read_labelled_texts": "classification",
    "ClusteringEvaluator": "clustering",
    "LabelledPairs": "pairs",
    "PairClassificationEvaluator": "pairs",
    "read_pairs_tsv": "pairs",
    "ConllSentences": "word",
    "WordEvaluator": "word",
    "entity_scores": "word",
    "read_conll": "word",
    "TASKS": "tasks",
    "TaskSpec": "tasks",
    "build_evaluator": "tasks",
    "register_task": "tasks",
    "resolve_tasks": "tasks",
    "run_tasks": "report",
    "markdown_table": "report",
    "compare_table": "report",
    "write_report": "report",
    "read_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
