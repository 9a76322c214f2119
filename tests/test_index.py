"""decoder2vec index / search: FAISS over the shards of `embed`, checked against exact numpy search."""

import csv
import json
import os

import numpy as np
import pytest

from decoder2vec import Encoder
from decoder2vec.cli import main
from decoder2vec.embed import embed_corpus, read_embeddings
from decoder2vec.index import SearchIndexError, build_index, load_index, search
from decoder2vec.vectors import hamming_distance

faiss = pytest.importorskip("faiss", reason="FAISS is an optional extra: pip install 'decoder2vec[faiss]'")

INSTRUCTION = "Retrieve a sentence that means the same"


@pytest.fixture(scope="module")
def sentences(shared_data):
    seen, out = set(), []
    with open(os.path.join(shared_data, "sts", "stsb_test.tsv"), encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            for text in (row["sentence1"], row["sentence2"]):
                if text.strip() and text not in seen:
                    seen.add(text)
                    out.append(text)
    return out[:600]


@pytest.fixture
def encoder(tiny_llama_dir):
    return Encoder.from_pretrained(tiny_llama_dir, max_length=64)


def _embed(encoder, sentences, tmp_path, name, **options):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
    embed_corpus(path, tmp_path / name, encoder=encoder, shard_size=150, progress=False, **options)
    table = read_embeddings(tmp_path / name)
    return tmp_path / name, table.column("id").to_pylist(), np.stack(table.column("embedding").to_numpy(False))


def _check_top10(found_ids, found_scores, exact_scores, ids) -> bool:
    """FAISS's top 10 against exact search; ids compared exactly unless two of the top 11 scores tie within 1e-5."""
    top = np.argsort(-exact_scores, kind="stable")[:11]
    np.testing.assert_allclose(found_scores, exact_scores[top[:10]], atol=1e-5)
    np.testing.assert_allclose([exact_scores[ids.index(i)] for i in found_ids], found_scores, atol=1e-5)
    if np.min(-np.diff(exact_scores[top])) <= 1e-5:
        return False
    assert list(found_ids) == [ids[i] for i in top[:10]]
    return True


def test_flat_index_top10_equals_exact_numpy_search(encoder, sentences, tmp_path):
    out, ids, corpus = _embed(encoder, sentences, tmp_path, "float", normalize=True)
    settings = build_index(out, query_instruction=INSTRUCTION)
    assert settings["kind"] == "flat" and settings["rows"] == len(sentences)
    queries = sentences[::30]  # 20 queries
    results = search(out, queries, k=10, encoder=encoder)
    vectors = encoder.encode(queries, instruction=INSTRUCTION, normalize=True)
    exact = vectors @ corpus.T  # (queries, corpus) cosine
    compared = 0
    for hits, scores in zip(results, exact, strict=True):
        compared += _check_top10([h["id"] for h in hits], [h["score"] for h in hits], scores, ids)
        assert all(h["text"] == sentences[h["id"]] for h in hits)
    assert compared >= 10  # most queries have no near-tie in their top 11


def test_ivf_visiting_every_cell_is_exact_and_hnsw_recall(encoder, sentences, tmp_path):
    out, ids, corpus = _embed(encoder, sentences, tmp_path, "float", normalize=True)
    queries = encoder.encode(sentences[:40], normalize=True)
    exact_scores = queries @ corpus.T
    exact = np.argsort(-exact_scores, axis=1)[:, :10]
    from decoder2vec.index import search_vectors

    build_index(out, kind="ivf", nlist=8, nprobe=8)
    index, settings = load_index(out)
    assert isinstance(index, faiss.IndexIVFFlat) and index.nprobe == 8
    scores, positions = search_vectors(index, settings, queries, 10)
    compared = sum(
        _check_top10([ids[p] for p in found], s, e, ids)
        for found, s, e in zip(positions, scores, exact_scores, strict=True)
    )
    assert compared >= 20
    build_index(out, kind="hnsw", hnsw_m=16, ef_search=64)
    index, settings = load_index(out)
    found = search_vectors(index, settings, queries, 10)[1]
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
    assert recall >= 0.9


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary"])
def test_quantized_vectors_get_the_matching_index_with_exact_scores(precision, encoder, sentences, tmp_path):
    out, ids, corpus = _embed(encoder, sentences[:300], tmp_path, precision, normalize=True, precision=precision)
    build_index(out)
    index, settings = load_index(out)
    expected_type = faiss.IndexBinaryFlat if precision == "binary" else faiss.IndexScalarQuantizer
    assert isinstance(index, expected_type)
    queries = sentences[:300:25]
    results = search(out, queries, k=10, encoder=encoder, instruction="")
    vectors = encoder.encode(queries, normalize=True, precision=precision)
    if precision == "binary":
        exact = corpus.shape[1] * 8 - 2 * hamming_distance(vectors, corpus).astype(np.int64)
    else:
        shift = 128 if precision == "uint8" else 0
        exact = (vectors.astype(np.int64) - shift) @ (corpus.astype(np.int64) - shift).T
    for hits, scores in zip(results, exact, strict=True):
        best = np.sort(scores)[::-1][:10]
        assert [h["score"] for h in hits] == best.tolist()  # integer scores: ties are possible, scores are exact
        assert all(scores[ids.index(h["id"])] == h["score"] for h in hits)


def test_cli_index_and_search(tiny_llama_dir, sentences, tmp_path, capsys):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(s + "\n" for s in sentences[:120]), encoding="utf-8")
    out = tmp_path / "out"
    common = ["--model", str(tiny_llama_dir), "--max-length", "64"]
    assert main(["embed", str(path), "-o", str(out), "--normalize", *common]) == 0
    with pytest.raises(SearchIndexError, match="has no index"):
        load_index(out)
    assert main(["index", str(out), "--query-instruction", INSTRUCTION]) == 0
    capsys.readouterr()
    assert main(["search", str(out), sentences[5], "-k", "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer[0]["query"] == sentences[5] and len(answer[0]["hits"]) == 3
    assert {"id", "score", "text"} <= set(answer[0]["hits"][0])
    assert main(["search", str(out), sentences[5], "-k", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"query: {sentences[5]}" and len(printed) == 3
    # new shards (embedded again with other settings): --overwrite removed the index; an old copy is refused
    import shutil

    shutil.copytree(out / "index", tmp_path / "old-index")
    assert main(["embed", str(path), "-o", str(out), "--overwrite", "--precision", "int8", *common]) == 0
    assert not (out / "index").exists()
    shutil.copytree(tmp_path / "old-index", out / "index")
    with pytest.raises(SearchIndexError, match="built from other shards"):
        load_index(out)
