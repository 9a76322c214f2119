"""Every data set the project names, declared once, and where to find it: a local folder or the Hugging Face hub.

Each :class:`DatasetEntry` says which file it is in a data folder (the layout of the project's shared data:
``sts/stsb_test.tsv``, ``text/wiki_sentences.txt``, ...), in which format and encoding, and which public
Hugging Face dataset the same rows come from (:class:`HubSource`: id, config, split, columns) together with
the writer that turns those rows into the local file format. :func:`resolve_dataset` finds the file::

    from decoder2vec.catalog import resolve_dataset

    resolve_dataset("stsb", "test")                   # -> Path(.../sts/stsb_test.tsv)
    resolve_dataset("mntp")                           # the MNTP training text (WikiText-2 validation)
    resolve_dataset("stsb", "test", data_dir="data")  # a data folder given explicitly (--data-dir)

Resolution order, first hit wins:

1. an explicit ``path`` (a file the user named; missing means an error, nothing else is tried);
2. the data folder: ``data_dir`` (``--data-dir``), else ``$DECODER2VEC_DATA``;
3. the converted copy in the cache, ``$DECODER2VEC_CACHE/data`` (default ``~/.cache/decoder2vec/data``);
4. the hub through ``datasets`` (``pip install "decoder2vec[data]"``): loaded once, converted to the local
   format and written atomically into the cache, so later runs take step 3.

``DECODER2VEC_HUB=off`` turns step 4 off. Where no step finds the file, :class:`DatasetNotFoundError` names
the data set, the file looked for, why the hub could not serve it, and both ways to provide it.
A hub copy holds the same rows as the shared files but need not be byte-identical (see each entry's notes).

``python -m decoder2vec.catalog`` lists the data sets; ``python -m decoder2vec.catalog stsb:test mntp``
resolves (and so downloads, where needed) the named ones and prints their paths.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

__all__ = [
    "ALIASES",
    "DATASETS",
    "DatasetEntry",
    "DatasetNotFoundError",
    "HubSource",
    "data_folder",
    "dataset_entry",
    "entry_for_file",
    "resolve_dataset",
    "resolve_file",
]

DATA_ENV = "DECODER2VEC_DATA"
HUB_ENV = "DECODER2VEC_HUB"
INSTALL_HINT = 'pip install "decoder2vec[data]"  (or: pip install datasets)'


class DatasetNotFoundError(FileNotFoundError):
    """A data set is neither in a local folder nor reachable on the hub. The message says how to provide it."""


@dataclass(frozen=True)
class HubSource:
    """Where the rows of a data set live on the Hugging Face hub, as ``datasets.load_dataset`` takes them."""

    id: str  # the dataset repository, e.g. "sentence-transformers/stsb"
    split: str  # a split expression: "test", "train+validation"
    columns: tuple[str, ...]  # the columns the writer reads, in the order it reads them
    config: str | None = None  # the dataset's configuration (subset), e.g. "wikitext-2-v1"
    revision: str | None = None  # "refs/convert/parquet": the hub's parquet export of a script-based dataset
    data_dir: str | None = None
    data_files: str | None = None
    rows: int | None = None  # keep only the first N rows (our copy is a prefix of the hub's)

    def describe(self) -> str:
        parts = [self.id] + [f"{key} {value}" for key, value in self._options().items()]
        return f"{parts[0]} ({', '.join(parts[1:])})" if len(parts) > 1 else parts[0]

    def _options(self) -> dict:
        options = {"config": self.config, "split": self.split, "revision": self.revision}
        options |= {"data_dir": self.data_dir, "data_files": self.data_files, "first rows": self.rows}
        return {key: value for key, value in options.items() if value is not None}


@dataclass
class DatasetEntry:
    """One data set split: its local file, the format of that file, and the hub rows it can be rebuilt from."""

    name: str  # e.g. "stsb"
    split: str  # e.g. "test"
    file: str  # path relative to the data folder, e.g. "sts/stsb_test.tsv"
    format: str  # a key of FORMATS: how hub rows become lines of the local file
    hub: HubSource
    encoding: str = "utf-8"
    description: str = ""
    options: dict = field(default_factory=dict)  # extra keyword arguments for the format's writer
    notes: str = ""  # how the hub copy differs from the shared file, where it does

    @property
    def key(self) -> str:
        return f"{self.name}:{self.split}"


# ---------------------------------------------------------------------- writers: hub rows -> local lines
def _cell(value) -> str:
    """A TSV cell: tabs and line breaks inside a text would break the row, so they become spaces."""
    return " ".join(str(value).replace("\t", " ").splitlines())


def _text_lines(rows, columns, labels) -> Iterator[str]:
    """One text a line (SimCSE sentences); empty texts are dropped."""
    for row in rows:
        text = _cell(row[columns[0]]).strip()
        if text:
            yield text


def _wikitext(rows, columns, labels) -> Iterator[str]:
    """WikiText rows are the release's lines (headings `` = Title = `` included): written as they are."""
    for row in rows:
        yield row[columns[0]].rstrip("\n")


def _sts_tsv(rows, columns, labels, scale: float = 1.0) -> Iterator[str]:
    """``sentence1, sentence2, score`` TSV; ``scale`` maps the hub's score range onto the local one."""
    first, second, score = columns
    yield "sentence1\tsentence2\tscore"
    for row in rows:
        value = round(float(row[score]) * scale, 4)
        yield f"{_cell(row[first])}\t{_cell(row[second])}\t{value:g}"


def _mrpc_tsv(rows, columns, labels) -> Iterator[str]:
    """MRPC's own layout (``Quality, #1 ID, #2 ID, #1 String, #2 String``); the hub has no MSR ids: left empty."""
    first, second, label = columns
    yield "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    for row in rows:
        quality = int(row[label])
        if quality not in (0, 1):
            raise ValueError(f"label {row[label]!r} is not 0 or 1 (a test split without labels?)")
        yield f"{quality}\t\t\t{_cell(row[first])}\t{_cell(row[second])}"


def _trec(rows, columns, labels) -> Iterator[str]:
    """``COARSE:fine question`` a line, as in the TREC release; fine label names carry their coarse class."""
    text, fine = columns
    names = labels.get(fine)
    for row in rows:
        label = names[row[fine]] if names and isinstance(row[fine], int) else str(row[fine])
        yield f"{label} {_cell(row[text]).strip()}"


def _conll(rows, columns, labels) -> Iterator[str]:
    """``word POS chunk NER`` a line, a blank line after each sentence (the hub rows have no -DOCSTART- lines)."""
    for row in rows:
        tags = []
        for column in columns:
            names = labels.get(column)
            tags.append([names[value] if names and isinstance(value, int) else str(value) for value in row[column]])
        for cells in zip(*tags, strict=True):
            yield " ".join(cells)
        yield ""


FORMATS: dict[str, Callable[..., Iterable[str]]] = {
    "text-lines": _text_lines,
    "wikitext": _wikitext,
    "sts-tsv": _sts_tsv,
    "mrpc-tsv": _mrpc_tsv,
    "trec": _trec,
    "conll": _conll,
}

# ---------------------------------------------------------------------- the catalog
_STSB = "sentence-transformers/stsb"
_STSB_NOTE = "hub scores are normalized to 0-1 and scaled back to 0-5 here; the genre column is not on the hub"
_MRPC_NOTE = "the hub copy has no MSR sentence ids (empty columns)"
_CONLL = ("tokens", "pos_tags", "chunk_tags", "ner_tags")
_CONLL_NOTE = "the hub rows have no -DOCSTART- document lines (readers skip them anyway)"


def _conll_entry(split: str, hub_split: str, original: str) -> DatasetEntry:
    return DatasetEntry(
        "conll2003",
        split,
        f"conll2003/{split}.txt",
        "conll",
        HubSource("eriktks/conll2003", hub_split, _CONLL, revision="refs/convert/parquet", data_dir="conll2003"),
        description=f"CoNLL-2003 English NER {original} (word POS chunk NER, IOB2)",
        notes=_CONLL_NOTE,
    )


DATASETS: dict[str, DatasetEntry] = {
    entry.key: entry
    for entry in (
        *(
            DatasetEntry(
                "wikitext2",
                split,
                f"text/wikitext2_{split}.tokens",
                "wikitext",
                HubSource("Salesforce/wikitext", hub_split, ("text",), config="wikitext-2-v1"),
                description=f"WikiText-2 {hub_split}, tokenized release{role}",
            )
            for split, hub_split, role in (("valid", "validation", " (the MNTP training text)"), ("test", "test", ""))
        ),
        DatasetEntry(
            "wiki-sentences",
            "train",
            "text/wiki_sentences.txt",
            "text-lines",
            HubSource(
                "princeton-nlp/datasets-for-simcse",
                "train",
                ("text",),
                data_files="wiki1m_for_simcse.txt",
                rows=11_913,
            ),
            description="first 11,913 sentences of SimCSE's 1M Wikipedia sentences (the SimCSE training text)",
        ),
        *(
            DatasetEntry(
                "stsb",
                split,
                f"sts/stsb_{split}.tsv",
                "sts-tsv",
                HubSource(_STSB, hub_split, ("sentence1", "sentence2", "score")),
                description=f"STS Benchmark {split} pairs, scores 0-5",
                options={"scale": 5.0},
                notes=_STSB_NOTE,
            )
            for split, hub_split in (("train", "train"), ("dev", "validation"), ("test", "test"))
        ),
        DatasetEntry(
            "sickr",
            "test",
            "sts/sickr_test.tsv",
            "sts-tsv",
            HubSource("mteb/sickr-sts", "test", ("sentence1", "sentence2", "score")),
            description="SICK relatedness test pairs, scores 1-5",
            notes="the entailment column is not on the hub",
        ),
        *(
            DatasetEntry(
                "trec",
                split,
                f"classification/trec_{split}.label",
                "trec",
                HubSource("CogComp/trec", split, ("text", "fine_label"), revision="refs/convert/parquet"),
                encoding="latin-1",
                description=f"TREC question classification {split} (COARSE:fine question, Latin-1)",
            )
            for split in ("train", "test")
        ),
        *(
            DatasetEntry(
                "mrpc",
                split,
                f"pairs/mrpc_{split}.txt",
                "mrpc-tsv",
                HubSource("SetFit/mrpc", hub_split, ("text1", "text2", "label")),
                description=f"Microsoft Research Paraphrase Corpus {split} pairs",
                notes=_MRPC_NOTE,
            )
            for split, hub_split in (("train", "train+validation"), ("test", "test"))
        ),
        _conll_entry("train", "train", "eng.train"),
        _conll_entry("dev", "validation", "eng.testa"),
        _conll_entry("test", "test", "eng.testb"),
    )
}

# names for what a stage reads, so callers need not know which corpus it is
ALIASES: dict[str, str] = {"mntp": "wikitext2:valid", "simcse": "wiki-sentences:train"}


def dataset_entry(name: str, split: str | None = None) -> DatasetEntry:
    """The catalog entry for ``name`` (``"stsb"``, ``"stsb:test"`` or an alias such as ``"mntp"``) and ``split``.

    Without a split: the name's only split, else its ``test`` split.
    """
    name = ALIASES.get(name, name)
    if ":" in name:
        name, _, given = name.partition(":")
        if split is not None and split != given:
            raise ValueError(f"dataset {name!r}: split given twice ({given!r} and {split!r})")
        split = given
    splits = [entry.split for entry in DATASETS.values() if entry.name == name]
    if not splits:
        names = sorted({entry.name for entry in DATASETS.values()} | set(ALIASES))
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(names)}")
    if split is None:
        split = splits[0] if len(splits) == 1 else "test"
    if f"{name}:{split}" not in DATASETS:
        raise ValueError(f"dataset {name!r} has no split {split!r}; its splits: {', '.join(splits)}")
    return DATASETS[f"{name}:{split}"]


def entry_for_file(relative: str | os.PathLike) -> DatasetEntry | None:
    """The entry whose local file is ``relative`` (a path inside the data folder), or None."""
    wanted = Path(relative).as_posix()
    return next((entry for entry in DATASETS.values() if entry.file == wanted), None)


def data_folder(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local data folder: ``data_dir`` when given, else ``$DECODER2VEC_DATA``, else None."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return None


def hub_cache_folder() -> Path:
    """Where data sets loaded from the hub are kept, converted: ``<cache_dir()>/data`` (same layout)."""
    from .sources import cache_dir

    return cache_dir() / "data"


# ---------------------------------------------------------------------- resolution
def resolve_dataset(
    name: str,
    split: str | None = None,
    data_dir: str | os.PathLike | None = None,
    *,
    path: str | os.PathLike | None = None,
    hub: bool = True,
) -> Path:
    """The local file of data set ``name`` (split ``split``): explicit ``path`` -> data folder -> cache -> hub.

    ``data_dir`` is the ``--data-dir`` option (None: ``$DECODER2VEC_DATA``); ``hub=False`` never downloads.
    Raises :class:`DatasetNotFoundError` (a ``FileNotFoundError``) saying how to provide the file.
    """
    entry = dataset_entry(name, split)
    if path is not None:
        explicit = Path(path).expanduser()
        if explicit.is_file():
            return explicit
        raise DatasetNotFoundError(f"{entry.name} {entry.split} file {str(path)!r} not found; check the path")
    return _resolve(entry, data_dir, hub)


def resolve_file(relative: str | os.PathLike, data_dir: str | os.PathLike | None = None, *, hub: bool = True) -> Path:
    """``relative`` inside the data folder; a catalog file missing there comes from the cache or the hub.

    A file the catalog does not know is returned as ``<data folder>/relative`` whether or not it exists
    (or as the path itself when it is absolute or there is no data folder).
    """
    entry = None if Path(relative).is_absolute() else entry_for_file(relative)
    if entry is not None:
        return _resolve(entry, data_dir, hub)
    folder = data_folder(data_dir)
    return folder / relative if folder is not None else Path(relative)


def _resolve(entry: DatasetEntry, data_dir, hub: bool) -> Path:
    folder = data_folder(data_dir)
    if folder is not None and (folder / entry.file).is_file():
        return folder / entry.file
    cached = hub_cache_folder() / entry.file
    if cached.is_file():
        return cached
    if not hub or os.environ.get(HUB_ENV, "").lower() in ("0", "off", "false", "no"):
        reason = "the hub is turned off (hub=False or DECODER2VEC_HUB=off)"
    else:
        try:
            return _download(entry, cached)
        except _HubUnavailable as error:
            reason = str(error)
    raise DatasetNotFoundError(_not_found_message(entry, folder, cached, reason))


def _not_found_message(entry: DatasetEntry, folder: Path | None, cached: Path, reason: str) -> str:
    where = (
        f"{folder / entry.file} does not exist (data folder from --data-dir or {DATA_ENV})"
        if folder is not None
        else f"no data folder was given (--data-dir or {DATA_ENV})"
    )
    return (
        f"dataset {entry.key} ({entry.description}) not found: it is read from the file {entry.file!r} "
        f"in a data folder, and {where}; the hub could not supply it either: {reason}.\n"
        "Provide it in one of two ways:\n"
        f"  1. a local copy: pass --data-dir DIR or set {DATA_ENV}=DIR, where DIR/{entry.file} exists "
        "(the layout of the project's shared data folder);\n"
        f"  2. the Hugging Face hub: a network connection and {INSTALL_HINT}; "
        f"{entry.hub.describe()} is then loaded once and kept converted in {cached}."
    )


class _HubUnavailable(Exception):
    pass


def _download(entry: DatasetEntry, target: Path) -> Path:
    """Load ``entry`` from the hub, convert it to the local format, write it to ``target`` atomically."""
    try:
        import datasets
    except ImportError:
        raise _HubUnavailable(f"the `datasets` package is not installed ({INSTALL_HINT})") from None
    _check_hub_reachable()
    source = entry.hub
    options = {"revision": source.revision, "data_dir": source.data_dir, "data_files": source.data_files}
    try:
        loaded = datasets.load_dataset(
            source.id, source.config, split=source.split, **{k: v for k, v in options.items() if v is not None}
        )
    except Exception as error:  # network, missing repository, changed layout: all end in the same advice
        raise _HubUnavailable(f"loading {source.describe()} failed: {type(error).__name__}: {error}") from None
    missing = [column for column in source.columns if column not in loaded.column_names]
    if missing:
        raise _HubUnavailable(
            f"{source.id} has no column(s) {', '.join(missing)}; its columns: {', '.join(loaded.column_names)}"
        )
    if source.rows is not None:
        loaded = loaded.select(range(min(source.rows, len(loaded))))
    labels = {column: _label_names(loaded.features.get(column)) for column in source.columns}
    lines = FORMATS[entry.format](iter(loaded), source.columns, labels, **entry.options)
    text = "".join(f"{line}\n" for line in lines)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(text.encode(entry.encoding, errors="replace"))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _label_names(feature) -> list[str] | None:
    """Names of a ClassLabel column, or of a list-of-ClassLabel column (CoNLL tags); None for other columns."""
    inner = getattr(feature, "feature", feature)  # List(ClassLabel) / Sequence(ClassLabel) hold it in .feature
    names = getattr(inner, "names", None)
    return list(names) if names else None


def _check_hub_reachable(timeout: float = 5.0) -> None:
    """Fail within seconds when the hub's host cannot be reached, instead of waiting out retries.

    Skipped in the hub libraries' offline mode (``datasets`` may then load from its own cache) and behind a
    proxy (a direct connection says nothing there).
    """
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if any(os.environ.get(flag, "").upper() in ("1", "ON", "YES", "TRUE") for flag in flags):
        return
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as error:
        raise _HubUnavailable(
            f"the hub ({endpoint.scheme}://{endpoint.netloc}) cannot be reached: {error or type(error).__name__}"
        ) from None


# ---------------------------------------------------------------------- python -m decoder2vec.catalog
def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        folder = data_folder()
        print(f"data folder: {folder or f'none ({DATA_ENV} unset)'}; hub cache: {hub_cache_folder()}\n")
        print("| dataset | file | hub source |\n|---|---|---|")
        for entry in DATASETS.values():
            print(f"| {entry.key} | {entry.file} | {entry.hub.describe()} |")
        print(f"\naliases: {', '.join(f'{a} = {t}' for a, t in ALIASES.items())}")
        print(
            "usage: python -m decoder2vec.catalog NAME[:SPLIT] ...  (prints each file's path, downloading it if needed)"
        )
        return 0
    try:
        for name in args:
            print(resolve_dataset(name))
    except (DatasetNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
