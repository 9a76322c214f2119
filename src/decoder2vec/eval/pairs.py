"""Pair classification: is each pair a paraphrase (label 1) or not (0)? Scored from cosine similarity.

Average precision of the cosine scores against the labels (the MTEB main metric) and the best F1 over
all thresholds, both x100, with the threshold that reaches that F1.

Files (read by :func:`read_pairs_tsv`): a TSV with a header, either MRPC's
``Quality, #1 ID, #2 ID, #1 String, #2 String`` (UTF-8 with a byte-order mark, as Microsoft ships it)
or ``sentence1, sentence2, label``; labels are 0 or 1.

Example::

    from decoder2vec.eval.pairs import PairClassificationEvaluator, read_pairs_tsv

    pairs = read_pairs_tsv("mrpc_test.txt")
    print(PairClassificationEvaluator(pairs)(encoder))  # {'ap': ..., 'f1': ..., 'f1_threshold': ...}
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve

from .common import pair_cosine_scores, read_text

__all__ = ["LabelledPairs", "PairClassificationEvaluator", "read_pairs_tsv"]

# (first text, second text, label) column names each known header uses
_HEADERS = [("#1 String", "#2 String", "Quality"), ("sentence1", "sentence2", "label")]


@dataclass
class LabelledPairs:
    sentences1: list[str]
    sentences2: list[str]
    labels: list[int]


def read_pairs_tsv(path: str | Path, *, encoding: str = "utf-8") -> LabelledPairs:
    """Read an MRPC-style (``#1 String, #2 String, Quality``) or ``sentence1, sentence2, label`` TSV."""
    reader = csv.DictReader(
        read_text(path, "pair file", encoding).splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE
    )
    columns = set(reader.fieldnames or [])
    names = next((names for names in _HEADERS if set(names) <= columns), None)
    if names is None:
        known = " or ".join(", ".join(names) for names in _HEADERS)
        raise ValueError(f"{path} has columns {sorted(columns)}; a pair file needs a header with {known}")
    first, second, label = names
    pairs = LabelledPairs([], [], [])
    for line_number, row in enumerate(reader, start=2):
        if row[label] not in ("0", "1"):
            raise ValueError(f"{path}:{line_number}: label {row[label]!r} is not 0 or 1")
        pairs.sentences1.append(row[first])
        pairs.sentences2.append(row[second])
        pairs.labels.append(int(row[label]))
    if len(set(pairs.labels)) < 2:
        raise ValueError(f"{path} needs both positive (1) and negative (0) pairs, has labels {set(pairs.labels)}")
    return pairs


class PairClassificationEvaluator:
    """Embeds both sides of every pair and ranks the pairs by cosine similarity.

    Inputs: :class:`LabelledPairs`; ``instruction`` goes before every sentence (the task is symmetric).
    Returns ``{"ap", "f1", "f1_threshold"}``: scikit-learn's average precision and the best F1 over the
    precision-recall curve (both x100), and the cosine threshold reaching that F1 (a pair scoring at or above
    it is predicted positive). The primary metric is ``ap``.

    Example::

        pairs = LabelledPairs(["A cat.", "A car."], ["A kitten.", "A tree."], [1, 0])
        PairClassificationEvaluator(pairs)(encoder)  # {'ap': 100.0, 'f1': 100.0, ...} when the paraphrase scores higher
    """

    primary_metric = "ap"

    def __init__(
        self,
        pairs: LabelledPairs,
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        show_progress: bool | None = None,
    ):
        if len(set(pairs.labels)) < 2:
            raise ValueError("pair classification needs both positive (1) and negative (0) pairs")
        self.pairs = pairs
        self.instruction = instruction
        self.batch_size = batch_size
        self.show_progress = show_progress

    def __call__(self, encoder) -> dict[str, float]:
        scores = pair_cosine_scores(
            encoder,
            self.pairs.sentences1,
            self.pairs.sentences2,
            instruction=self.instruction,
            batch_size=self.batch_size,
            show_progress=self.show_progress,
        )
        labels = np.asarray(self.pairs.labels)
        precision, recall, thresholds = precision_recall_curve(labels, scores)
        f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
        best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
        return {
            "ap": float(average_precision_score(labels, scores)) * 100,
            "f1": float(f1[best]) * 100,
            "f1_threshold": float(thresholds[best]),
        }
