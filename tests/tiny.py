"""Tiny random-weight models built from configs, and a small byte-level BPE tokenizer, all offline."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

CORPUS = [
    "A man is playing a guitar.",
    "A woman is slicing an onion.",
    "The cat sits on the mat while the dog sleeps.",
    "Retrieve passages that answer the question: what is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "Numbers like 3.14, 42 and 1,000,000 appear in text.",
    "Unusual characters: tab\there, emoji 🙂, accents éàü, CJK 漢字, symbols !@#$%^&*() <s> </s> [SEP].",
] * 20

VOCAB_SIZE = 400
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]


def make_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text tokenizes) that adds <s> in front when add_bos."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]),
            ]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=8),
    "gemma2": lambda: Gemma2Config(**_COMMON, head_dim=8),
    "gemma3_text": lambda: Gemma3TextConfig(**_COMMON, head_dim=8, sliding_window=4),
    "phi3": lambda: Phi3Config(**_COMMON),
}


def make_model_dir(path: Path, model_type: str = "llama", add_bos: bool = True, seed: int = 0) -> Path:
    """Save a tiny random model of ``model_type`` with the tiny tokenizer into ``path``."""
    torch.manual_seed(seed)
    config = CONFIGS[model_type]()
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    make_tokenizer(add_bos=add_bos).save_pretrained(path)
    return path
