"""What each training stage adds to the shared loop: its examples, the module it trains, one step.

A :class:`Stage` is built from a stage config and an :class:`~decoder2vec.Encoder` whose LoRA adapter is
already in place. ``step(module, examples, generator, backward, no_sync)`` embeds one micro-batch of
examples, computes the loss, calls ``backward`` on it (or on its chunks, for GradCache) and returns the
loss detached. ``generator`` carries the step's randomness (MNTP masks), so resumed runs repeat it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..packing import PackedEmbedder
from .config import MNTPConfig, SimCSEConfig, SupervisedConfig, TrainConfig
from .data import DataError, pack_documents, read_rows, read_texts
from .mntp import MNTPCollator, MNTPLoss
from .simcse import InfoNCELoss, set_dropout
from .supervised import ContrastiveLoss, GradCache

__all__ = ["STAGE_BUILDERS", "Stage", "build_stage"]


@dataclass
class Stage:
    examples: list  # packed token ids (MNTP), sentences (SimCSE) or ContrastiveRow (supervised)
    module: nn.Module  # what accelerate wraps and the optimizer trains (its LoRA parameters)
    step: Callable[..., torch.Tensor]
    cleanup: list[Callable[[], None]] = field(default_factory=list)  # undo training-only changes (dropout)


def _require_data(config: TrainConfig) -> list[str]:
    if not config.data:
        raise DataError(f"the {config.stage} stage needs training data: set data (--data FILE [FILE ...])")
    return config.data


def mntp_stage(config: MNTPConfig, encoder) -> Stage:
    tokenizer = encoder.tokenizer
    documents = [text for source in _require_data(config) for text in read_texts(source, text_field=config.text_field)]
    token_ids = tokenizer(documents, add_special_tokens=True, verbose=False)["input_ids"]
    chunks = pack_documents(token_ids, config.max_seq_length, separator=tokenizer.eos_token_id)
    collator = MNTPCollator(
        tokenizer, mask_probability=config.mask_probability, mask_token=config.mask_token, pad_id=encoder.pad_token_id
    )

    def step(module, examples, generator, backward, no_sync=contextlib.nullcontext):
        batch = {k: v.to(encoder.device) for k, v in collator(examples, generator).items()}
        loss = module(batch)
        backward(loss)
        return loss.detach()

    return Stage(chunks, MNTPLoss(encoder, full_logits=config.full_logits), step)


def _dropout(config, encoder) -> list[Callable[[], None]]:
    before = getattr(encoder.model.config, "attention_dropout", 0.0)
    hooks = set_dropout(encoder.model, attention=config.attention_dropout, hidden=config.hidden_dropout)
    return [*(hook.remove for hook in hooks), lambda: set_dropout(encoder.model, attention=before)]


def _tokenize(encoder, texts, max_length: int, instruction: str | None = None):
    # The encoder's own tokenization (instruction template, prompt, EOS), so training sees what encode sees.
    return encoder.tokenize(texts, instruction, max_length=max_length)


def simcse_stage(config: SimCSEConfig, encoder) -> Stage:
    sentences = [
        text
        for source in _require_data(config)
        for text in read_texts(source, text_field=config.text_field, documents=False)
    ]
    loss_fn = InfoNCELoss(config.temperature)
    embedder = PackedEmbedder(encoder, max_tokens=config.pack_tokens)  # padded batches where packing is not exact

    def step(module, examples, generator, backward, no_sync=contextlib.nullcontext):
        features = _tokenize(encoder, examples, config.max_seq_length)
        # (2n, dim): both dropout views in one pass; each text sits twice in the batch, so its two copies
        # draw independent dropout masks, packed or padded
        vectors = module(embedder.collate(features + features))
        loss = loss_fn(vectors[: len(examples)], vectors[len(examples) :])
        backward(loss)
        return loss.detach()

    return Stage(sentences, embedder, step, _dropout(config, encoder))


def supervised_stage(config: SupervisedConfig, encoder) -> Stage:
    rows = [
        row
        for source in _require_data(config)
        for row in read_rows(
            source,
            query_field=config.query_field,
            positive_field=config.positive_field,
            negative_field=config.negative_field,
        )
    ]
    if len({row.negative is None for row in rows}) > 1:
        raise DataError("some data files have hard negatives and some do not; give one to every row or to none")
    loss_fn = ContrastiveLoss(config.temperature, gather_across_processes=config.gather_across_processes)

    def step(module, examples, generator, backward, no_sync=contextlib.nullcontext):
        queries = _tokenize(encoder, [r.query for r in examples], config.max_seq_length, config.instruction)
        documents = [r.positive for r in examples] + [r.negative for r in examples if r.negative is not None]
        features = queries + _tokenize(encoder, documents, config.max_seq_length)  # no instruction on documents
        if config.grad_cache_chunk_size:
            cache = GradCache(module, encoder.collate, loss_fn, config.grad_cache_chunk_size)
            return cache.step(features, len(queries), backward, no_sync)
        vectors = module(encoder.collate(features))  # queries then positives (then negatives), one pass
        loss = loss_fn(vectors[: len(queries)], vectors[len(queries) :])
        backward(loss)
        return loss.detach()

    return Stage(rows, encoder, step, _dropout(config, encoder))


STAGE_BUILDERS: dict[str, Callable[..., Stage]] = {
    "mntp": mntp_stage,
    "simcse": simcse_stage,
    "supervised": supervised_stage,
}


def build_stage(config: TrainConfig, encoder) -> Stage:
    if config.stage not in STAGE_BUILDERS:
        raise ValueError(f"unknown stage {config.stage!r}; choose one of: {', '.join(STAGE_BUILDERS)}")
    return STAGE_BUILDERS[config.stage](config, encoder)
