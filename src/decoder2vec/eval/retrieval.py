"""Retrieval on a BEIR-layout folder: nDCG@10 (main), MRR@10 and Recall@100 of exact cosine search.

A BEIR folder holds ``corpus.jsonl`` (one ``{"_id", "title", "text"}`` object a line), ``queries.jsonl``
(``{"_id", "text"}``) and ``qrels/<split>.tsv`` (header, then ``query-id<TAB>corpus-id<TAB>score``).
Only queries that have judgements are scored; a judgement with score > 0 counts as relevant and the
score is the graded gain of nDCG (linear gain, as pytrec_eval and MTEB use).

Example::

    from decoder2vec.eval.retrieval import RetrievalEvaluator, read_beir_folder

    data = read_beir_folder("scifact")
    evaluator = RetrievalEvaluator(data, query_instruction="Given a claim, find documents that support it")
    print(evaluator(encoder))  # {'ndcg@10': ..., 'mrr@10': ..., 'recall@100': ...}
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import ndcg_score

from .common import cosine_matrix, embed, read_text

__all__ = ["RetrievalData", "RetrievalEvaluator", "read_beir_folder"]


@dataclass
class RetrievalData:
    corpus: dict[str, str]  # document id -> "title text" (title first when there is one)
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)  # query id -> {document id: relevance}


def _read_jsonl(path: Path, what: str) -> list[dict]:
    rows = []
    for line_number, line in enumerate(read_text(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{line_number}: not a JSON object ({error.msg}); {what} is JSON Lines") from None
        if not isinstance(row, dict) or "_id" not in row or "text" not in row:
            raise ValueError(f'{path}:{line_number}: each line of {what} needs "_id" and "text" keys')
        rows.append(row)
    return rows


def read_beir_folder(folder: str | Path, split: str = "test") -> RetrievalData:
    """Read ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv`` from a BEIR folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"retrieval folder {str(folder)!r} not found; it needs corpus.jsonl, queries.jsonl, qrels/"
        )
    corpus = {}
    for row in _read_jsonl(folder / "corpus.jsonl", "the corpus file"):
        title = (row.get("title") or "").strip()
        corpus[str(row["_id"])] = f"{title} {row['text']}" if title else row["text"]
    queries = {str(row["_id"]): row["text"] for row in _read_jsonl(folder / "queries.jsonl", "the queries file")}

    qrels_path = folder / "qrels" / f"{split}.tsv"
    qrels: dict[str, dict[str, int]] = {}
    reader = csv.reader(read_text(qrels_path, "the qrels file").splitlines(), delimiter="\t")
    for line_number, row in enumerate(reader, start=1):
        if line_number == 1 and row and not row[-1].strip().lstrip("-").isdigit():
            continue  # header: query-id, corpus-id, score
        if not row:
            continue
        if len(row) != 3 or not row[2].strip().lstrip("-").isdigit():
            raise ValueError(f"{qrels_path}:{line_number}: expected query-id<TAB>corpus-id<TAB>integer score")
        query_id, document_id, score = row[0], row[1], int(row[2])
        if query_id not in queries:
            raise ValueError(f"{qrels_path}:{line_number}: query id {query_id!r} is not in queries.jsonl")
        if document_id not in corpus:
            raise ValueError(f"{qrels_path}:{line_number}: document id {document_id!r} is not in corpus.jsonl")
        qrels.setdefault(query_id, {})[document_id] = score
    if not qrels:
        raise ValueError(f"{qrels_path} judges no query; a retrieval task needs at least one relevant document")
    return RetrievalData(corpus, queries, qrels)


class RetrievalEvaluator:
    """Embeds the corpus and the judged queries, ranks the whole corpus per query by cosine similarity.

    Inputs: :class:`RetrievalData` (from :func:`read_beir_folder`); ``query_instruction`` goes before every
    query and never before a document. The corpus is embedded in batches of ``batch_size`` with a progress bar.
    Returns ``{"ndcg@10", "mrr@10", "recall@100"}`` (x100, averaged over judged queries); the primary metric is
    ``ndcg@10`` (scikit-learn's ``ndcg_score`` on the exact similarities).

    Example::

        data = RetrievalData({"d1": "Paris is in France.", "d2": "Cats purr."}, {"q1": "Where is Paris?"},
                             {"q1": {"d1": 1}})
        RetrievalEvaluator(data)(encoder)  # {'ndcg@10': 100.0, 'mrr@10': 100.0, 'recall@100': 100.0} if d1 ranks first
    """

    primary_metric = "ndcg@10"

    def __init__(
        self,
        data: RetrievalData,
        *,
        query_instruction: str | None = None,
        batch_size: int = 32,
        show_progress: bool | None = True,
        query_chunk: int = 256,
    ):
        if len(data.corpus) < 2:
            raise ValueError(f"a retrieval corpus needs at least 2 documents to rank, got {len(data.corpus)}")
        self.data = data
        self.query_instruction = query_instruction
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.query_chunk = query_chunk

    def __call__(self, encoder) -> dict[str, float]:
        document_ids = list(self.data.corpus)
        position = {document_id: i for i, document_id in enumerate(document_ids)}
        query_ids = [q for q in self.data.queries if q in self.data.qrels]
        documents = embed(
            encoder,
            [self.data.corpus[d] for d in document_ids],
            batch_size=self.batch_size,
            show_progress=self.show_progress,
        )  # (n_documents, dim)
        queries = embed(
            encoder,
            [self.data.queries[q] for q in query_ids],
            instruction=self.query_instruction,
            batch_size=self.batch_size,
        )  # (n_queries, dim)

        ndcg_sum, reciprocal_ranks, recalls = 0.0, [], []
        for start in range(0, len(query_ids), self.query_chunk):
            chunk = query_ids[start : start + self.query_chunk]
            scores = cosine_matrix(queries[start : start + len(chunk)], documents)  # (chunk, n_documents)
            gains = np.zeros_like(scores)
            for row, query_id in enumerate(chunk):
                for document_id, relevance in self.data.qrels[query_id].items():
                    gains[row, position[document_id]] = max(relevance, 0)
            ndcg_sum += ndcg_score(gains, scores, k=10) * len(chunk)  # sklearn averages over the chunk's queries
            top = np.argsort(-scores, axis=1, kind="stable")[:, :100]  # (chunk, <=100)
            hits = np.take_along_axis(gains, top, axis=1) > 0
            relevant = (gains > 0).sum(axis=1)
            first = np.where(hits[:, :10].any(axis=1), hits[:, :10].argmax(axis=1) + 1, np.inf)
            reciprocal_ranks.extend(1.0 / first)
            recalls.extend(np.where(relevant > 0, hits.sum(axis=1) / np.maximum(relevant, 1), 0.0))
        return {
            "ndcg@10": ndcg_sum / len(query_ids) * 100,
            "mrr@10": float(np.mean(reciprocal_ranks)) * 100,
            "recall@100": float(np.mean(recalls)) * 100,
        }
