"""Training data: readers for unlabeled text and for (query, positive[, negative]) rows, and packing.

Unlabeled text (MNTP, SimCSE) comes from:

* plain text files: one sentence or document a line (``.txt`` and anything not listed below);
* WikiText files (``.tokens``, or any file whose first heading is `` = Title = ``): one document per article;
* JSONL files (``.jsonl``, ``.json``): one object a line with a text field (``text`` unless told);
* Hugging Face datasets, for users with a network: ``hf:NAME[:CONFIG][:SPLIT]`` (needs ``datasets``);
* the project's data catalog: ``data:NAME[:SPLIT]``, e.g. ``data:mntp`` or ``data:wikitext2:valid``
  (:func:`decoder2vec.catalog.resolve_dataset`: the data folder, else the hub).

Supervised rows come from TSV (a header naming the columns, or 2-3 columns without one) or JSONL.
Every reader raises :class:`DataError` naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ContrastiveRow", "DataError", "pack_documents", "read_rows", "read_texts"]

_WIKITEXT_TITLE = re.compile(r"^\s*= [^=].*[^=] =\s*$")  # a top-level heading; sections use ' = = Section = = '


class DataError(ValueError):
    """A training data file is missing, empty or malformed. The message says which and how to fix it."""


@dataclass
class ContrastiveRow:
    """One supervised example: the query reads the instruction, the documents do not."""

    query: str
    positive: str
    negative: str | None = None


# ---------------------------------------------------------------------- unlabeled text
def read_texts(source: str, *, text_field: str = "text", documents: bool = True) -> list[str]:
    """Texts from a file or ``hf:`` dataset, in file order, empty ones dropped.

    With ``documents`` a WikiText file yields one text per article (for MNTP packing); without it, one
    text per non-heading line (sentences for SimCSE).
    """
    if source.startswith("hf:"):
        return _read_hf(source[3:], text_field)
    path = _existing(source)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        texts = [_field(obj, text_field, path, line) for line, obj in _json_lines(path)]
    else:
        lines = _read_lines(path)
        if suffix == ".tokens" or any(_WIKITEXT_TITLE.match(line) for line in lines[:20]):
            texts = _wikitext(lines) if documents else [ln.strip() for ln in lines if not ln.lstrip().startswith("=")]
        else:
            texts = [line.strip() for line in lines]
    texts = [text for text in texts if text]
    if not texts:
        raise DataError(
            f"{path} holds no text; expected one sentence or document a line (or JSONL with {text_field!r})"
        )
    return texts


def _wikitext(lines: list[str]) -> list[str]:
    """WikiText articles: a new document starts at each ' = Title = ' heading; section headings stay inside."""
    articles, current = [], []
    for line in lines:
        if _WIKITEXT_TITLE.match(line) and current:
            articles.append(" ".join(current))
            current = []
        if line.strip() and not line.lstrip().startswith("="):
            current.append(line.strip())
    if current:
        articles.append(" ".join(current))
    return articles


def _read_hf(spec: str, text_field: str) -> list[str]:
    from ..catalog import INSTALL_HINT

    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{spec} needs the `datasets` package: {INSTALL_HINT}") from None
    name, config, split = ([*spec.split(":"), None, None])[:3]
    dataset = datasets.load_dataset(name, config or None, split=split or "train")
    if text_field not in dataset.column_names:
        raise DataError(
            f"dataset {name!r} has no column {text_field!r}; its columns: {', '.join(dataset.column_names)}"
        )
    return [text for text in dataset[text_field] if isinstance(text, str) and text.strip()]


def pack_documents(
    documents: list[list[int]], max_seq_length: int, *, separator: int | None = None
) -> list[list[int]]:
    """Concatenate token lists (``separator`` between documents) and cut them into ``max_seq_length`` chunks.

    Long documents span several chunks, short ones share a chunk; only the final chunk may be shorter.
    """
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be >= 2, not {max_seq_length}")
    stream: list[int] = []
    for ids in documents:
        stream.extend(ids)
        if separator is not None and (not ids or ids[-1] != separator):
            stream.append(separator)
    return [stream[i : i + max_seq_length] for i in range(0, len(stream), max_seq_length) if i + 1 < len(stream)]


# ---------------------------------------------------------------------- supervised rows
def read_rows(
    source: str,
    *,
    query_field: str = "query",
    positive_field: str = "positive",
    negative_field: str = "negative",
) -> list[ContrastiveRow]:
    """(query, positive[, negative]) rows from a TSV or JSONL file.

    A TSV either has a header naming ``query_field`` and ``positive_field`` (``negative_field`` optional)
    or no header and 2 or 3 columns in that order. Either every row has a hard negative or none does.
    """
    path = _existing(source)
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for line, obj in _json_lines(path):
            negative = obj.get(negative_field) if isinstance(obj, dict) else None
            if isinstance(negative, list):  # several hard negatives: the first one is used
                negative = negative[0] if negative else None
            rows.append(
                ContrastiveRow(_field(obj, query_field, path, line), _field(obj, positive_field, path, line), negative)
            )
    else:
        rows = _tsv_rows(path, query_field, positive_field, negative_field)
    if not rows:
        raise DataError(f"{path} has no rows")
    with_negative = sum(row.negative is not None for row in rows)
    if 0 < with_negative < len(rows):
        raise DataError(
            f"{path}: {with_negative} of {len(rows)} rows have a hard negative; give one to every row or to none"
        )
    return rows


def _tsv_rows(path: Path, query_field: str, positive_field: str, negative_field: str) -> list[ContrastiveRow]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        table = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    table = [row for row in table if any(cell.strip() for cell in row)]
    if not table:
        raise DataError(f"{path} is empty")
    header = table[0]
    if query_field in header and positive_field in header:
        columns = [header.index(query_field), header.index(positive_field)]
        columns.append(header.index(negative_field) if negative_field in header else None)
        body, first_line = table[1:], 2
    else:
        if len(header) not in (2, 3):
            raise DataError(
                f"{path}: expected a header with {query_field!r} and {positive_field!r} columns, "
                f"or 2-3 tab-separated columns (query, positive[, negative]); line 1 has {len(header)}"
            )
        columns = [0, 1, 2 if len(header) == 3 else None]
        body, first_line = table, 1
    rows = []
    for line, cells in enumerate(body, start=first_line):
        needed = max(c for c in columns if c is not None)
        if len(cells) <= needed:
            raise DataError(f"{path}:{line}: {len(cells)} column(s), expected {needed + 1} (tab-separated)")
        negative = cells[columns[2]] if columns[2] is not None else None
        rows.append(ContrastiveRow(cells[columns[0]], cells[columns[1]], negative))
    return rows


# ---------------------------------------------------------------------- helpers
def _existing(source: str) -> Path:
    if source.startswith("data:"):
        from ..catalog import resolve_dataset

        try:
            return resolve_dataset(source[5:])
        except ValueError as error:
            raise DataError(f"{source!r}: {error}") from None
    path = Path(source)
    if not path.is_file():
        hint = " (a Hugging Face dataset is written hf:NAME[:CONFIG][:SPLIT], a catalog one data:NAME[:SPLIT])"
        hint = hint if not path.suffix else ""
        raise DataError(f"data file {source!r} not found{hint}")
    return path


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error}); convert it, e.g. iconv -f latin1 -t utf-8") from None


def _json_lines(path: Path):
    for line, text in enumerate(_read_lines(path), start=1):
        if not text.strip():
            continue
        try:
            yield line, json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{line}: not valid JSON ({error.msg}); JSONL needs one object a line") from None


def _field(obj, name: str, path: Path, line: int) -> str:
    if not isinstance(obj, dict) or name not in obj:
        keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path}:{line}: no field {name!r} (found: {keys}); set the field name option")
    value = obj[name]
    if not isinstance(value, str):
        raise DataError(f"{path}:{line}: field {name!r} is a {type(value).__name__}, expected a string")
    return value
