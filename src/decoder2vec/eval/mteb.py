"""An adapter so MTEB's own runner (``mteb.evaluate``) can evaluate an :class:`~decoder2vec.Encoder`.

:class:`MTEBEncoder` meets the installed mteb package's encoder protocol (``mteb.models.AbsEncoder``): MTEB hands
it a DataLoader of batches with a ``"text"`` column plus the task's metadata and the prompt type, and it
returns one vector a text. Instructions follow LLM2Vec's MTEB practice, in our own words: a query-side
instruction chosen by task name, else by task type; documents (``prompt_type == document``) never get one.

:func:`local_sts_task` builds an MTEB STS task from a local TSV (no download), for checks without a network.

Example::

    import mteb
    from decoder2vec import Encoder
    from decoder2vec.eval.mteb import MTEBEncoder, local_sts_task

    model = MTEBEncoder(Encoder.from_pretrained("smollm2-135m"))
    results = mteb.evaluate(model, mteb.get_tasks(["STSBenchmark"]), cache=mteb.ResultCache("results"))
    results = mteb.evaluate(model, local_sts_task("stsb_test.tsv"), cache=None)  # offline
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from .sts import read_sts_tsv
from .tasks import SIMILAR_TEXT

__all__ = ["MTEB_INSTRUCTIONS", "MTEBEncoder", "local_sts_task"]

# Query instruction per MTEB task type (a task name key wins over its type). None: no instruction.
MTEB_INSTRUCTIONS: dict[str, str | None] = {
    "STS": SIMILAR_TEXT,
    "PairClassification": "Find a text that says the same thing as this one",
    "Classification": "Classify this text by its category",
    "MultilabelClassification": "Classify this text by its categories",
    "Clustering": "Identify the topic of this text",
    "Retrieval": "Given a question, find passages that answer it",
    "Reranking": "Given a question, find passages that answer it",
    "InstructionRetrieval": "Given a question, find passages that answer it",
    "BitextMining": "Find a sentence that translates this one",
    "Summarization": "Find a summary that says the same thing as this one",
}


class MTEBEncoder(AbsEncoder):
    """Wraps an Encoder (or anything with its ``encode``) for ``mteb.evaluate``.

    ``instructions`` adds to or overrides :data:`MTEB_INSTRUCTIONS` (keys: a task name or an MTEB task type;
    a None value turns the instruction off). Similarity is cosine. ``batch_size`` applies when MTEB's
    ``encode_kwargs`` give none.
    """

    def __init__(
        self,
        encoder,
        *,
        instructions: dict[str, str | None] | None = None,
        batch_size: int = 32,
        name: str | None = None,
    ):
        self.model = encoder
        self.instructions = {**MTEB_INSTRUCTIONS, **(instructions or {})}
        self.batch_size = batch_size
        source = str(getattr(encoder, "source", "") or "model")
        config = getattr(encoder, "config", None)
        mode = "bidirectional" if getattr(config, "bidirectional", True) else "causal"
        pooling = getattr(config, "pooling", "mean")
        self.mteb_model_meta = ModelMeta.create_empty(
            overwrites={
                "name": name or f"decoder2vec/{Path(source).name}-{pooling}-{mode}",
                "revision": "local",
                "embed_dim": getattr(encoder, "dim", None),
                "similarity_fn_name": ScoringFunction.COSINE,
                "use_instructions": True,
                "modalities": ["text"],
                "framework": ["PyTorch"],
            }
        )

    def instruction_for(self, task_metadata: TaskMetadata, prompt_type: PromptType | None) -> str | None:
        """The instruction for this task and side: None for documents, else by task name, then task type."""
        if prompt_type == PromptType.document:
            return None
        if task_metadata.name in self.instructions:
            return self.instructions[task_metadata.name]
        return self.instructions.get(task_metadata.type)

    def encode(
        self,
        inputs,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embed every text of MTEB's DataLoader, in order, as a (n, dim) float32 array."""
        texts = [text for batch in inputs for text in batch["text"]]
        return self.model.encode(
            texts,
            instruction=self.instruction_for(task_metadata, prompt_type),
            batch_size=kwargs.get("batch_size") or self.batch_size,
            show_progress=kwargs.get("show_progress_bar"),
        )


class _LocalSTSTask(AbsTaskSTS):
    """An MTEB STS task whose single ``test`` split comes from a local TSV instead of the Hugging Face hub."""

    def __init__(self, path: Path, max_pairs: int | None, min_score: float, max_score: float):
        self.path = path
        self.max_pairs = max_pairs
        self.min_score = min_score
        self.max_score = max_score
        super().__init__()

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        pairs = read_sts_tsv(self.path)
        end = self.max_pairs if self.max_pairs is not None else len(pairs.scores)
        columns = {
            "sentence1": pairs.sentences1[:end],
            "sentence2": pairs.sentences2[:end],
            "score": pairs.scores[:end],
        }
        self.dataset = DatasetDict({"test": Dataset.from_dict(columns)})
        self.data_loaded = True


def local_sts_task(
    path: str | Path,
    *,
    name: str = "LocalSTS",
    max_pairs: int | None = None,
    min_score: float = 0,
    max_score: float = 5,
    description: str = "STS pairs read from a local TSV (sentence1, sentence2, score)",
) -> AbsTaskSTS:
    """An MTEB STS task (main score ``cosine_spearman``) over the pairs of a local STS TSV; nothing is downloaded."""
    path = Path(path)
    read_sts_tsv(path)  # fail now, with our message, on a missing or malformed file
    metadata = TaskMetadata(
        name=name,
        description=description,
        dataset={"path": str(path), "revision": "local"},
        type="STS",
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score="cosine_spearman",
        date=None,
        domains=None,
        task_subtypes=None,
        license=None,
        annotations_creators=None,
        dialect=None,
        sample_creation=None,
        bibtex_citation="",
    )
    # mteb reads `metadata` from the class (it drops an instance attribute when unloading data), so each
    # local task gets its own small subclass
    task_class = type(f"LocalSTSTask_{name}", (_LocalSTSTask,), {"metadata": metadata})
    return task_class(path, max_pairs, min_score, max_score)
