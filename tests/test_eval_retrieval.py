"""Retrieval evaluator on a BEIR folder: nDCG@10, MRR@10, Recall@100 against hand-computed values."""

import json
import math

import pytest

from decoder2vec.eval.retrieval import RetrievalData, RetrievalEvaluator, read_beir_folder
from fake_encoder import FakeEncoder


def write_beir(folder, corpus, queries, qrels):
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(row) + "\n" for row in queries))
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in qrels]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def beir(tmp_path):
    corpus = [
        {"_id": "d1", "title": "Paris", "text": "capital of France"},
        {"_id": "d2", "title": "", "text": "cats purr"},
        {"_id": "d3", "text": "dogs bark"},
        {"_id": "d4", "title": "Pets", "text": "animals at home"},
    ]
    queries = [
        {"_id": "q1", "text": "where is Paris"},
        {"_id": "q2", "text": "what do cats do"},
        {"_id": "q3", "text": "x"},
    ]
    write_beir(tmp_path, corpus, queries, [("q1", "d1", 1), ("q2", "d2", 1)])  # q3 has no judgement
    return tmp_path


VECTORS = {
    "Paris capital of France": [1, 0, 0],
    "cats purr": [0, 1, 0],
    "dogs bark": [0, 0, 1],
    "Pets animals at home": [0, 0.6, 0.8],
    "where is Paris": [1, 0, 0],  # d1 first: a perfect ranking
    "what do cats do": [0, 0.8, 0.6],  # cosines d4 0.96, d2 0.8, d3 0.6: the relevant d2 is second
}


def test_read_beir_folder_joins_title_and_text(beir):
    data = read_beir_folder(beir)
    assert data.corpus == {
        "d1": "Paris capital of France",
        "d2": "cats purr",
        "d3": "dogs bark",
        "d4": "Pets animals at home",
    }
    assert data.qrels == {"q1": {"d1": 1}, "q2": {"d2": 1}}


def test_perfect_ranking_and_second_place_match_hand_values(beir):
    encoder = FakeEncoder(VECTORS)
    scores = RetrievalEvaluator(read_beir_folder(beir), query_instruction="Find the answer")(encoder)
    # q1 perfect: 1; q2 relevant at rank 2: nDCG = (1/log2(3)) / 1, reciprocal rank 1/2
    assert scores["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 2 * 100)
    assert scores["mrr@10"] == pytest.approx(75.0)
    assert scores["recall@100"] == pytest.approx(100.0)
    # the instruction goes before queries only, and unjudged queries are not embedded
    assert encoder.instruction_of("where is Paris") == "Find the answer"
    assert encoder.instruction_of("cats purr") is None
    assert all("x" not in texts for texts, _ in encoder.calls)


def test_perfect_ranking_scores_100():
    data = RetrievalData({"a": "A", "b": "B"}, {"q": "Q"}, {"q": {"a": 1}})
    scores = RetrievalEvaluator(data)(FakeEncoder({"A": [1, 0], "B": [0, 1], "Q": [1, 0.1]}))
    assert scores == pytest.approx({"ndcg@10": 100.0, "mrr@10": 100.0, "recall@100": 100.0})


def test_graded_relevance_and_a_hit_below_rank_10():
    vectors = {"Q": [1, 0]} | {f"D{k}": [1, k / 100] for k in range(11)} | {"far": [0, 1]}
    corpus = {f"d{k}": f"D{k}" for k in range(11)} | {"far": "far"}
    # graded: d0 (gain 1) ranks first, d1 (gain 2) second: DCG = 1 + 2/log2(3), ideal = 2 + 1/log2(3)
    graded = RetrievalData(corpus, {"q": "Q"}, {"q": {"d0": 1, "d1": 2}})
    expected = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)) * 100
    assert RetrievalEvaluator(graded)(FakeEncoder(vectors))["ndcg@10"] == pytest.approx(expected)
    # the only relevant document ranks 12th: nothing in the top 10, but found in the top 100
    late = RetrievalData(corpus, {"q": "Q"}, {"q": {"far": 1}})
    assert RetrievalEvaluator(late)(FakeEncoder(vectors)) == pytest.approx(
        {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@100": 100.0}
    )


def test_bad_beir_folders_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus.jsonl"):
        read_beir_folder(tmp_path / "nothing")
    write_beir(tmp_path, [{"_id": "d1", "text": "a"}, {"_id": "d2", "text": "b"}], [{"_id": "q", "text": "q"}],
               [("q", "d9", 1)])  # fmt: skip
    with pytest.raises(ValueError, match="'d9' is not in corpus.jsonl"):
        read_beir_folder(tmp_path)
    (tmp_path / "corpus.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="JSON Lines"):
        read_beir_folder(tmp_path)
