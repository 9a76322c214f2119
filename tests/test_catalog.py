"""The data catalog: every branch of resolution (explicit path, data folder, cache, hub, none) and the hub writers.

The hub is never reached: ``datasets.load_dataset`` is replaced by a loader that serves small in-memory datasets
with the real column types (ClassLabel, lists of ClassLabel), and the written files go through our own readers.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from decoder2vec import catalog
from decoder2vec.catalog import (
    DATASETS,
    FORMATS,
    DatasetNotFoundError,
    dataset_entry,
    entry_for_file,
    resolve_dataset,
    resolve_file,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """No data folder, an empty cache, the hub allowed (each test decides what the hub does)."""
    monkeypatch.delenv("DECODER2VEC_DATA", raising=False)
    monkeypatch.delenv("DECODER2VEC_HUB", raising=False)
    monkeypatch.setenv("DECODER2VEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


@pytest.fixture
def fake_hub(no_data, monkeypatch):
    """``datasets.load_dataset`` answered from memory; returns the list of calls it got."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(path, name=None, split=None, **options):
        calls.append((path, name, split, options))
        return HUB[(path, split)](datasets)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(catalog, "_check_hub_reachable", lambda: None)
    return calls


def _stsb(datasets):
    rows = {"sentence1": ["A cat\tsits.", "A man plays."], "sentence2": ["A cat sat.", "Rain."], "score": [0.72, 0.04]}
    return datasets.Dataset.from_dict(rows)


def _trec(datasets):
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "coarse_label": datasets.ClassLabel(names=["ABBR", "NUM"]),
            "fine_label": datasets.ClassLabel(names=["ABBR:exp", "NUM:dist"]),
        }
    )
    rows = {
        "text": ["What does NASA stand for ?", "How far is Zürich ?"],
        "coarse_label": [0, 1],
        "fine_label": [0, 1],
    }
    return datasets.Dataset.from_dict(rows, features=features)


def _mrpc(datasets):
    rows = {"text1": ["He said so .", "It rained ."], "text2": ["So he said .", "It was dry ."], "label": [1, 0]}
    return datasets.Dataset.from_dict(rows)


def _conll(datasets):
    tags = {
        "pos_tags": ["NNP", "VBD", "."],
        "chunk_tags": ["O", "B-NP", "B-VP"],
        "ner_tags": ["O", "B-PER", "I-PER"],
    }
    features = datasets.Features(
        {"tokens": datasets.List(datasets.Value("string"))}
        | {name: datasets.List(datasets.ClassLabel(names=names)) for name, names in tags.items()}
    )
    rows = {
        "tokens": [["John", "left", "."], ["Hi"]],
        "pos_tags": [[0, 1, 2], [0]],
        "chunk_tags": [[1, 2, 0], [1]],
        "ner_tags": [[1, 0, 0], [0]],
    }
    return datasets.Dataset.from_dict(rows, features=features)


def _wikitext(datasets):
    return datasets.Dataset.from_dict({"text": ["", " = Alpha = \n", "", " Alpha is a letter . \n"]})


def _sentences(datasets):
    return datasets.Dataset.from_dict({"text": [f"Sentence {i}." for i in range(20_000)]})


HUB = {
    ("sentence-transformers/stsb", "test"): _stsb,
    ("CogComp/trec", "test"): _trec,
    ("SetFit/mrpc", "train+validation"): _mrpc,
    ("eriktks/conll2003", "validation"): _conll,
    ("Salesforce/wikitext", "validation"): _wikitext,
    ("princeton-nlp/datasets-for-simcse", "train"): _sentences,
}


# ---------------------------------------------------------------------- declarations
def test_every_dataset_is_declared_once_with_a_writer():
    files = [entry.file for entry in DATASETS.values()]
    assert len(files) == len(set(files))
    for key, entry in DATASETS.items():
        assert key == f"{entry.name}:{entry.split}" and entry.format in FORMATS and entry.hub.id and entry.hub.columns
        assert entry_for_file(entry.file) is entry
    wanted = "stsb:train stsb:dev stsb:test sickr:test trec:train trec:test mrpc:train mrpc:test wikitext2:valid"
    assert set(wanted.split()) | {"conll2003:train", "conll2003:dev", "conll2003:test"} <= set(DATASETS)
    assert dataset_entry("mntp").file == "text/wikitext2_valid.tokens"
    assert dataset_entry("simcse").file == "text/wiki_sentences.txt"
    assert dataset_entry("stsb") is dataset_entry("stsb:test") is dataset_entry("stsb", "test")
    assert dataset_entry("sickr").split == "test" and dataset_entry("trec", "train").encoding == "latin-1"
    with pytest.raises(ValueError, match="unknown dataset 'nope'; known: .*stsb"):
        dataset_entry("nope")
    with pytest.raises(ValueError, match="has no split 'valid'; its splits: train, dev, test"):
        dataset_entry("stsb", "valid")


def test_no_module_hard_codes_the_shared_folder():
    pattern = re.compile(r"""\.\./shared|["']shared["']""")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("src", "bench", "tests")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if pattern.search(line) and path.name != "test_catalog.py"
    ]
    assert offenders == []


# ---------------------------------------------------------------------- local branches
def test_explicit_path_then_data_dir_then_environment(no_data, tmp_path, monkeypatch):
    mine = tmp_path / "mine.tsv"
    mine.write_text("sentence1\tsentence2\tscore\na\tb\t1\n")
    assert resolve_dataset("stsb", path=mine) == mine
    with pytest.raises(DatasetNotFoundError, match="stsb test file .*missing.tsv' not found"):
        resolve_dataset("stsb", path=tmp_path / "missing.tsv")  # an explicit path never falls back

    given, environment = tmp_path / "given", tmp_path / "environment"
    for folder in (given, environment):
        (folder / "sts").mkdir(parents=True)
        (folder / "sts" / "stsb_test.tsv").write_text("sentence1\tsentence2\tscore\n")
    monkeypatch.setenv("DECODER2VEC_DATA", str(environment))
    assert resolve_dataset("stsb", "test") == environment / "sts" / "stsb_test.tsv"
    assert resolve_dataset("stsb", "test", data_dir=given) == given / "sts" / "stsb_test.tsv"
    assert resolve_file("sts/stsb_test.tsv", given) == given / "sts" / "stsb_test.tsv"
    assert resolve_file("my/own.tsv", given) == given / "my" / "own.tsv"  # not in the catalog: the folder only


def test_shared_data_folder_has_every_declared_file(shared_data):
    for entry in DATASETS.values():
        assert resolve_dataset(entry.name, entry.split, data_dir=shared_data) == Path(shared_data) / entry.file


def test_converted_copy_in_the_cache_is_used_before_the_hub(no_data, monkeypatch):
    (no_data / "sts").mkdir(parents=True)
    (no_data / "sts" / "sickr_test.tsv").write_text("sentence1\tsentence2\tscore\n")
    monkeypatch.setattr(catalog, "_download", lambda *args: pytest.fail("the hub was asked"))
    assert resolve_dataset("sickr") == no_data / "sts" / "sickr_test.tsv"


# ---------------------------------------------------------------------- hub branch (mocked loader)
def test_hub_rows_become_local_files_our_readers_read(fake_hub, no_data):
    from decoder2vec.eval.classification import read_labelled_texts
    from decoder2vec.eval.pairs import read_pairs_tsv
    from decoder2vec.eval.sts import read_sts_tsv
    from decoder2vec.train.data import read_texts

    sts = read_sts_tsv(resolve_dataset("stsb", "test"))
    assert sts.sentences1 == ["A cat sits.", "A man plays."] and sts.scores == [3.6, 0.2]  # 0-1 scaled to 0-5

    trec_file = resolve_dataset("trec", "test")
    assert trec_file.read_bytes() == "ABBR:exp What does NASA stand for ?\nNUM:dist How far is Zürich ?\n".encode(
        "latin-1"
    )
    trec = read_labelled_texts(trec_file, format="trec", encoding="latin-1")
    assert trec.labels == ["ABBR", "NUM"] and trec.texts[1] == "How far is Zürich ?"

    pairs = read_pairs_tsv(resolve_dataset("mrpc", "train"))
    assert pairs.labels == [1, 0] and pairs.sentences2 == ["So he said .", "It was dry ."]

    conll = resolve_dataset("conll2003", "dev").read_text()
    assert conll == "John NNP B-NP B-PER\nleft VBD B-VP O\n. . O O\n\nHi NNP B-NP O\n\n"

    wikitext = resolve_dataset("mntp")
    assert wikitext.read_text() == "\n = Alpha = \n\n Alpha is a letter . \n"
    assert read_texts(str(wikitext)) == ["Alpha is a letter ."]
    sentences = resolve_dataset("simcse").read_text().splitlines()
    assert len(sentences) == 11_913 and sentences[-1] == "Sentence 11912."  # the declared prefix

    assert [call[:3] for call in fake_hub] == [
        ("sentence-transformers/stsb", None, "test"),
        ("CogComp/trec", None, "test"),
        ("SetFit/mrpc", None, "train+validation"),
        ("eriktks/conll2003", None, "validation"),
        ("Salesforce/wikitext", "wikitext-2-v1", "validation"),
        ("princeton-nlp/datasets-for-simcse", None, "train"),
    ]
    assert fake_hub[1][3] == {"revision": "refs/convert/parquet"}
    assert fake_hub[5][3] == {"data_files": "wiki1m_for_simcse.txt"}

    calls = len(fake_hub)
    assert resolve_dataset("stsb", "test") == no_data / "sts" / "stsb_test.tsv"  # once: later runs read the cache
    assert len(fake_hub) == calls
    assert not [p for p in no_data.rglob("*") if p.name.startswith(".")]  # no temporary file left behind


def test_hub_failure_and_hub_off_give_the_one_clear_error(fake_hub, no_data, monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DatasetNotFoundError) as caught:
        resolve_dataset("stsb", "dev")
    message = str(caught.value)
    assert "dataset stsb:dev" in message and "'sts/stsb_dev.tsv'" in message
    assert "ConnectionError: no route to host" in message and "sentence-transformers/stsb" in message
    assert "--data-dir DIR or set DECODER2VEC_DATA=DIR" in message and "pip install" in message

    monkeypatch.setenv("DECODER2VEC_HUB", "off")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub was asked"))
    with pytest.raises(DatasetNotFoundError, match="the hub is turned off"):
        resolve_dataset("stsb", "dev")
    with pytest.raises(DatasetNotFoundError, match="the hub is turned off"):
        resolve_dataset("stsb", "dev", hub=False)


def test_without_the_datasets_package_the_error_says_how_to_install_it(no_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DatasetNotFoundError, match=r"`datasets` package is not installed \(pip install"):
        resolve_dataset("trec", "train")


def test_no_data_folder_and_no_hub_fails_within_seconds(tmp_path):
    """As on a fresh clone without the shared folder and without a network: one clear error, quickly."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DECODER2VEC_", "HF_")) and "proxy" not in key.lower()
    }
    environment |= {"DECODER2VEC_CACHE": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "decoder2vec.catalog", "mntp"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 1, done.stdout + done.stderr
    error = done.stderr
    assert "dataset wikitext2:valid" in error and "text/wikitext2_valid.tokens" in error
    assert "no data folder was given" in error and "cannot be reached" in error
    assert "--data-dir" in error and "DECODER2VEC_DATA" in error and "pip install" in error
    assert seconds < 60  # the interpreter's imports dominate; the hub check itself gives up at once
