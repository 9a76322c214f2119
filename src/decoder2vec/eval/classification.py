"""Classification: logistic regression on frozen embeddings, scored by accuracy and macro-F1 (x100).

The MTEB protocol: embed the training and test texts once, fit scikit-learn's ``LogisticRegression`` on
the training vectors with a fixed seed, predict the test labels. With ``examples_per_class`` the training
set is cut to that many examples of each label, drawn afresh (seeded) for each of ``experiments`` runs,
and the scores are averaged over the runs.

Files (read by :func:`read_labelled_texts`):

- ``tsv``: ``text<TAB>label`` a line (an optional ``text<TAB>label`` header is skipped);
- ``trec``: the SentEval/TREC line ``COARSE:fine question`` (``DESC:manner How did ...?``), label ``COARSE``
  (or ``COARSE:fine`` with ``fine_labels=True``). SentEval's TREC files are Latin-1: pass ``encoding="latin-1"``.

Example::

    from decoder2vec.eval.classification import ClassificationEvaluator, read_labelled_texts

    train = read_labelled_texts("trec_train.label", encoding="latin-1")
    test = read_labelled_texts("trec_test.label", encoding="latin-1")
    print(ClassificationEvaluator(train, test)(encoder))  # {'accuracy': ..., 'f1_macro': ...}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from .common import embed, read_text

__all__ = ["LABEL_FORMATS", "ClassificationEvaluator", "LabelledTexts", "read_labelled_texts"]

LABEL_FORMATS = ("auto", "tsv", "trec")
_TREC_LINE = re.compile(r"^([A-Za-z_]+):(\S+)\s+(.+)$")


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def read_labelled_texts(
    path: str | Path, *, format: str = "auto", encoding: str = "utf-8", fine_labels: bool = False
) -> LabelledTexts:
    """Texts and their labels from a ``tsv`` or ``trec`` file (``auto``: tsv when every line has a tab)."""
    if format not in LABEL_FORMATS:
        raise ValueError(f"unknown label file format {format!r}; choose one of: {', '.join(LABEL_FORMATS)}")
    lines = [line for line in read_text(path, "labelled text file", encoding).splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} has no lines; a labelled file needs one example a line")
    if format == "auto":
        format = "tsv" if all("\t" in line for line in lines) else "trec"
    data = LabelledTexts([], [])
    for line_number, line in enumerate(lines, start=1):
        if format == "tsv":
            text, tab, label = line.rpartition("\t")
            if not tab:
                raise ValueError(f"{path}:{line_number}: no tab; a tsv label file has text<TAB>label a line")
            if line_number == 1 and text.strip().lower() in ("text", "sentence") and label.strip().lower() == "label":
                continue
        else:
            match = _TREC_LINE.match(line)
            if not match:
                raise ValueError(
                    f"{path}:{line_number}: {line[:60]!r} is not 'COARSE:fine text' (the SentEval/TREC format); "
                    "for text<TAB>label files use format='tsv'"
                )
            coarse, fine, text = match.groups()
            label = f"{coarse}:{fine}" if fine_labels else coarse
        data.texts.append(text.strip())
        data.labels.append(label.strip())
    return data


class ClassificationEvaluator:
    """Fits a seeded logistic regression on embeddings of ``train`` and scores its predictions on ``test``.

    Inputs: two :class:`LabelledTexts`; ``instruction`` goes before every text (train and test alike);
    ``examples_per_class`` (None: all) limits the training examples of each label, ``experiments`` runs are
    averaged when it does. Returns ``{"accuracy", "f1_macro"}`` (x100); the primary metric is ``accuracy``.

    Example::

        train = LabelledTexts(["great film", "awful film", "loved it", "hated it"], ["pos", "neg", "pos", "neg"])
        test = LabelledTexts(["really great", "really awful"], ["pos", "neg"])
        ClassificationEvaluator(train, test)(encoder)  # {'accuracy': 100.0, 'f1_macro': 100.0} when it separates them
    """

    primary_metric = "accuracy"

    def __init__(
        self,
        train: LabelledTexts,
        test: LabelledTexts,
        *,
        instruction: str | None = None,
        examples_per_class: int | None = None,
        experiments: int = 10,
        seed: int = 42,
        max_iter: int = 1000,
        batch_size: int = 32,
        show_progress: bool | None = None,
    ):
        if len(set(train.labels)) < 2:
            raise ValueError(f"classification needs at least 2 labels in the training data, got {set(train.labels)}")
        unknown = sorted(set(test.labels) - set(train.labels))
        if unknown:
            raise ValueError(f"test labels {unknown} never occur in the training data; check the train/test files")
        if examples_per_class is not None and examples_per_class < 1:
            raise ValueError(f"examples_per_class must be >= 1 or None (all), not {examples_per_class}")
        self.train = train
        self.test = test
        self.instruction = instruction
        self.examples_per_class = examples_per_class
        self.experiments = experiments if examples_per_class is not None else 1
        self.seed = seed
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.show_progress = show_progress

    def training_subsets(self) -> list[np.ndarray]:
        """Indices of the training examples each experiment uses (all of them without ``examples_per_class``)."""
        labels = np.asarray(self.train.labels)
        if self.examples_per_class is None:
            return [np.arange(len(labels))]
        rng = np.random.default_rng(self.seed)
        subsets = []
        for _ in range(self.experiments):
            order = rng.permutation(len(labels))
            chosen = np.concatenate(
                [order[labels[order] == label][: self.examples_per_class] for label in np.unique(labels)]
            )
            subsets.append(np.sort(chosen))
        return subsets

    def __call__(self, encoder) -> dict[str, float]:
        texts = list(dict.fromkeys(self.train.texts + self.test.texts))
        index = {text: i for i, text in enumerate(texts)}
        vectors = embed(
            encoder, texts, instruction=self.instruction, batch_size=self.batch_size, show_progress=self.show_progress
        )
        train_vectors = vectors[[index[t] for t in self.train.texts]]  # (n_train, dim)
        test_vectors = vectors[[index[t] for t in self.test.texts]]  # (n_test, dim)
        train_labels = np.asarray(self.train.labels)
        accuracies, f1s = [], []
        for subset in self.training_subsets():
            classifier = LogisticRegression(max_iter=self.max_iter, random_state=self.seed)
            classifier.fit(train_vectors[subset], train_labels[subset])
            predicted = classifier.predict(test_vectors)
            accuracies.append(accuracy_score(self.test.labels, predicted))
            f1s.append(f1_score(self.test.labels, predicted, average="macro"))
        return {"accuracy": float(np.mean(accuracies)) * 100, "f1_macro": float(np.mean(f1s)) * 100}
