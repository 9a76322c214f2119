"""Embed a corpus into Parquet shards: streaming, resumable, on several processes or a Ray cluster.

``decoder2vec embed INPUT -o OUT_DIR`` (or :func:`embed_corpus`) reads texts from a text file (one a line),
JSONL, CSV/TSV, Parquet, a folder of such files (a Spark output folder), or a Hugging Face dataset
(``hf:NAME[:CONFIG][:SPLIT]``), and writes::

    OUT_DIR/manifest.json               model, adapters, settings, shards (rows, sha256), library versions
    OUT_DIR/shards/shard-00000.parquet  columns id, embedding (fixed-size list), text (unless store_text=False)

How a run goes:

1. **Plan** (one streaming pass over the input, nothing kept): count the rows, check every row (valid UTF-8,
   a non-empty string text, a string id when ``id_field`` is given) and cut the input into shards of
   ``shard_size`` input rows, remembering where each shard starts (a byte offset, or a row offset for
   Parquet and datasets). A bad row stops the run here, before anything is written, with the file and row
   in the message; with ``skip_bad_rows`` bad rows are counted and left out.
2. **Resume check**: an existing ``manifest.json`` must hold the same settings (else :class:`EmbedSettingsError`);
   shards it lists whose file is intact (same size and sha256) are kept, the others are embedded.
3. **Embed** each pending shard: read its rows from its start offset, sort them by token length, encode in
   batches, write the vectors back in input order to a hidden temporary file, rename it, then record the shard
   in the manifest (rewritten atomically). On a GPU a helper thread reads the next shard and writes the previous
   one while the model encodes (:class:`ShardEmbedder`); on the CPU the steps run in turn. Memory holds at most
   three shards per worker, whatever the corpus size.

Parallelism: ``workers=1`` runs in the calling process; ``workers=N`` starts N processes that each load the
encoder and read, embed and write whole shards (CPU: the torch threads are split between them; CUDA: one
device each, round robin). ``engine="ray"`` runs the same shards as a Ray Data pipeline instead
(:mod:`decoder2vec.embed_ray`). Ids are the row numbers of the input (0-based, bad rows counted) unless
``id_field`` names a column.

Example::

    manifest = embed_corpus("corpus.jsonl", "out", model="smollm2-135m", text_field="body", normalize=True)
    table = pyarrow.parquet.read_table("out/shards")   # columns id, embedding, text
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "INPUT_FORMATS",
    "CorpusError",
    "EmbedSettings",
    "EmbedSettingsError",
    "EncoderSpec",
    "embed_corpus",
    "read_embeddings",
    "read_manifest",
]

INPUT_FORMATS = ("text", "jsonl", "csv", "tsv", "parquet", "hf")
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
FORMAT_VERSION = 1

_SUFFIXES = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class CorpusError(ValueError):
    """The input corpus is missing, unreadable, or has a bad row; the message names the file and row."""


class EmbedSettingsError(ValueError):
    """An output folder holds embeddings made with other settings (resuming would mix them)."""


# ---------------------------------------------------------------------- settings
@dataclass
class EmbedSettings:
    """What is embedded and how it is written. Every field but the last four is checked on resume."""

    text_field: str = "text"  # JSONL key, CSV/TSV header, Parquet or dataset column holding the text
    id_field: str | None = None  # column holding the id; None: ids are the input row numbers (0-based)
    input_format: str | None = None  # text | jsonl | csv | tsv | parquet; None: from each file's suffix
    instruction: str | None = None  # read by the model before every text, not pooled
    normalize: bool = False
    dimensions: int | None = None  # Matryoshka: keep the first N values
    precision: str = "float32"  # float32 | int8 | uint8 | binary
    shard_size: int = 10_000  # input rows per shard (bad rows counted)
    store_text: bool = True  # keep the text next to its vector (search prints it)
    # not part of the output's identity:
    batch_size: int = 32
    workers: int = 1
    skip_bad_rows: bool = False
    progress: bool = True

    CHECKED = (
        "text_field",
        "id_field",
        "input_format",
        "instruction",
        "normalize",
        "dimensions",
        "precision",
        "shard_size",
        "store_text",
    )

    def __post_init__(self):
        from .vectors import check_precision

        check_precision(self.precision)
        if self.input_format is not None and self.input_format not in INPUT_FORMATS[:-1]:
            raise ValueError(
                f"unknown input format {self.input_format!r}; choose one of: {', '.join(INPUT_FORMATS[:-1])}"
            )
        for name in ("shard_size", "batch_size", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")

    def checked(self) -> dict:
        return {name: getattr(self, name) for name in self.CHECKED}


@dataclass
class EncoderSpec:
    """How to load the encoder again in another process or on another machine (``Encoder.from_pretrained``)."""

    source: str = "smollm2-135m"
    adapters: list[str] = field(default_factory=list)
    dtype: str | None = None
    device: str | None = None
    options: dict = field(default_factory=dict)  # EncoderConfig fields to override

    def load(self, device: str | None = None):
        from .model import Encoder

        return Encoder.from_pretrained(
            self.source,
            adapter=self.adapters or None,
            dtype=self.dtype,
            device=device or self.device,
            **self.options,
        )

    @classmethod
    def of(cls, encoder) -> EncoderSpec:
        """The spec that loads ``encoder`` again (its source, adapters, full configuration and dtype)."""
        return cls(
            source=encoder.source,
            adapters=list(getattr(encoder, "adapters", []) or []),
            dtype=_dtype_name(encoder),
            device=str(encoder.device),
            options=asdict(encoder.config),
        )


def _dtype_name(encoder) -> str:
    return str(next(encoder.model.parameters()).dtype).removeprefix("torch.")


def _portable_path(path: str) -> str:
    """An existing local path made absolute (a rerun from another folder is the same job); names stay as given."""
    return os.path.abspath(path) if os.path.exists(path) else path


# ---------------------------------------------------------------------- input files
@dataclass(frozen=True)
class InputFile:
    path: str  # a file path, or hf:NAME[:CONFIG][:SPLIT]
    format: str


def list_inputs(source: str | os.PathLike, input_format: str | None = None) -> list[InputFile]:
    """The files of an input: one file, every data file of a folder (sorted; hidden and ``_`` files skipped), or hf:."""
    source = os.fspath(source)
    if source.startswith("hf:"):
        return [InputFile(source, "hf")]
    path = Path(source)
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
            and (input_format or _SUFFIXES.get(_suffix(p)))
        )
        if not files:
            raise CorpusError(f"folder {source} holds no data file ({', '.join(sorted(_SUFFIXES))})")
        return [InputFile(str(p), input_format or _SUFFIXES[_suffix(p)]) for p in files]
    if not path.is_file():
        hint = " (a Hugging Face dataset is written hf:NAME[:CONFIG][:SPLIT])" if not path.suffix else ""
        raise CorpusError(f"input {source!r} not found{hint}")
    return [InputFile(str(path), input_format or _SUFFIXES.get(_suffix(path), "text"))]


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    for suffix in reversed(suffixes):  # part-0000.snappy.parquet, data.jsonl
        if suffix in _SUFFIXES:
            return suffix
    return suffixes[-1] if suffixes else ""


# ---------------------------------------------------------------------- row readers
# Each reader yields (start, number, record) from a start position: `start` resumes reading at that row
# (a byte offset for line formats, a row offset for Parquet and datasets); `number` is the row's line
# number (line formats) or row offset, for messages; `record` is what _extract turns into (id, text).


class _Bad(Exception):
    pass


def _where(file_format: str, number: int) -> str:
    return f"row {number}" if file_format in ("parquet", "hf") else f"line {number}"


def _lines(path: str, start: int) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as handle:
        handle.seek(start)
        position = start
        while True:
            raw = handle.readline()
            if not raw:
                return
            yield position, raw
            position += len(raw)


def _strip_newline(raw: bytes) -> bytes:
    if raw.endswith(b"\n"):
        raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
    return raw


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _Bad(f"not valid UTF-8 (byte {error.start}: {raw[error.start : error.start + 1]!r})") from None


def _read_lines(file: InputFile, start: int, line: int, settings: EmbedSettings):
    for position, raw in _lines(file.path, start):
        yield position, line, ("text" if file.format == "text" else "json", raw)
        line += 1


def _csv_delimiter(file: InputFile) -> str:
    return "\t" if file.format == "tsv" else ","


@lru_cache(maxsize=64)
def _csv_header(path: str, delimiter: str) -> tuple[tuple[str, ...], int, int]:
    """(column names, byte offset of the first data row, its line number)."""
    records = _csv_records(path, 0, 1, delimiter)
    try:
        _, _, _, fields = next(records)
    except StopIteration:
        raise CorpusError(f"{path} is empty; a CSV/TSV file needs a header naming its columns") from None
    position, line, _, _ = next(records, (None, None, None, None))
    if position is None:  # a header and nothing else
        position, line = os.path.getsize(path), 0
    names = [f.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for f in fields]
    if names:
        names[0] = names[0].removeprefix("\ufeff")
    return tuple(names), position, line


def _csv_records(path: str, start: int, line: int, delimiter: str):
    """(byte offset, first line number, line count, fields) of each CSV record; quoted newlines work."""
    consumed: list[int] = []

    def lines():
        for _, raw in _lines(path, start):
            consumed.append(len(raw))
            yield raw.decode("utf-8", "surrogateescape")

    position = start
    for fields in csv.reader(lines(), delimiter=delimiter):
        # csv.reader pulls exactly the lines of one record before yielding it
        yield position, line, len(consumed), fields
        position += sum(consumed)
        line += len(consumed)
        consumed.clear()


def _read_csv(file: InputFile, start: int, line: int, settings: EmbedSettings):
    delimiter = _csv_delimiter(file)
    header, first, first_line = _csv_header(file.path, delimiter)
    for name in (settings.text_field, settings.id_field):
        if name is not None and name not in header:
            raise CorpusError(f"{file.path} has no column {name!r}; its columns: {', '.join(header)}")
    if start == 0:
        start, line = first, first_line
    for position, first_line_of_row, _, fields in _csv_records(file.path, start, line, delimiter):
        yield position, first_line_of_row, ("csv", header, fields)


def _read_parquet(file: InputFile, start: int, line: int, settings: EmbedSettings):
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(file.path)
    columns = _check_columns(file, parquet.schema_arrow, settings)
    group, group_start = 0, 0
    while group < parquet.num_row_groups and group_start + parquet.metadata.row_group(group).num_rows <= start:
        group_start += parquet.metadata.row_group(group).num_rows
        group += 1
    row = group_start
    for batch in parquet.iter_batches(
        batch_size=4096, row_groups=range(group, parquet.num_row_groups), columns=columns
    ):
        values = [batch.column(name).to_pylist() for name in columns]
        for i in range(batch.num_rows):
            if row >= start:
                yield row, row, ("columns", *(v[i] for v in values))
            row += 1


@lru_cache(maxsize=4)
def _hf_dataset(spec: str):
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{spec} needs the `datasets` package: pip install datasets") from None
    name, config, split = ([*spec[3:].split(":"), None, None])[:3]
    return datasets.load_dataset(name, config or None, split=split or "train")


def _read_hf(file: InputFile, start: int, line: int, settings: EmbedSettings):
    dataset = _hf_dataset(file.path)
    columns = _check_columns(file, dataset.features.arrow_schema, settings)
    for offset in range(start, len(dataset), 4096):
        chunk = dataset[offset : offset + 4096]
        values = [chunk[name] for name in columns]
        for i in range(len(values[0])):
            yield offset + i, offset + i, ("columns", *(v[i] for v in values))


def _check_columns(file: InputFile, schema, settings: EmbedSettings) -> list[str]:
    import pyarrow as pa

    columns = [settings.text_field] + ([settings.id_field] if settings.id_field else [])
    for name in columns:
        if name not in schema.names:
            raise CorpusError(f"{file.path} has no column {name!r}; its columns: {', '.join(schema.names)}")
    kind = schema.field(settings.text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CorpusError(f"{file.path}: column {settings.text_field!r} holds {kind}, not strings")
    if settings.id_field:
        kind = schema.field(settings.id_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)):
            raise CorpusError(f"{file.path}: id column {settings.id_field!r} holds {kind}, not strings or integers")
    return columns


_READERS = {
    "text": _read_lines,
    "jsonl": _read_lines,
    "csv": _read_csv,
    "tsv": _read_csv,
    "parquet": _read_parquet,
    "hf": _read_hf,
}


def _extract(record: tuple, settings: EmbedSettings) -> tuple[Any, str]:
    """A record -> (id or None, text); raises _Bad with the reason for a bad row."""
    kind = record[0]
    if kind == "text":
        text, row_id = _decode(_strip_newline(record[1])), None
    elif kind == "json":
        line = _decode(record[1])  # its line end is whitespace to JSON
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            if not line.strip():
                raise _Bad("empty line") from None
            raise _Bad(f"not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(obj, dict):
            raise _Bad(f"a JSON {type(obj).__name__}, not an object")
        text = _field(obj, settings.text_field, "text field")
        row_id = _field(obj, settings.id_field, "id field") if settings.id_field else None
    elif kind == "csv":
        _, header, fields = record
        if not fields:
            raise _Bad("empty line")
        obj = dict(zip(header, fields, strict=False))
        text = _field(obj, settings.text_field, "text column")
        row_id = _field(obj, settings.id_field, "id column") if settings.id_field else None
        for value in (text, row_id):
            if value is not None:
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise _Bad("not valid UTF-8") from None
    else:  # columns: text[, id]
        text = record[1]
        if text is None:
            raise _Bad(f"text column {settings.text_field!r} is null")
        row_id = record[2] if settings.id_field else None
        if settings.id_field and row_id is None:
            raise _Bad(f"id column {settings.id_field!r} is null")
        return row_id, _check_text(text)
    if row_id is not None and not isinstance(row_id, str):
        raise _Bad(f"id field {settings.id_field!r} is a {type(row_id).__name__} ({row_id!r}), not a string")
    return row_id, _check_text(text)


def _field(obj: dict, name: str, what: str):
    if name not in obj or obj[name] is None:
        raise _Bad(f"{what} {name!r} is missing")
    return obj[name]


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise _Bad(f"the text is a {type(text).__name__} ({text!r}), not a string")
    if not text.strip():
        raise _Bad("empty text")
    return text


# ---------------------------------------------------------------------- plan: shards
@dataclass
class Shard:
    """``rows`` consecutive input rows of one file, starting at ``start`` (byte or row offset)."""

    index: int
    file: str
    format: str
    start: int
    line: int  # line number (line formats) or row offset of the first row, for messages
    first_row: int  # the input row number of the shard's first row (the default id)
    rows: int  # input rows, bad ones included
    bad_rows: int = 0
    id_kind: str = "int"  # int | str: the id column's type, the same in every shard (even one of bad rows only)

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}.parquet"


def plan_shards(files: list[InputFile], settings: EmbedSettings) -> list[Shard]:
    """One streaming pass: check every row and cut the input into shards; raise CorpusError on a bad row."""
    shards: list[Shard] = []
    row = 0
    id_kind = None
    for file in files:
        current = None
        for start, number, record in _READERS[file.format](file, 0, 1, settings):
            if current is None or current.rows == settings.shard_size:
                current = Shard(len(shards), file.path, file.format, start, number, row, 0)
                shards.append(current)
            current.rows += 1
            row += 1
            try:
                row_id, _ = _extract(record, settings)
            except _Bad as bad:
                if not settings.skip_bad_rows:
                    raise CorpusError(
                        f"{file.path} {_where(file.format, number)}: {bad}. "
                        "Fix the row, or pass --skip-bad-rows to leave bad rows out"
                    ) from None
                current.bad_rows += 1
                continue
            kind = "int" if row_id is None or isinstance(row_id, int) else "str"
            if id_kind is None:
                id_kind = kind
            elif kind != id_kind:
                where = _where(file.format, number)
                raise CorpusError(f"{file.path} {where}: id {row_id!r} is a {kind}, earlier ids are {id_kind}s")
    if not shards:
        raise CorpusError(f"input {', '.join(f.path for f in files)} holds no rows")
    for shard in shards:
        shard.id_kind = id_kind or "int"
    return shards


def read_shard(shard: Shard, settings: EmbedSettings) -> tuple[list, list[str]]:
    """The (ids, texts) of a shard's good rows, in input order."""
    file = InputFile(shard.file, shard.format)
    ids, texts, seen, bad = [], [], 0, 0
    for _, number, record in _READERS[file.format](file, shard.start, shard.line, settings):
        if seen == shard.rows:
            break
        row = shard.first_row + seen
        seen += 1
        try:
            row_id, text = _extract(record, settings)
        except _Bad as bad_row:
            if not settings.skip_bad_rows:
                raise CorpusError(f"{file.path} {_where(file.format, number)}: {bad_row}") from None
            bad += 1
            continue
        ids.append(row if row_id is None else row_id)
        texts.append(text)
    if seen != shard.rows or bad != shard.bad_rows:
        raise CorpusError(f"{file.path} changed while it was being embedded (shard {shard.index}); start again")
    return ids, texts


# ---------------------------------------------------------------------- one shard: encode and write
def encode_features(encoder, features: list, settings: EmbedSettings, on_rows=None) -> np.ndarray:
    """Tokenized texts -> vectors in input order, encoded in batches of similar token length (longest first)."""
    import torch

    from .vectors import postprocess

    order = sorted(range(len(features)), key=lambda i: -len(features[i].input_ids))
    out = torch.empty(len(features), encoder.dim, dtype=torch.float32)
    with torch.inference_mode():
        for begin in range(0, len(order), settings.batch_size):
            index = order[begin : begin + settings.batch_size]
            out[index] = encoder(encoder.collate([features[i] for i in index])).cpu()
            if on_rows is not None:
                on_rows(len(index))
    return postprocess(out, normalize=settings.normalize, dimensions=settings.dimensions, precision=settings.precision)


def embeddings_table(ids: list, texts: list[str] | None, vectors: np.ndarray, id_kind: str = "int"):
    """The shard schema: id (int64 or string), embedding (fixed-size list of the vector dtype), text."""
    import pyarrow as pa

    id_type = pa.int64() if id_kind == "int" else pa.string()
    flat = pa.array(np.ascontiguousarray(vectors).reshape(-1))
    columns = {
        "id": pa.array(ids, type=id_type),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
    }
    if texts is not None:
        columns["text"] = pa.array(texts, type=pa.string())
    return pa.table(columns)


def write_parquet_atomic(table, path: Path) -> dict:
    """Write to a hidden temporary name in the same folder, fsync, rename; return rows, bytes and sha256."""
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    record = {"rows": table.num_rows, "bytes": tmp.stat().st_size, "sha256": _sha256(tmp)}
    os.replace(tmp, path)
    return record


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardEmbedder:
    """Reads, encodes and writes whole shards with one loaded encoder; every engine's worker is one of these.

    A shard goes through three steps: :meth:`read` (its rows, tokenized), :meth:`encode` (the model),
    :meth:`write` (Parquet under a temporary name, fsync, sha256, rename). Steps of different shards may run in
    different threads at once (:meth:`run` on a GPU, or two calls at once): the tokenizer and the
    model are each used by one thread at a time, so one shard's reading and writing overlap another's encoding
    while every shard's vectors are those of a plain run.
    """

    def __init__(self, encoder, settings: EmbedSettings, out_dir: str | os.PathLike):
        import threading

        self.encoder = encoder
        self.settings = settings
        self.out_dir = Path(out_dir)
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer fails if two threads set its truncation at once
        self._model_lock = threading.Lock()  # one forward pass at a time: each has all the torch threads

    def read(self, shard: Shard) -> tuple[list, list[str], list]:
        """(ids, texts, tokenized texts) of the shard's good rows, in input order."""
        ids, texts = read_shard(shard, self.settings)
        with self._tokenizer_lock:
            features = self.encoder.tokenize(texts, self.settings.instruction)
        return ids, texts, features

    def encode(self, features: list, on_rows=None) -> np.ndarray:
        with self._model_lock:
            return encode_features(self.encoder, features, self.settings, on_rows)

    def write(self, shard: Shard, ids: list, texts: list[str], vectors: np.ndarray) -> dict:
        """Write the shard's file atomically; return its manifest record."""
        table = embeddings_table(ids, texts if self.settings.store_text else None, vectors, shard.id_kind)
        record = write_parquet_atomic(table, self.out_dir / SHARDS_DIR / shard.name)
        return {"index": shard.index, "file": f"{SHARDS_DIR}/{shard.name}", "first_row": shard.first_row,
                "input_rows": shard.rows, "skipped_rows": shard.bad_rows, **record}  # fmt: skip

    def __call__(self, shard: Shard, on_rows=None) -> dict:
        """Embed one shard (read, encode, write); return its manifest record."""
        ids, texts, features = self.read(shard)
        vectors = self.encode(features, on_rows)
        del features
        return self.write(shard, ids, texts, vectors)

    def run(self, shards: Iterable[Shard], on_shard, on_rows=None, overlap: bool | None = None) -> None:
        """Embed ``shards`` in order; ``on_shard(record)`` is called once each shard's file is in place.

        The model runs in the calling thread (an interrupt stops it at once). With ``overlap`` (the default on a
        GPU), one helper thread reads and tokenizes the next shard and writes the previous one meanwhile, and calls
        ``on_shard``; memory holds at most three shards: the one being read, the one being encoded and the one being
        written. On the CPU (the default there: no overlap) the model's threads already use every core, and a
        helper thread only competes with them: 20,000 rows took 41.6 s overlapped against 36.8 s one step after the
        other (tiny model, 2 cores, 3 rounds alternated, 2026-12-03).
        """
        if overlap is None:
            overlap = self.encoder.device.type != "cpu"
        if not overlap:
            for shard in shards:
                on_shard(self(shard, on_rows))
            return
        from concurrent.futures import ThreadPoolExecutor

        shards = iter(shards)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-io") as helper:
            reading = writing = None
            try:
                shard = next(shards, None)
                if shard is not None:
                    reading = helper.submit(self.read, shard)
                while shard is not None:
                    ids, texts, features = reading.result()
                    following = next(shards, None)
                    reading = helper.submit(self.read, following) if following is not None else None
                    vectors = self.encode(features, on_rows)
                    del features
                    if writing is not None:
                        writing.result()  # the previous shard's write: done by now, or its error raised here
                    writing = helper.submit(self._write_and_report, shard, ids, texts, vectors, on_shard)
                    del ids, texts, vectors
                    shard = following
                if writing is not None:
                    writing.result()
            finally:
                if reading is not None:
                    reading.cancel()  # on an error; a write already handed over still finishes

    def _write_and_report(self, shard: Shard, ids: list, texts: list[str], vectors: np.ndarray, on_shard) -> None:
        on_shard(self.write(shard, ids, texts, vectors))


# ---------------------------------------------------------------------- manifest
def read_manifest(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} has no {MANIFEST_NAME}: it is not the output of `decoder2vec embed`")
    return json.loads(path.read_text())


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    path = out_dir / MANIFEST_NAME
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in ("decoder2vec", "torch", "transformers", "peft", "pyarrow", "numpy", "ray"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _identity(source: str, files: list[InputFile], spec_record: dict, settings: EmbedSettings) -> dict:
    """What must be equal for a rerun to continue an output folder."""
    paths = [_portable_path(f.path) for f in files]
    return {"input": _portable_path(source), "files": paths, **settings.checked(), "model": spec_record}


def _model_record(encoder_info: dict) -> dict:
    return {
        "source": _portable_path(encoder_info["source"]),
        "adapters": [_portable_path(a) for a in encoder_info["adapters"]],
        "dtype": encoder_info["dtype"],
        "config": encoder_info["config"],
    }


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out


def _prepare_output(out_dir: Path, identity: dict, shards: list[Shard], overwrite: bool) -> dict:
    """Check (or start) the manifest; return it with only the intact finished shards it lists."""
    manifest_path = out_dir / MANIFEST_NAME
    if overwrite and out_dir.exists():
        for name in (MANIFEST_NAME, SHARDS_DIR, "index"):
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        differences = _differences(manifest.get("settings", {}), identity)
        if differences:
            raise EmbedSettingsError(
                f"{out_dir} holds embeddings made with other settings ({'; '.join(differences)}). "
                "Use another output folder, or pass --overwrite to replace them"
            )
    elif out_dir.exists() and any(p for p in out_dir.iterdir() if not p.name.startswith(".")):
        raise EmbedSettingsError(f"{out_dir} exists and is not a `decoder2vec embed` output; choose another folder")
    else:
        manifest = {"format": "decoder2vec-embeddings", "format_version": FORMAT_VERSION, "settings": identity}
    (out_dir / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    for leftover in [*out_dir.glob(".*.tmp-*"), *(out_dir / SHARDS_DIR).glob(".*.tmp-*")]:
        leftover.unlink()  # written by a run that was killed before its rename
    planned = {s.index: s for s in shards}
    kept = []
    for record in manifest.get("shards", []):
        shard = planned.get(record["index"])
        path = out_dir / record["file"]
        if shard is None or (shard.first_row, shard.rows) != (record["first_row"], record["input_rows"]):
            raise EmbedSettingsError(
                f"{out_dir}: shard {record['index']} no longer matches the input (rows {record['first_row']}.. then, "
                "now different): the input changed. Use another output folder, or pass --overwrite"
            )
        if path.is_file() and path.stat().st_size == record["bytes"] and _sha256(path) == record["sha256"]:
            kept.append(record)
    manifest["shards"] = kept
    return manifest


def _finish_manifest(manifest: dict, shards: list[Shard], extra: dict) -> dict:
    manifest["shards"].sort(key=lambda r: r["index"])
    done = len(manifest["shards"]) == len(shards)
    manifest.update(extra)
    manifest["complete"] = done
    manifest["rows"] = sum(r["rows"] for r in manifest["shards"])
    manifest["skipped_rows"] = sum(r["skipped_rows"] for r in manifest["shards"])
    manifest["planned_shards"] = len(shards)
    return manifest


# ---------------------------------------------------------------------- the job
def embed_corpus(
    input: str | os.PathLike,  # noqa: A002
    output_dir: str | os.PathLike,
    *,
    model: str | os.PathLike = "smollm2-135m",
    adapter: str | os.PathLike | list | None = None,
    encoder=None,
    dtype: str | None = None,
    device: str | None = None,
    engine: str = "local",
    address: str | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    encoder_options: dict | None = None,
    **settings,
) -> dict:
    """Embed every row of ``input`` into Parquet shards under ``output_dir``; return the manifest.

    ``settings`` are :class:`EmbedSettings` fields (``text_field``, ``id_field``, ``instruction``, ``normalize``,
    ``dimensions``, ``precision``, ``shard_size``, ``batch_size``, ``workers``, ``skip_bad_rows``, ...).
    The encoder is ``encoder`` (already loaded) or loaded from ``model``/``adapter``/``dtype``/``device``
    with ``encoder_options`` (EncoderConfig fields such as ``pooling``). ``engine`` is ``local`` or ``ray``
    (``address``: an existing Ray cluster; default: the one already initialised, else a local one).
    Rerunning the same call continues an interrupted run.
    """
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ValueError(
            "decoder2vec embed writes Parquet shards with pyarrow: pip install 'decoder2vec[data]'"
        ) from None
    config = EmbedSettings(**settings)
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', not {engine!r}")
    if encoder is not None:
        spec = EncoderSpec.of(encoder)
    else:
        adapters = (
            []
            if adapter is None
            else [os.fspath(a) for a in ([adapter] if isinstance(adapter, str | os.PathLike) else adapter)]
        )
        spec = EncoderSpec(os.fspath(model), adapters, dtype, device, dict(encoder_options or {}))
    out_dir = Path(output_dir)
    files = list_inputs(input, config.input_format)
    if config.id_field and any(f.format == "text" for f in files):
        raise ValueError(
            "--id-field needs JSONL, CSV/TSV, Parquet or hf: input; a text file's ids are its line numbers"
        )
    if engine == "ray":  # it plans while its actors start
        from .embed_ray import run_ray

        return run_ray(
            spec, files, os.fspath(input), out_dir, config, address=address, overwrite=overwrite, threads=threads
        )
    started = time.perf_counter()
    shards = plan_shards(files, config)
    planned_in = time.perf_counter() - started
    return _run_local(spec, encoder, shards, files, os.fspath(input), out_dir, config, overwrite, threads, planned_in)


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="embed", unit="row", disable=not enabled, smoothing=0.1)


def _run_local(spec, encoder, shards, files, source, out_dir, config, overwrite, threads, planned_in) -> dict:
    import torch

    started = time.perf_counter()
    workers = min(config.workers, len(shards))
    if workers == 1:
        if encoder is None:
            if threads:
                torch.set_num_threads(threads)
            encoder = spec.load()
        info = _encoder_info(encoder, spec)
        manifest, pending, extra = start_output(info, source, files, out_dir, config, shards, overwrite, "local")
        progress = _progress_bar(sum(s.rows - s.bad_rows for s in pending), config.progress)

        def record(shard: dict) -> None:  # in the embedder's helper thread, once the shard's file is in place
            manifest["shards"].append(shard)
            _write_manifest(out_dir, _finish_manifest(manifest, shards, extra))

        try:
            ShardEmbedder(encoder, config, out_dir).run(pending, record, progress.update)
        finally:
            progress.close()
    else:
        manifest = _run_processes(spec, shards, files, source, out_dir, config, overwrite, threads, workers)
    manifest = _finish_manifest(manifest, shards, {"seconds": round(time.perf_counter() - started + planned_in, 3)})
    _write_manifest(out_dir, manifest)
    return manifest


def start_output(info, source, files, out_dir, config, shards, overwrite, engine, workers=None):
    """The output folder's manifest for this job (new, or resumed if its identity matches), written at once.

    Returns (manifest, the shards still to embed, the manifest's run fields: dim, width, engine, versions).
    """
    identity = _identity(source, files, _model_record(info), config)
    manifest = _prepare_output(out_dir, identity, shards, overwrite)
    done = {r["index"] for r in manifest["shards"]}
    pending = [s for s in shards if s.index not in done]
    extra = {"dim": info["dim"], "width": output_width(info["dim"], config), "engine": engine}
    if workers is not None:
        extra["workers"] = workers
    extra["versions"] = _versions()
    _write_manifest(out_dir, _finish_manifest(manifest, shards, extra))
    return manifest, pending, extra


def _encoder_info(encoder, spec: EncoderSpec) -> dict:
    return {
        "source": spec.source,
        "adapters": spec.adapters,
        "dtype": _dtype_name(encoder),
        "config": asdict(encoder.config),
        "dim": encoder.dim,
    }


def output_width(dim: int, settings: EmbedSettings) -> int:
    """Values per stored vector: ``dimensions`` (or the model's) floats or bytes, or packed bits for binary."""
    width = settings.dimensions or dim
    return (width + 7) // 8 if settings.precision == "binary" else width


# ---------------------------------------------------------------------- several processes
def _worker_devices(spec: EncoderSpec, workers: int) -> list[str | None]:
    import torch

    wanted = spec.device
    if (wanted is None or wanted == "cuda") and torch.cuda.is_available():
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(workers)]
    return [wanted] * workers


def _run_processes(spec, shards, files, source, out_dir, config, overwrite, threads, workers) -> dict:
    import multiprocessing as mp

    import torch

    context = mp.get_context("spawn")
    tasks, results = context.Queue(), context.Queue()
    per_worker = max(1, (threads or torch.get_num_threads()) // workers)
    processes = [
        context.Process(
            target=_worker_main,
            args=(asdict(spec), asdict(config), str(out_dir), device, per_worker, tasks, results),
            daemon=True,
        )
        for device in _worker_devices(spec, workers)
    ]
    for process in processes:
        process.start()
    progress = None
    try:
        info = _receive(results, processes, "ready")
        manifest, pending, extra = start_output(
            info, source, files, out_dir, config, shards, overwrite, "local", workers
        )
        for shard in pending:
            tasks.put(asdict(shard))
        for _ in processes:
            tasks.put(None)
        progress = _progress_bar(sum(s.rows - s.bad_rows for s in pending), config.progress)
        remaining = len(pending)
        while remaining:
            kind, payload = _receive_any(results, processes)
            if kind == "rows":
                progress.update(payload)
            elif kind == "shard":
                manifest["shards"].append(payload)
                _write_manifest(out_dir, _finish_manifest(manifest, shards, extra))
                remaining -= 1
        for process in processes:
            process.join(timeout=60)
        return manifest
    finally:
        if progress is not None:
            progress.close()
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)


def _receive_any(results, processes):
    import queue

    while True:
        try:
            kind, payload = results.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"embedding worker {dead[0].pid} died (exit code {dead[0].exitcode})") from None
            continue
        if kind == "error":
            error_type, message = payload
            raise {"CorpusError": CorpusError, "ValueError": ValueError}.get(error_type, RuntimeError)(message)
        return kind, payload


def _receive(results, processes, wanted: str):
    while True:
        kind, payload = _receive_any(results, processes)
        if kind == wanted:
            return payload


def _worker_main(spec: dict, settings: dict, out_dir: str, device, threads: int, tasks, results) -> None:
    """One embedding process: load the encoder, then embed the shards it is handed until None."""
    try:
        import torch

        torch.set_num_threads(threads)
        encoder_spec = EncoderSpec(**spec)
        config = EmbedSettings(**settings)
        encoder = encoder_spec.load(device)
        results.put(("ready", _encoder_info(encoder, encoder_spec)))
        ShardEmbedder(encoder, config, out_dir).run(
            (Shard(**task) for task in iter(tasks.get, None)),
            lambda record: results.put(("shard", record)),
            lambda rows: results.put(("rows", rows)),
        )
    except Exception as error:  # reported to the parent, which raises it
        import traceback

        message = str(error) if isinstance(error, ValueError) else traceback.format_exc()
        results.put(("error", (type(error).__name__, message)))


# ---------------------------------------------------------------------- reading the output
def read_embeddings(output_dir: str | os.PathLike, columns: list[str] | None = None):
    """The shards listed in the manifest as one pyarrow Table (in shard order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = read_manifest(output_dir)
    tables = [pq.read_table(Path(output_dir) / r["file"], columns=columns) for r in manifest["shards"]]
    return pa.concat_tables(tables) if tables else None


# ---------------------------------------------------------------------- command line
def _embed_command(args) -> None:
    from .model import EncoderConfig

    options = {f: getattr(args, f) for f in EncoderConfig.__dataclass_fields__ if getattr(args, f, None) is not None}
    if args.causal:
        options["bidirectional"] = False
    options.update({k: getattr(args, k) for k in ("quantize", "backend") if getattr(args, k, None)})  # load options
    manifest = embed_corpus(
        args.input,
        args.output,
        model=args.model,
        adapter=args.adapter,
        dtype=args.dtype,
        device=args.device,
        encoder_options=options,
        engine=args.engine,
        address=args.address,
        overwrite=args.overwrite,
        threads=args.threads,
        text_field=args.text_field,
        id_field=args.id_field,
        input_format=args.input_format,
        instruction=args.instruction,
        normalize=args.normalize,
        dimensions=args.dimensions,
        precision=args.precision,
        shard_size=args.shard_size,
        store_text=not args.no_text,
        batch_size=args.batch_size,
        workers=args.workers,
        skip_bad_rows=args.skip_bad_rows,
    )
    summary = {k: manifest.get(k) for k in ("rows", "skipped_rows", "planned_shards", "complete", "seconds")}
    print(json.dumps({**summary, "output": str(args.output)}))


def register(subparsers) -> None:
    from .cli import add_model_arguments

    parser = subparsers.add_parser("embed", help="embed a corpus into Parquet shards (resumable, parallel, Ray)")
    parser.add_argument("input", help="text/JSONL/CSV/TSV/Parquet file, a folder of them, or hf:NAME[:CONFIG][:SPLIT]")
    parser.add_argument("-o", "--output", required=True, help="output folder (shards/ and manifest.json)")
    parser.add_argument("--text-field", default="text", help="JSONL key / column holding the text (default: text)")
    parser.add_argument("--id-field", default=None, help="JSONL key / column holding the id (default: row number)")
    parser.add_argument("--input-format", choices=INPUT_FORMATS[:-1], default=None, help="default: from the suffix")
    parser.add_argument("--instruction", default=None, help="instruction the model reads before every text")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--normalize", action="store_true", help="L2-normalize the vectors")
    parser.add_argument("--dimensions", type=int, default=None, help="keep the first N values (Matryoshka)")
    parser.add_argument("--precision", default="float32", help="float32 | int8 | uint8 | binary (packed bits)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="input rows per Parquet shard")
    parser.add_argument("--no-text", action="store_true", help="do not store the texts next to their vectors")
    parser.add_argument("--workers", type=int, default=1, help="processes (CPU: threads split; CUDA: one per GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in all (default: torch's)")
    parser.add_argument("--skip-bad-rows", action="store_true", help="leave bad rows out (counted) instead of failing")
    parser.add_argument("--overwrite", action="store_true", help="replace embeddings made with other settings")
    parser.add_argument("--engine", choices=("local", "ray"), default="local")
    parser.add_argument("--address", default=None, help="Ray cluster address (--engine ray; default: local/auto)")
    add_model_arguments(parser)
    parser.set_defaults(handler=_embed_command)
