"""Semantic textual similarity: Spearman and Pearson correlation (x100) of cosine similarity with gold scores.

Both sentences of a pair are treated alike (a symmetric task): an instruction, when given, goes before each.
Files are TSVs with a header that names ``sentence1``, ``sentence2`` and ``score`` columns
(STS-B and SICK-R as distributed in ``shared/data/sts``).

Example::

    from decoder2vec import Encoder
    from decoder2vec.eval.sts import STSEvaluator, read_sts_tsv

    pairs = read_sts_tsv("stsb_test.tsv")
    print(STSEvaluator(pairs)(Encoder.from_pretrained("smollm2-135m")))  # {'spearman': ..., 'pearson': ...}
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr

from .common import pair_cosine_scores, require_file

__all__ = ["STSEvaluator", "STSPairs", "read_sts_tsv"]


@dataclass
class STSPairs:
    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]


def read_sts_tsv(path: str | Path) -> STSPairs:
    """Read a TSV with a header naming ``sentence1``, ``sentence2`` and ``score``."""
    path = require_file(path, "STS file")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"sentence1", "sentence2", "score"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"{path} lacks the column(s) {', '.join(sorted(missing))}; "
                "an STS file needs a header with sentence1, sentence2 and score"
            )
        pairs = STSPairs([], [], [])
        for line, row in enumerate(reader, start=2):
            try:
                score = float(row["score"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line}: score {row['score']!r} is not a number") from None
            pairs.sentences1.append(row["sentence1"])
            pairs.sentences2.append(row["sentence2"])
            pairs.scores.append(score)
    if not pairs.scores:
        raise ValueError(f"{path} has no rows")
    return pairs


class STSEvaluator:
    """Embeds both sides of every pair, scores them by cosine similarity, correlates with gold scores.

    Inputs: :class:`STSPairs` (from :func:`read_sts_tsv`), and at call time anything with an ``encode`` method.
    Returns ``{"spearman": ..., "pearson": ...}`` (x100); the primary metric is ``spearman``.
    Each distinct sentence is embedded once; ``instruction`` goes before every sentence.

    Example::

        pairs = STSPairs(["A cat.", "A car."], ["A kitten.", "A tree."], [5.0, 0.5])
        STSEvaluator(pairs)(encoder)  # {'spearman': 100.0, 'pearson': 100.0} for a sensible encoder
    """

    primary_metric = "spearman"

    def __init__(
        self,
        pairs: STSPairs,
        *,
        batch_size: int = 32,
        instruction: str | None = None,
        show_progress: bool | None = None,
    ):
        if len(pairs.scores) < 2:
            raise ValueError(f"an STS evaluation needs at least 2 pairs to correlate, got {len(pairs.scores)}")
        self.pairs = pairs
        self.batch_size = batch_size
        self.instruction = instruction
        self.show_progress = show_progress

    def __call__(self, encoder) -> dict[str, float]:
        predicted = pair_cosine_scores(
            encoder,
            self.pairs.sentences1,
            self.pairs.sentences2,
            instruction=self.instruction,
            batch_size=self.batch_size,
            show_progress=self.show_progress,
        )
        gold = np.asarray(self.pairs.scores, dtype=np.float64)
        return {
            "spearman": float(spearmanr(predicted, gold).statistic) * 100,
            "pearson": float(pearsonr(predicted, gold).statistic) * 100,
        }
