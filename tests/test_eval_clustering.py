"""Clustering evaluator: k-means with k = number of labels, V-measure x100."""

import pytest

from decoder2vec.eval.classification import LabelledTexts
from decoder2vec.eval.clustering import ClusteringEvaluator
from fake_encoder import FakeEncoder


def test_separated_groups_score_100_and_mixed_groups_score_0():
    data = LabelledTexts(["cat", "kitten", "stocks", "bonds"], ["pet", "pet", "money", "money"])
    apart = {"cat": [1, 0], "kitten": [0.9, 0.1], "stocks": [0, 1], "bonds": [0.1, 0.9]}
    encoder = FakeEncoder(apart)
    assert ClusteringEvaluator(data, instruction="Identify the topic")(encoder) == pytest.approx({"v_measure": 100.0})
    assert encoder.instruction_of("cat") == "Identify the topic"
    # every natural cluster holds one pet and one money text: the clusters say nothing about the labels
    mixed = {"cat": [1, 0], "stocks": [1, 0.01], "kitten": [0, 1], "bonds": [0.01, 1]}
    assert ClusteringEvaluator(data)(FakeEncoder(mixed))["v_measure"] == pytest.approx(0.0, abs=1e-9)
    assert ClusteringEvaluator.primary_metric == "v_measure"


def test_one_label_is_refused():
    with pytest.raises(ValueError, match="at least 2 labels"):
        ClusteringEvaluator(LabelledTexts(["a", "b"], ["x", "x"]))
