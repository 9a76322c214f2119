"""Classification evaluator (logistic regression on embeddings) and the tsv / SentEval-TREC readers."""

import numpy as np
import pytest

from decoder2vec.eval.classification import ClassificationEvaluator, LabelledTexts, read_labelled_texts
from fake_encoder import FakeEncoder

TRAIN = LabelledTexts(["p1", "p2", "p3", "n1", "n2", "n3"], ["pos", "pos", "pos", "neg", "neg", "neg"])
VECTORS = {
    "p1": [1, 0], "p2": [0.9, 0.2], "p3": [1.1, -0.2], "n1": [-1, 0], "n2": [-0.9, 0.2], "n3": [-1.1, -0.2],
    "t_pos": [0.8, 0], "t_pos_wrong": [-0.8, 0.1], "t_neg1": [-0.7, 0], "t_neg2": [-1, 0.3],
}  # fmt: skip


def test_separable_data_scores_100():
    test = LabelledTexts(["t_pos", "t_neg1"], ["pos", "neg"])
    scores = ClassificationEvaluator(TRAIN, test, instruction="Classify")(FakeEncoder(VECTORS))
    assert scores == pytest.approx({"accuracy": 100.0, "f1_macro": 100.0})
    assert ClassificationEvaluator.primary_metric == "accuracy"


def test_one_mistake_matches_hand_computed_accuracy_and_macro_f1():
    test = LabelledTexts(["t_pos", "t_pos_wrong", "t_neg1", "t_neg2"], ["pos", "pos", "neg", "neg"])
    scores = ClassificationEvaluator(TRAIN, test)(FakeEncoder(VECTORS))
    # predicted pos, neg, neg, neg: accuracy 3/4; F1(pos) = 2/3 (P 1, R 1/2), F1(neg) = 4/5 (P 2/3, R 1)
    assert scores["accuracy"] == pytest.approx(75.0)
    assert scores["f1_macro"] == pytest.approx((2 / 3 + 4 / 5) / 2 * 100)


def test_examples_per_class_draws_seeded_balanced_subsets():
    evaluator = ClassificationEvaluator(TRAIN, TRAIN, examples_per_class=2, experiments=5, seed=7)
    subsets = evaluator.training_subsets()
    assert len(subsets) == 5
    for subset in subsets:
        labels = [TRAIN.labels[i] for i in subset]
        assert labels.count("pos") == 2 and labels.count("neg") == 2
    again = ClassificationEvaluator(TRAIN, TRAIN, examples_per_class=2, experiments=5, seed=7).training_subsets()
    assert all(np.array_equal(a, b) for a, b in zip(subsets, again, strict=True))
    assert len({tuple(s) for s in subsets}) > 1  # each experiment draws afresh
    assert len(ClassificationEvaluator(TRAIN, TRAIN).training_subsets()) == 1  # all the data: one run


def test_trec_latin1_and_tsv_readers(tmp_path):
    trec = tmp_path / "trec.label"
    trec.write_bytes("DESC:def What is a caf\xe9 ?\nHUM:ind Who wrote \xabDon Quixote\xbb ?\n".encode("latin-1"))
    data = read_labelled_texts(trec, encoding="latin-1")
    assert data.texts == ["What is a café ?", "Who wrote «Don Quixote» ?"]
    assert data.labels == ["DESC", "HUM"]
    assert read_labelled_texts(trec, encoding="latin-1", fine_labels=True).labels == ["DESC:def", "HUM:ind"]
    with pytest.raises(ValueError, match="latin-1"):
        read_labelled_texts(trec)  # not UTF-8: the message names the fix

    tsv = tmp_path / "news.tsv"
    tsv.write_text("text\tlabel\nStocks fell\tmoney\nA goal in extra time\tsport\n", encoding="utf-8")
    assert read_labelled_texts(tsv) == LabelledTexts(["Stocks fell", "A goal in extra time"], ["money", "sport"])
    with pytest.raises(ValueError, match="COARSE:fine"):
        read_labelled_texts(tsv, format="trec")
    with pytest.raises(ValueError, match="never occur in the training data"):
        ClassificationEvaluator(TRAIN, LabelledTexts(["x"], ["other"]))
