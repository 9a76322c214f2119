"""Pair classification: average precision and best F1 of cosine similarity; the MRPC reader."""

import pytest

from decoder2vec.eval.pairs import LabelledPairs, PairClassificationEvaluator, read_pairs_tsv
from fake_encoder import FakeEncoder

# cosine(s, t_i) = 0.9, 0.8, 0.7, 0.1 with labels 1, 0, 1, 0
VECTORS = {"s": [1, 0], "t1": [0.9, 0.19**0.5], "t2": [0.8, 0.6], "t3": [0.7, 0.51**0.5], "t4": [0.1, 0.99**0.5]}


def test_average_precision_and_best_f1_match_hand_values():
    pairs = LabelledPairs(["s"] * 4, ["t1", "t2", "t3", "t4"], [1, 0, 1, 0])
    scores = PairClassificationEvaluator(pairs)(FakeEncoder(VECTORS))
    # AP = mean precision at each positive = (1/1 + 2/3) / 2
    assert scores["ap"] == pytest.approx((1 + 2 / 3) / 2 * 100, abs=1e-4)
    # threshold 0.7: P 2/3, R 1 -> F1 0.8 (threshold 0.9 gives P 1, R 1/2 -> 2/3)
    assert scores["f1"] == pytest.approx(80.0, abs=1e-4)
    assert scores["f1_threshold"] == pytest.approx(0.7, abs=1e-5)
    assert PairClassificationEvaluator.primary_metric == "ap"


def test_perfect_separation_scores_100():
    pairs = LabelledPairs(["s", "s"], ["t1", "t4"], [1, 0])
    assert PairClassificationEvaluator(pairs)(FakeEncoder(VECTORS))["ap"] == pytest.approx(100.0)


def test_mrpc_file_with_byte_order_mark_and_quotes(tmp_path):
    path = tmp_path / "mrpc.txt"
    rows = [
        "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
        '1\t1\t2\tHe said "yes" .\tHe agreed .',
        "0\t3\t4\tA b\tC d",
    ]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode() + b"\n")
    pairs = read_pairs_tsv(path)
    assert pairs == LabelledPairs(['He said "yes" .', "A b"], ["He agreed .", "C d"], [1, 0])
    path.write_text("a\tb\tc\nx\ty\t1\n")
    with pytest.raises(ValueError, match="#1 String, #2 String, Quality or sentence1, sentence2, label"):
        read_pairs_tsv(path)
    path.write_text("sentence1\tsentence2\tlabel\nx\ty\tyes\n")
    with pytest.raises(ValueError, match="not 0 or 1"):
        read_pairs_tsv(path)
