"""The task registry: a task is a name, a task type and the files it reads; users add one by pointing at files.

Two tables drive everything. :data:`TASK_TYPES` maps a type (``sts``, ``retrieval``, ``classification``,
``clustering``, ``pairs``, ``word``) to the file roles it needs and a function that builds its evaluator.
:data:`TASKS` maps a task name to a :class:`TaskSpec`; the built-in ones read the shared data folder.

Add a task from Python with :func:`register_task`, from a JSON/YAML file with :func:`load_task_file`::

    [{"name": "mysts", "type": "sts", "files": {"test": "my_sts.tsv"}},
     {"name": "news", "type": "classification", "files": {"train": "train.tsv", "test": "test.tsv"},
      "instruction": "Classify the topic of the news headline", "options": {"examples_per_class": 16}}]

or on the command line with :func:`parse_task_option`: ``--task mysts=sts:my_sts.tsv`` (files in role order,
comma-separated: ``news=classification:train.tsv,test.tsv``).

Instructions: each task has a default query instruction (in the spirit of the LLM2Vec MTEB prompts, our
own wording). Symmetric tasks (STS, pairs, classification, clustering) put it before every text; retrieval
puts it before queries only. Documents never get one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import option

__all__ = [
    "TASKS",
    "TASK_TYPES",
    "TaskSpec",
    "TaskType",
    "build_evaluator",
    "default_data_dir",
    "load_task_file",
    "parse_task_option",
    "register_task",
    "register_task_type",
    "resolve_task_files",
    "resolve_tasks",
    "subsample",
]


@dataclass
class TaskSpec:
    """One evaluation task: which evaluator runs on which files with which default instruction."""

    name: str = option(help="short name used in --tasks and in reports, e.g. stsb")
    type: str = option(help="task type: a key of TASK_TYPES (sts | retrieval | classification | clustering | ...)")
    files: dict[str, str] = option(
        default_factory=dict, help="role -> path; relative paths are relative to the data folder"
    )
    instruction: str | None = option(None, help="default query instruction; None: no instruction")
    encoding: str = option("utf-8", help="text encoding of the files (TREC from SentEval is latin-1)")
    format: str = option("auto", help="file format where a type reads several (classification: auto | tsv | trec)")
    options: dict[str, Any] = option(
        default_factory=dict, help="extra keyword arguments for the evaluator, e.g. examples_per_class"
    )
    description: str = option("", help="one line on what the task measures")

    def __post_init__(self):
        if not self.name or any(c in self.name for c in ",=: "):
            raise ValueError(f"task name {self.name!r} must be non-empty without spaces, commas, '=' or ':'")
        if self.type not in TASK_TYPES:
            raise ValueError(f"task {self.name!r}: unknown type {self.type!r}; choose one of: {', '.join(TASK_TYPES)}")
        roles = TASK_TYPES[self.type].roles
        if set(self.files) != set(roles):
            raise ValueError(
                f"task {self.name!r} of type {self.type} needs files for {', '.join(roles)}, got {sorted(self.files)}"
            )


@dataclass
class TaskType:
    """How to evaluate one kind of task: the files it needs (in order) and how to build its evaluator."""

    roles: tuple[str, ...]
    build: Callable[..., Any]  # (paths: dict[role, Path], spec, instruction, batch_size, limit) -> evaluator
    main_metric: str
    description: str = ""


def subsample(data, limit: int | None, seed: int = 0):
    """A seeded random ``limit`` examples of ``data`` (in file order), for quick runs; ``data`` when None.

    ``data`` is a dataclass whose list fields run in parallel (STSPairs, LabelledTexts, LabelledPairs), or
    RetrievalData, whose judged queries are sampled (the corpus stays whole).
    """
    if limit is None:
        return data
    if limit < 1:
        raise ValueError(f"limit must be a positive number of examples, not {limit}")
    if hasattr(data, "qrels"):
        query_ids = list(data.qrels)
        keep = [query_ids[i] for i in _sample_indices(len(query_ids), limit, seed)]
        return dataclasses.replace(data, qrels={q: data.qrels[q] for q in keep})
    columns = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
    size = len(next(iter(columns.values())))
    indices = _sample_indices(size, limit, seed)
    return dataclasses.replace(data, **{name: [values[i] for i in indices] for name, values in columns.items()})


def _sample_indices(size: int, limit: int, seed: int) -> list[int]:
    import numpy as np

    if limit >= size:
        return list(range(size))
    return sorted(np.random.default_rng(seed).choice(size, limit, replace=False).tolist())


def _build_sts(paths, spec, instruction, batch_size, limit):
    from .sts import STSEvaluator, read_sts_tsv

    pairs = subsample(read_sts_tsv(paths["test"]), limit)
    return STSEvaluator(pairs, instruction=instruction, batch_size=batch_size, **spec.options)


def _build_retrieval(paths, spec, instruction, batch_size, limit):
    from .retrieval import RetrievalEvaluator, read_beir_folder

    options = dict(spec.options)
    data = subsample(read_beir_folder(paths["folder"], split=options.pop("split", "test")), limit)
    return RetrievalEvaluator(data, query_instruction=instruction, batch_size=batch_size, **options)


def _read_labelled(path, spec, limit):
    from .classification import read_labelled_texts

    return subsample(read_labelled_texts(path, format=spec.format, encoding=spec.encoding), limit)


def _build_classification(paths, spec, instruction, batch_size, limit):
    from .classification import ClassificationEvaluator

    train, test = _read_labelled(paths["train"], spec, limit), _read_labelled(paths["test"], spec, limit)
    return ClassificationEvaluator(train, test, instruction=instruction, batch_size=batch_size, **spec.options)


def _build_clustering(paths, spec, instruction, batch_size, limit):
    from .clustering import ClusteringEvaluator

    data = _read_labelled(paths["test"], spec, limit)
    return ClusteringEvaluator(data, instruction=instruction, batch_size=batch_size, **spec.options)


def _build_pairs(paths, spec, instruction, batch_size, limit):
    from .pairs import PairClassificationEvaluator, read_pairs_tsv

    pairs = subsample(read_pairs_tsv(paths["test"], encoding=spec.encoding), limit)
    return PairClassificationEvaluator(pairs, instruction=instruction, batch_size=batch_size, **spec.options)


def _build_word(paths, spec, instruction, batch_size, limit):
    from .word import WordEvaluator, read_conll

    options = dict(spec.options)
    train_limit = options.pop("train_sentences", None)  # subsample train only; dev and test stay whole
    train, dev, test = (subsample(read_conll(paths[r], spec.encoding), limit) for r in ("train", "dev", "test"))
    train = subsample(train, train_limit)
    return WordEvaluator(train, dev, test, instruction=instruction, batch_size=batch_size, **options)


TASK_TYPES: dict[str, TaskType] = {
    "sts": TaskType(("test",), _build_sts, "spearman", "Spearman x100 of cosine similarity with gold scores"),
    "retrieval": TaskType(("folder",), _build_retrieval, "ndcg@10", "nDCG@10 x100 of exact cosine search (BEIR)"),
    "classification": TaskType(
        ("train", "test"), _build_classification, "accuracy", "accuracy x100 of logistic regression on embeddings"
    ),
    "clustering": TaskType(("test",), _build_clustering, "v_measure", "V-measure x100 of k-means, k = #labels"),
    "pairs": TaskType(("test",), _build_pairs, "ap", "average precision x100 of cosine similarity"),
    "word": TaskType(
        ("train", "dev", "test"), _build_word, "accuracy", "linear probe on word vectors: accuracy or entity F1 x100"
    ),
}


def register_task_type(name: str, task_type: TaskType) -> None:
    """Add (or replace) a task type."""
    TASK_TYPES[name] = task_type


SIMILAR_TEXT = "Find a sentence whose meaning is closest to this one"

TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add (or replace) a task in :data:`TASKS`, so ``--tasks NAME`` finds it."""
    TASKS[spec.name] = spec
    return spec


for _spec in (
    TaskSpec("stsb", "sts", {"test": "sts/stsb_test.tsv"}, SIMILAR_TEXT, description="STS Benchmark test"),
    TaskSpec(
        "stsb-dev",
        "sts",
        {"test": "sts/stsb_dev.tsv"},
        SIMILAR_TEXT,
        description="STS Benchmark dev: for choices (the pipeline's scale), never a reported score",
    ),
    TaskSpec("sickr", "sts", {"test": "sts/sickr_test.tsv"}, SIMILAR_TEXT, description="SICK relatedness test"),
    TaskSpec(
        "trec",
        "classification",
        {"train": "classification/trec_train.label", "test": "classification/trec_test.label"},
        "Classify this question by the kind of answer it asks for",
        encoding="latin-1",
        format="trec",
        description="TREC question type (6 coarse classes)",
    ),
    TaskSpec(
        "trec-clusters",
        "clustering",
        {"test": "classification/trec_test.label"},
        "Identify what kind of answer this question asks for",
        encoding="latin-1",
        format="trec",
        description="TREC test questions clustered by coarse type",
    ),
    TaskSpec(
        "mrpc",
        "pairs",
        {"test": "pairs/mrpc_test.txt"},
        "Find a sentence that paraphrases this one",
        description="Microsoft Research Paraphrase Corpus test",
    ),
    *(
        TaskSpec(
            f"conll2003-{column}",
            "word",
            {split: f"conll2003/{split}.txt" for split in ("train", "dev", "test")},
            None,
            options={"column": column},
            description=f"CoNLL-2003 {what}: linear probe on frozen word vectors ({metric})",
        )
        for column, what, metric in (
            ("pos", "part-of-speech tags", "accuracy"),
            ("chunk", "syntactic chunks", "accuracy"),
            ("ner", "named entities", "entity micro-F1"),
        )
    ),
):
    register_task(_spec)


def default_data_dir() -> Path:
    """``$DECODER2VEC_DATA``, else the folder where data sets loaded from the hub are kept (see ``catalog``)."""
    from ..catalog import data_folder, hub_cache_folder

    return data_folder() or hub_cache_folder()


def parse_task_option(text: str, base: str | Path | None = None) -> TaskSpec:
    """``name=type:path[,path...]`` -> a TaskSpec; paths fill the type's roles in order, relative to ``base``."""
    name, equals, rest = text.partition("=")
    task_type, colon, paths = rest.partition(":")
    if not equals or not colon or not paths:
        raise ValueError(f"--task {text!r} is not NAME=TYPE:PATH[,PATH]; e.g. mysts=sts:data/my_sts.tsv")
    if task_type not in TASK_TYPES:
        raise ValueError(f"--task {text!r}: unknown type {task_type!r}; choose one of: {', '.join(TASK_TYPES)}")
    roles = TASK_TYPES[task_type].roles
    given = paths.split(",")
    if len(given) != len(roles):
        raise ValueError(f"--task {text!r}: type {task_type} needs {len(roles)} path(s), {', '.join(roles)}, in order")
    base = Path(base) if base is not None else Path.cwd()
    files = {role: str(base / path) for role, path in zip(roles, given, strict=True)}
    return TaskSpec(name, task_type, files)


def load_task_file(path: str | Path) -> list[TaskSpec]:
    """Task specs from a JSON/YAML file: a list of specs, or ``{"tasks": [...]}``; paths relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {str(path)!r} not found")
    folder = Path(os.path.abspath(path.parent))  # absolute, so the data folder is never joined in front again
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(f"task file {path} must end in .json, .yaml or .yml")
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"task file {path} is not valid {suffix[1:].upper()}: {error}") from None
    if isinstance(data, dict):
        data = data.get("tasks")
    if not isinstance(data, list):
        raise ValueError(f"task file {path} must hold a list of tasks (or a mapping with a 'tasks' list)")
    known = {f.name for f in dataclasses.fields(TaskSpec)}
    specs = []
    for number, entry in enumerate(data, start=1):
        if not isinstance(entry, dict) or set(entry) - known:
            extra = sorted(set(entry) - known) if isinstance(entry, dict) else entry
            raise ValueError(f"task {number} in {path}: unknown key(s) {extra}; known: {', '.join(sorted(known))}")
        entry = dict(entry)
        entry["files"] = {role: str(folder / p) for role, p in (entry.get("files") or {}).items()}
        specs.append(TaskSpec(**entry))
    return specs


def resolve_tasks(names: str | list[str], extra: list[TaskSpec] = ()) -> list[TaskSpec]:
    """Task specs for comma-separated ``names``, looked up in ``extra`` first, then :data:`TASKS`."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    available = {**TASKS, **{spec.name: spec for spec in extra}}
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(
            f"unknown task(s) {', '.join(unknown)}; known: {', '.join(available)} "
            "(add one with --task NAME=TYPE:PATH or --task-file FILE)"
        )
    return [available[n] for n in names]


def build_evaluator(
    spec: TaskSpec,
    data_dir: str | Path | None = None,
    *,
    instruction: str | None = None,
    batch_size: int = 32,
    limit: int | None = None,
):
    """The evaluator for ``spec``; ``instruction`` replaces the task's default ("" means none).

    ``limit`` keeps a seeded random sample of that many examples of each file (train and test alike; for
    retrieval, judged queries) for quick runs; scores on a sample are not comparable with full-set scores.
    """
    paths = resolve_task_files(spec, data_dir)
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"task {spec.name!r} cannot find {', '.join(missing)}; pass --data-dir (or set DECODER2VEC_DATA) "
            "to the folder holding its files"
        )
    return TASK_TYPES[spec.type].build(paths, spec, task_instruction(spec, instruction), batch_size, limit)


def resolve_task_files(spec: TaskSpec, data_dir: str | Path | None = None) -> dict[str, Path]:
    """Role -> path of ``spec``'s files: absolute paths as they are, relative ones inside the data folder.

    ``data_dir`` None means ``$DECODER2VEC_DATA``. A file the data catalog knows (``sts/stsb_test.tsv``, ...)
    that is not in the folder comes from the hub cache or the hub; it raises
    :class:`~decoder2vec.catalog.DatasetNotFoundError` when neither has it. Other paths may not exist.
    """
    from ..catalog import entry_for_file, resolve_file

    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    paths = {}
    for role, name in spec.files.items():
        if entry_for_file(name) is not None and not Path(name).is_absolute():
            paths[role] = resolve_file(name, data_dir)
        else:
            paths[role] = folder / name  # an absolute name stays as it is
    return paths


def task_instruction(spec: TaskSpec, instruction: str | None = None) -> str | None:
    """The instruction a task runs with: ``instruction`` when given ("" means none), else the task's default."""
    chosen = spec.instruction if instruction is None else instruction
    return chosen or None
