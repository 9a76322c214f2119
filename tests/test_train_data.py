import json

import pytest

from decoder2vec.train.data import ContrastiveRow, DataError, pack_documents, read_rows, read_texts


def test_text_lines_skip_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("First sentence.\n\n  Second one.  \n")
    assert read_texts(str(path)) == ["First sentence.", "Second one."]


WIKITEXT = """
 = Alpha =

 Alpha is a letter .
 = = History = =

 It came first .

 = Beta =

 Beta follows .
"""


def test_wikitext_documents_are_articles(tmp_path):
    path = tmp_path / "wiki.tokens"
    path.write_text(WIKITEXT)
    assert read_texts(str(path)) == ["Alpha is a letter . It came first .", "Beta follows ."]
    assert read_texts(str(path), documents=False) == ["Alpha is a letter .", "It came first .", "Beta follows ."]


def test_shared_wikitext_and_sentences(shared_data):
    articles = read_texts(f"{shared_data}/text/wikitext2_valid.tokens")
    assert 50 < len(articles) < 500 and all(not a.startswith(" =") for a in articles)
    assert len(read_texts(f"{shared_data}/text/wiki_sentences.txt", documents=False)) > 10_000


def test_jsonl_text_field_and_errors(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    assert read_texts(str(path), text_field="body") == ["one", "two"]
    with pytest.raises(DataError, match=r"a.jsonl:1: no field 'text' \(found: body\)"):
        read_texts(str(path))
    path.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: not valid JSON"):
        read_texts(str(path))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "not found"),
        ("empty.txt", "\n\n", "holds no text"),
        ("latin.txt", b"caf\xe9\n", "not UTF-8"),
    ],
)
def test_bad_text_files(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_texts(str(path))


def test_hf_source_without_datasets_is_clear(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match="pip install datasets"):
        read_texts("hf:wikitext:wikitext-2-raw-v1:train")


def test_pack_documents_cuts_long_and_joins_short():
    chunks = pack_documents([[1, 2, 3, 4, 5, 6, 7], [8, 9]], 4, separator=0)
    assert chunks == [[1, 2, 3, 4], [5, 6, 7, 0], [8, 9, 0]]
    assert pack_documents([[1, 2, 3, 4]], 4) == [[1, 2, 3, 4]]
    with pytest.raises(ValueError, match="max_seq_length"):
        pack_documents([[1]], 1)


@pytest.mark.parametrize(
    "text, rows",
    [
        ("query\tpositive\nq1\tp1\nq2\tp2\n", [ContrastiveRow("q1", "p1"), ContrastiveRow("q2", "p2")]),
        ("positive\tquery\tnegative\np1\tq1\tn1\n", [ContrastiveRow("q1", "p1", "n1")]),
        ("q1\tp1\tn1\nq2\tp2\tn2\n", [ContrastiveRow("q1", "p1", "n1"), ContrastiveRow("q2", "p2", "n2")]),
    ],
)
def test_tsv_rows(tmp_path, text, rows):
    path = tmp_path / "rows.tsv"
    path.write_text(text)
    assert read_rows(str(path)) == rows


def test_jsonl_rows_and_errors(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"q": "a", "positive": "b", "negative": ["c", "d"]}) + "\n")
    assert read_rows(str(path), query_field="q") == [ContrastiveRow("a", "b", "c")]
    with pytest.raises(DataError, match="no field 'query'"):
        read_rows(str(path))
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("q1\tp1\tn1\nq2\tp2\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: 2 column\(s\), expected 3"):
        read_rows(str(tsv))
    tsv.write_text("only one column\n")
    with pytest.raises(DataError, match="2-3 tab-separated columns"):
        read_rows(str(tsv))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"query": "a", "positive": "b", "negative": "c"}\n{"query": "a", "positive": "b"}\n')
    with pytest.raises(DataError, match="1 of 2 rows have a hard negative"):
        read_rows(str(mixed))
