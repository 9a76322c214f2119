"""decoder2vec embed: every input format, bad rows, resume (SIGKILL), bounded memory, workers, Ray."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from decoder2vec import Encoder
from decoder2vec.cli import main
from decoder2vec.embed import CorpusError, EmbedSettingsError, embed_corpus, read_embeddings, read_manifest
from tiny import CORPUS

TEXTS = [f"{text} ({i})" for i, text in enumerate(CORPUS[:7] * 5)]  # 35 distinct texts of varied length


@pytest.fixture
def encoder(tiny_llama_dir):
    return Encoder.from_pretrained(tiny_llama_dir)


def _write(path, fmt, texts, ids=None):
    ids = ids if ids is not None else [f"doc-{i}" for i in range(len(texts))]
    if fmt == "text":
        path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in zip(ids, texts, strict=True)))
    elif fmt in ("csv", "tsv"):
        import csv

        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter="," if fmt == "csv" else "\t")
            writer.writerow(["id", "body"])
            writer.writerows(zip(ids, texts, strict=True))
    elif fmt == "parquet":
        pq.write_table(pa.table({"id": ids, "body": texts}), path, row_group_size=4)
    return path


def _vectors(table):
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


# ---------------------------------------------------------------------- formats, manifest, ids, order
@pytest.mark.parametrize("fmt", ["text", "jsonl", "csv", "tsv", "parquet"])
def test_every_format_gives_encode_vectors_in_input_order(fmt, encoder, tmp_path):
    texts = [*TEXTS[:-1], 'a "quoted",\nmulti-line\ttext']  # CSV/TSV quoting and a newline inside a field
    if fmt == "text":
        texts = TEXTS
    path = _write(tmp_path / f"corpus.{fmt}", fmt, texts)
    id_field = None if fmt == "text" else "id"
    manifest = embed_corpus(
        path, tmp_path / "out", encoder=encoder, text_field="body", id_field=id_field, shard_size=8, batch_size=4
    )
    table = read_embeddings(tmp_path / "out")
    expected_ids = list(range(len(texts))) if fmt == "text" else [f"doc-{i}" for i in range(len(texts))]
    assert table.column("id").to_pylist() == expected_ids
    assert table.column("text").to_pylist() == texts
    np.testing.assert_allclose(_vectors(table), encoder.encode(texts), atol=1e-5)
    # manifest: shards with row counts and checksums, the model, the settings, library versions
    assert manifest["complete"] and manifest["rows"] == len(texts) and manifest["planned_shards"] == 5
    assert [r["rows"] for r in manifest["shards"]] == [8, 8, 8, 8, 3]
    import hashlib

    for record in manifest["shards"]:
        assert hashlib.sha256((tmp_path / "out" / record["file"]).read_bytes()).hexdigest() == record["sha256"]
    assert manifest["settings"]["model"]["source"] == str(encoder.source)
    assert manifest["settings"]["model"]["config"]["pooling"] == "mean"
    assert {"torch", "transformers", "pyarrow", "decoder2vec"} <= set(manifest["versions"])
    assert read_manifest(tmp_path / "out") == manifest
    # the one-line reads the README shows
    assert pq.read_table(tmp_path / "out" / "shards").num_rows == len(texts)
    assert not [p for p in (tmp_path / "out").rglob("*") if ".tmp-" in p.name]


def test_output_options_instruction_and_precision(encoder, tmp_path):
    path = _write(tmp_path / "c.txt", "text", TEXTS)
    for precision, dtype, width in [("int8", np.int8, 16), ("binary", np.uint8, 2), ("uint8", np.uint8, 16)]:
        out = tmp_path / precision
        manifest = embed_corpus(
            path, out, encoder=encoder, instruction="Find it", normalize=True, dimensions=16, precision=precision
        )
        table = read_embeddings(out)
        got = _vectors(table)
        assert got.dtype == dtype and got.shape == (len(TEXTS), width) and manifest["width"] == width
        expected = encoder.encode(TEXTS, instruction="Find it", normalize=True, dimensions=16, precision=precision)
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # int8 rounding at a .5 boundary
        assert table.schema.field("embedding").type == pa.list_(pa.from_numpy_dtype(dtype), width)


def test_folder_of_parquet_parts_with_integer_ids_spark_style(encoder, tmp_path):
    folder = tmp_path / "spark-out"
    folder.mkdir()
    for part in range(4):
        rows = TEXTS[part * 10 : part * 10 + 10]
        ids = list(range(1000 + part * 10, 1000 + part * 10 + len(rows)))
        pq.write_table(pa.table({"doc_id": ids, "text": rows}), folder / f"part-0000{part}-abc.snappy.parquet")
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-00000-abc.snappy.parquet.crc").write_text("x")
    embed_corpus(folder, tmp_path / "out", encoder=encoder, id_field="doc_id", shard_size=4)
    table = read_embeddings(tmp_path / "out")
    assert table.column("id").to_pylist() == list(range(1000, 1000 + len(TEXTS)))
    np.testing.assert_allclose(_vectors(table), encoder.encode(TEXTS), atol=1e-5)


def test_hf_dataset_input(encoder, tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    _write(folder / "train.jsonl", "jsonl", TEXTS)
    embed_corpus(f"hf:{folder}", tmp_path / "out", encoder=encoder, text_field="body", id_field="id")
    table = read_embeddings(tmp_path / "out")
    assert table.column("id").to_pylist() == [f"doc-{i}" for i in range(len(TEXTS))]
    np.testing.assert_allclose(_vectors(table), encoder.encode(TEXTS), atol=1e-5)


# ---------------------------------------------------------------------- bad rows
BAD_ROWS = [
    # (format, file bytes, message part, the bad row's line)
    ("text", b"good one\n\xff\xfe broken\nanother\n", "line 2: not valid UTF-8", 2),
    ("text", b"good one\n   \nanother\n", "line 2: empty text", 2),
    ("jsonl", b'{"body": "a"}\n{"title": "b"}\n{"body": "c"}\n', "line 2: text field 'body' is missing", 2),
    ("jsonl", b'{"body": "a", "id": "x"}\n{"body": "b", "id": 7}\n', "line 2: id field 'id' is a int", 2),
    ("jsonl", b'{"body": "a"}\n{"body": 3}\n', "line 2: the text is a int", 2),
    ("jsonl", b'{"body": "a"}\n{"body": "b"\n', "line 2: not valid JSON", 2),
    ("csv", b'id,body\nx,"a"\ny,"multi\nline \xff"\nz,c\n', "line 3: not valid UTF-8", 3),
    ("csv", b"id,body\nx,a\ny\nz,c\n", "line 3: text column 'body' is missing", 3),
]


@pytest.mark.parametrize(("fmt", "content", "message", "line"), BAD_ROWS)
def test_bad_row_is_a_clear_error_or_skipped_with_a_count(fmt, content, message, line, encoder, tmp_path):
    path = tmp_path / f"corpus.{fmt}"
    path.write_bytes(content)
    id_field = "id" if fmt != "text" and b'"id"' in content or fmt == "csv" else None
    options = dict(encoder=encoder, text_field="body", id_field=id_field)
    with pytest.raises(CorpusError) as error:
        embed_corpus(path, tmp_path / "out", **options)
    assert str(path) in str(error.value) and message in str(error.value) and "--skip-bad-rows" in str(error.value)
    assert not (tmp_path / "out").exists()  # checked before anything is written
    manifest = embed_corpus(path, tmp_path / "out", skip_bad_rows=True, **options)
    assert manifest["skipped_rows"] == 1 and manifest["complete"]
    assert manifest["rows"] == len(read_embeddings(tmp_path / "out"))


def test_cli_reports_a_bad_row_in_one_line(tiny_llama_dir, tmp_path, capsys):
    path = tmp_path / "c.txt"
    path.write_bytes(b"fine\n\nalso fine\n")
    assert main(["embed", str(path), "-o", str(tmp_path / "out"), "--model", str(tiny_llama_dir)]) == 1
    assert f"{path} line 2: empty text" in capsys.readouterr().err
    assert (
        main(["embed", str(path), "-o", str(tmp_path / "out"), "--model", str(tiny_llama_dir), "--skip-bad-rows"]) == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 2 and summary["skipped_rows"] == 1
    assert read_embeddings(tmp_path / "out").column("id").to_pylist() == [0, 2]  # ids stay input row numbers


# ---------------------------------------------------------------------- resume
def test_rerun_skips_finished_shards_redoes_damaged_ones_and_refuses_other_settings(encoder, tmp_path):
    path = _write(tmp_path / "c.txt", "text", TEXTS)
    embed_corpus(path, tmp_path / "out", encoder=encoder, shard_size=10)
    shards = sorted((tmp_path / "out" / "shards").glob("*.parquet"))
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].write_bytes(b"damaged")  # a damaged shard is embedded again
    time.sleep(0.01)
    embed_corpus(path, tmp_path / "out", encoder=encoder, shard_size=10)
    after = {p.name: p.stat().st_mtime_ns for p in shards}
    assert [after[n] == before[n] for n in sorted(before)] == [True, False, True, True]
    np.testing.assert_allclose(_vectors(read_embeddings(tmp_path / "out")), encoder.encode(TEXTS), atol=1e-5)
    for change, words in [
        ({"normalize": True}, "normalize: False there, True now"),
        ({"shard_size": 5}, "shard_size"),
    ]:
        with pytest.raises(EmbedSettingsError, match="other settings") as error:
            embed_corpus(path, tmp_path / "out", encoder=encoder, **{"shard_size": 10, **change})
        assert words in str(error.value) and "--overwrite" in str(error.value)
    embed_corpus(path, tmp_path / "out", encoder=encoder, shard_size=5, overwrite=True)
    assert read_manifest(tmp_path / "out")["planned_shards"] == 7


def _disk_full_at_shard_2(monkeypatch):
    import decoder2vec.embed as embed_module

    write = embed_module.write_parquet_atomic

    def disk_full_at_shard_2(table, target):
        if target.name == "shard-00002.parquet":
            raise OSError("disk full")
        return write(table, target)

    monkeypatch.setattr(embed_module, "write_parquet_atomic", disk_full_at_shard_2)


def test_a_failed_write_stops_the_run_with_the_shards_before_it_recorded(encoder, tmp_path, monkeypatch):
    path = _write(tmp_path / "c.txt", "text", TEXTS)
    _disk_full_at_shard_2(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        embed_corpus(path, tmp_path / "out", encoder=encoder, shard_size=5)
    assert [r["index"] for r in read_manifest(tmp_path / "out")["shards"]] == [0, 1]
    monkeypatch.undo()
    assert embed_corpus(path, tmp_path / "out", encoder=encoder, shard_size=5)["complete"]
    np.testing.assert_allclose(_vectors(read_embeddings(tmp_path / "out")), encoder.encode(TEXTS), atol=1e-5)


def test_a_failed_write_on_the_helper_thread_stops_an_overlapped_run(encoder, tmp_path, monkeypatch):
    # overlapped (the default on a GPU): the helper thread writes shard k while the model encodes shard k+1
    from decoder2vec.embed import EmbedSettings, ShardEmbedder, list_inputs, plan_shards

    path = _write(tmp_path / "c.txt", "text", TEXTS)
    settings = EmbedSettings(shard_size=5)
    shards = plan_shards(list_inputs(path), settings)
    (tmp_path / "out" / "shards").mkdir(parents=True)
    _disk_full_at_shard_2(monkeypatch)
    records = []
    with pytest.raises(OSError, match="disk full"):
        ShardEmbedder(encoder, settings, tmp_path / "out").run(shards, records.append, overlap=True)
    assert [r["index"] for r in records] == [0, 1]
    monkeypatch.undo()
    records = []
    ShardEmbedder(encoder, settings, tmp_path / "out").run(shards, records.append, overlap=True)
    table = pa.concat_tables([pq.read_table(tmp_path / "out" / r["file"]) for r in records])
    np.testing.assert_allclose(_vectors(table), encoder.encode(TEXTS), atol=1e-5)


def test_one_embedder_called_from_two_threads_gives_the_plain_vectors(encoder, tmp_path):
    # how a Ray actor runs it: two shards at a time, the tokenizer and the model each used by one call at a time
    from concurrent.futures import ThreadPoolExecutor

    from decoder2vec.embed import EmbedSettings, ShardEmbedder, list_inputs, plan_shards

    path = _write(tmp_path / "c.jsonl", "jsonl", TEXTS)
    settings = EmbedSettings(text_field="body", id_field="id", shard_size=4, batch_size=3)
    shards = plan_shards(list_inputs(path), settings)
    (tmp_path / "out" / "shards").mkdir(parents=True)
    embedder = ShardEmbedder(encoder, settings, tmp_path / "out")
    with ThreadPoolExecutor(max_workers=2) as pool:
        records = list(pool.map(embedder, shards))
    assert [r["rows"] for r in records] == [s.rows for s in shards]
    table = pa.concat_tables([pq.read_table(tmp_path / "out" / r["file"]) for r in records])
    assert table.column("id").to_pylist() == [f"doc-{i}" for i in range(len(TEXTS))]
    np.testing.assert_allclose(_vectors(table), encoder.encode(TEXTS), atol=1e-5)


# VmHWM is this process's own peak RSS; ru_maxrss is not: it keeps the pytest process's peak across fork and exec
_RUN = """
import re, sys, torch
torch.set_num_threads(1)
from decoder2vec.embed import embed_corpus
embed_corpus(sys.argv[1], sys.argv[2], model=sys.argv[3], shard_size=int(sys.argv[4]), batch_size=8,
             encoder_options={"max_length": int(sys.argv[5])}, progress=False)
print(re.search(r"VmHWM:\\s*(\\d+)", open("/proc/self/status").read()).group(1))
"""


def _run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-c", _RUN, *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tiny_llama_dir, tmp_path):
    texts = [f"{t} number {i}" for i, t in enumerate(CORPUS * 4)]  # 560 rows, 28 shards of 20
    path = _write(tmp_path / "c.txt", "text", texts)
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", _RUN, str(path), str(out), str(tiny_llama_dir), "20", "64"])
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 3:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted = read_manifest(out)
    assert 3 <= len(interrupted["shards"]) < 28, "the run was not interrupted mid-way"
    assert _run(path, out, tiny_llama_dir, 20, 64).returncode == 0  # resume
    options = dict(shard_size=20, batch_size=8, encoder_options={"max_length": 64}, progress=False)
    straight = embed_corpus(path, tmp_path / "straight", model=str(tiny_llama_dir), **options)
    resumed = read_manifest(out)
    assert [r["index"] for r in resumed["shards"]] == list(range(28)) and resumed["rows"] == len(texts)
    assert [r["rows"] for r in resumed["shards"]] == [r["rows"] for r in straight["shards"]]
    assert resumed["settings"] == straight["settings"]
    a, b = read_embeddings(out), read_embeddings(tmp_path / "straight")
    assert a.column("id").to_pylist() == b.column("id").to_pylist() == list(range(len(texts)))
    assert a.column("text").to_pylist() == texts
    np.testing.assert_allclose(_vectors(a), _vectors(b), atol=1e-6)  # this process may run other thread counts
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"shard-{i:05d}.parquet" for i in range(28)]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_peak_memory_does_not_grow_with_the_corpus(tiny_llama_dir, tmp_path):
    row = " ".join(CORPUS[:7]) * 40  # about 16 KB a text, of which the model reads 16 tokens
    shard = 100

    def peak_kb(shards):
        path = _write(tmp_path / f"c{shards}.txt", "text", [f"{i} {row}" for i in range(shards * shard)])
        done = _run(path, tmp_path / f"out{shards}", tiny_llama_dir, shard, 16)
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.split()[-1]), path.stat().st_size // 1024

    # 2 shards (3 MB of text) against 20 (32 MB): a run that kept the corpus (its texts, tokens or vectors) would
    # grow by at least the 29 MB of text; the allocator's own noise here is a few MB
    (small, small_kb), (large, large_kb) = peak_kb(2), peak_kb(20)
    assert large - small < (large_kb - small_kb) / 2, f"peak RSS {small} kB for 2 shards, {large} kB for 20"


# ---------------------------------------------------------------------- parallel engines
def test_two_worker_processes_equal_one(encoder, tiny_llama_dir, tmp_path):
    path = _write(tmp_path / "c.jsonl", "jsonl", TEXTS)
    options = dict(text_field="body", id_field="id", shard_size=6, encoder_options={"max_length": 64})
    manifest = embed_corpus(path, tmp_path / "two", model=str(tiny_llama_dir), workers=2, threads=2, **options)
    assert manifest["workers"] == 2 and manifest["complete"]
    one = embed_corpus(path, tmp_path / "one", model=str(tiny_llama_dir), **options)
    assert one["settings"] == manifest["settings"]
    a, b = read_embeddings(tmp_path / "two"), read_embeddings(tmp_path / "one")
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    np.testing.assert_allclose(_vectors(a), _vectors(b), atol=1e-5)


_RAY = """
import sys, ray, torch
try:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
except Exception as error:  # this machine cannot start a Ray node (not a decoder2vec failure)
    print(f"ray.init failed: {error}")
    sys.exit(77)
from pathlib import Path
from decoder2vec.embed import EmbedSettingsError, embed_corpus
options = dict(model=sys.argv[3], engine="ray", workers=1, threads=1, text_field="body", id_field="id", shard_size=10,
               progress=False)
manifest = embed_corpus(sys.argv[1], sys.argv[2], **options)
assert manifest["engine"] == "ray" and manifest["complete"], manifest
written = {p.name: p.read_bytes() for p in Path(sys.argv[2]).rglob("*") if p.is_file()}
try:  # the settings come from the pipeline's actors; the check comes before any write
    embed_corpus(sys.argv[1], sys.argv[2], **options, normalize=True)
    raise AssertionError("other settings were not refused")
except EmbedSettingsError as error:
    assert "normalize: False there, True now" in str(error), error
assert written == {p.name: p.read_bytes() for p in Path(sys.argv[2]).rglob("*") if p.is_file()}
"""


def test_ray_engine_equals_local_row_by_row(tiny_llama_dir, tmp_path):
    pytest.importorskip("ray.data", reason="Ray Data is an optional extra: pip install 'decoder2vec[ray]'")
    path = _write(tmp_path / "c.jsonl", "jsonl", TEXTS)
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    ray_run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_RAY), str(path), str(tmp_path / "ray"), str(tiny_llama_dir)],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    if ray_run.returncode == 77:
        pytest.skip(f"a local Ray node could not start here: {ray_run.stdout.strip()[-500:]}")
    assert ray_run.returncode == 0, ray_run.stderr[-3000:]
    embed_corpus(path, tmp_path / "local", model=str(tiny_llama_dir), text_field="body", id_field="id", shard_size=10)
    by_id = {}
    for name in ("ray", "local"):
        table = read_embeddings(tmp_path / name)
        by_id[name] = dict(zip(table.column("id").to_pylist(), _vectors(table), strict=True))
    assert sorted(by_id["ray"]) == sorted(by_id["local"]) == sorted(f"doc-{i}" for i in range(len(TEXTS)))
    for row_id, vector in by_id["local"].items():
        np.testing.assert_allclose(by_id["ray"][row_id], vector, atol=1e-5)
    assert read_manifest(tmp_path / "ray")["settings"] == read_manifest(tmp_path / "local")["settings"]
