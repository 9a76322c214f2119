"""STS evaluator: Spearman/Pearson x100 of cosine similarity, checked against hand-computed values."""

import pytest

from decoder2vec.eval.sts import STSEvaluator, STSPairs, read_sts_tsv
from fake_encoder import FakeEncoder

# cosine(a_i, b_i) = 1.0, 0.8, 0.6, 0.0; gold 5, 3, 4, 1
VECTORS = {
    "a1": [1, 0], "a2": [1, 0], "a3": [1, 0], "a4": [1, 0],
    "b1": [2, 0], "b2": [0.8, 0.6], "b3": [0.6, 0.8], "b4": [0, 3],
}  # fmt: skip
PAIRS = STSPairs(["a1", "a2", "a3", "a4"], ["b1", "b2", "b3", "b4"], [5.0, 3.0, 4.0, 1.0])


def test_scores_match_hand_computed_correlations():
    scores = STSEvaluator(PAIRS)(FakeEncoder(VECTORS))
    # ranks 4,3,2,1 vs 4,2,3,1: sum d^2 = 2, rho = 1 - 6*2 / (4*15) = 0.8
    assert scores["spearman"] == pytest.approx(80.0)
    # r = 2.0 / sqrt(0.56 * 8.75) (deviations of x from 0.6 and of y from 3.25)
    assert scores["pearson"] == pytest.approx(200 / (0.56 * 8.75) ** 0.5, abs=1e-4)
    assert STSEvaluator.primary_metric == "spearman"


def test_perfect_agreement_is_100_and_each_sentence_is_embedded_once_with_the_instruction():
    pairs = STSPairs(["a1", "a1", "a1"], ["b1", "b2", "b4"], [5.0, 4.0, 0.0])
    encoder = FakeEncoder(VECTORS)
    scores = STSEvaluator(pairs, instruction="Find similar text")(encoder)
    assert scores["spearman"] == pytest.approx(100.0)
    [(texts, instruction)] = encoder.calls
    assert sorted(texts) == ["a1", "b1", "b2", "b4"]
    assert instruction == "Find similar text"


def test_read_sts_tsv_and_its_errors(tmp_path):
    path = tmp_path / "sts.tsv"
    path.write_text('sentence1\tsentence2\tscore\n"Quoted" one\tother\t4.5\nx\ty\t0\n', encoding="utf-8")
    pairs = read_sts_tsv(path)
    assert pairs.sentences1 == ['"Quoted" one', "x"] and pairs.scores == [4.5, 0.0]
    path.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="sentence1, sentence2 and score"):
        read_sts_tsv(path)
    path.write_text("sentence1\tsentence2\tscore\nx\ty\thigh\n")
    with pytest.raises(ValueError, match="not a number"):
        read_sts_tsv(path)
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        read_sts_tsv(tmp_path / "missing.tsv")
    with pytest.raises(ValueError, match="at least 2 pairs"):
        STSEvaluator(STSPairs(["a"], ["b"], [1.0]))
