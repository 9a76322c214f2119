"""One configuration dataclass per training stage; each feeds the Python API, the CLI and the saved JSON.

:class:`TrainConfig` holds what every stage shares (model, LoRA, optimization, checkpoints); the stage
classes add their own options. The stage defaults are the published LLM2Vec recipe (``recipes/llm2vec.yaml``,
for GPUs); the small-budget CPU recipe that ``decoder2vec pipeline`` runs without a GPU is ``recipes/small-cpu.yaml``
(``--recipe small-cpu``). A test checks that the defaults equal the ``llm2vec`` recipe file.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from ..pooling import POOLING_MODES

__all__ = ["STAGES", "MNTPConfig", "SimCSEConfig", "SupervisedConfig", "TrainConfig"]


@dataclass
class TrainConfig:
    """Options every stage shares."""

    # model
    model: str = option("smollm2-135m", help="base model: folder, hub id, .gguf file or short name")
    adapter: list[str] | None = option(None, help="earlier stages' adapter folders, merged into the base first")
    bidirectional: bool = option(True, help="train with bidirectional attention (false: causal)")
    pooling: str = option("mean", help="pooling of the embedding stages: " + " | ".join(POOLING_MODES))
    num_layers: int | None = option(
        None, help="train and embed with the first N decoder layers only (the rest dropped); default: all"
    )
    dtype: str = option("float32", help="weight dtype: float32 | bfloat16 (use mixed_precision for autocast)")
    mixed_precision: str = option("no", help="no | bf16 | fp16: accelerate autocast on GPUs")
    gradient_checkpointing: bool = option(False, help="recompute activations in backward to save memory")
    # data
    data: list[str] | None = option(
        None, help="training files (text, WikiText, JSONL, TSV) or hf:NAME[:CONFIG][:SPLIT]"
    )
    text_field: str = option("text", help="field holding the text in JSONL files and datasets")
    max_seq_length: int = option(64, help="tokens per training sequence")
    # optimization
    steps: int = option(100, help="optimizer steps")
    batch_size: int = option(16, help="sequences (or pairs) per process and step, before accumulation")
    gradient_accumulation_steps: int = option(1, help="micro-batches summed per optimizer step")
    learning_rate: float = option(2e-4, help="peak learning rate of AdamW")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    warmup_steps: int = option(5, help="linear warm-up steps")
    lr_scheduler: str = option(
        "linear", help="transformers scheduler name, sized from `steps`: linear | cosine | constant_with_warmup"
    )
    max_grad_norm: float = option(1.0, help="gradient clipping norm (0: off)")
    seed: int = option(42, help="seeds data order, masking, dropout and LoRA initialization")
    # LoRA
    lora_r: int = option(16, help="LoRA rank")
    lora_alpha: int = option(32, help="LoRA alpha (scale = alpha / r)")
    lora_dropout: float = option(0.05, help="dropout on the LoRA input")
    lora_target_modules: list[str] | None = option(
        None, help="module names to adapt (default: every linear layer of attention and MLP)"
    )
    lora_layers: int | None = option(
        None, help="adapt only the top N decoder layers: backward stops below them (default: every layer)"
    )
    fused_lora: bool = option(
        True,
        help="train LoRA through one fused function per projection, with a cheap dropout mask shared by the "
        "projections that read one input (false: peft's own forward; same expectation, other random draws)",
    )
    # run folder
    output_dir: str = option("runs/train", help="run folder: adapter, checkpoints, config, log, loss curve")
    checkpoint_every: int = option(50, help="write a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = option(2, help="how many recent checkpoints to keep")
    resume: bool = option(False, help="continue from the latest checkpoint in output_dir")
    save_merged: bool = option(False, help="also save the adapter merged into the base as output_dir/merged")
    progress: bool = option(True, help="show a progress bar")
    step_delay: float = option(0.0, help="seconds to sleep after each step (only to test interruption)")

    stage = "train"

    def __post_init__(self):
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of: {', '.join(POOLING_MODES)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, not {self.mixed_precision!r}")
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "keep_checkpoints"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, not {getattr(self, name)!r}")
        if self.max_seq_length < 4:
            raise ValueError(f"max_seq_length must be >= 4, not {self.max_seq_length}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, not {self.learning_rate}")
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, not {self.lora_r}")
        if self.num_layers is not None and (not isinstance(self.num_layers, int) or self.num_layers < 1):
            raise ValueError(
                f"num_layers must be an integer >= 1 (the first N decoder layers), not {self.num_layers!r}"
            )
        if self.lora_layers is not None and (not isinstance(self.lora_layers, int) or self.lora_layers < 1):
            raise ValueError(f"lora_layers must be an integer >= 1 (the top N layers), not {self.lora_layers!r}")
        for name in ("lora_dropout",):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), not {getattr(self, name)}")
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.adapter, str):
            self.adapter = [self.adapter]


@dataclass
class MNTPConfig(TrainConfig):
    """Masked next-token prediction: predict a masked token at i from the hidden state at i-1."""

    mask_probability: float = option(0.2, help="fraction of tokens masked (BERT-style 80/10/10 replacement)")
    mask_token: str = option("_", help="mask token when the tokenizer has none (the reference uses '_')")
    full_logits: bool = option(False, help="compute logits at every position (slower; for comparison only)")
    learning_rate: float = option(5e-5, help="peak learning rate of AdamW")
    warmup_steps: int = option(0, help="linear warm-up steps")
    steps: int = option(1000, help="optimizer steps")
    batch_size: int = option(32, help="sequences per process and step, before accumulation")
    max_seq_length: int = option(512, help="tokens per packed training sequence")
    output_dir: str = option("runs/mntp", help="run folder: adapter, checkpoints, config, log, loss curve")

    stage = "mntp"

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.mask_probability < 1:
            raise ValueError(f"mask_probability must be in (0, 1), not {self.mask_probability}")


@dataclass
class SimCSEConfig(TrainConfig):
    """Unsupervised SimCSE: each sentence twice under independent dropout, InfoNCE over the batch."""

    temperature: float = option(0.05, help="softmax temperature of the InfoNCE loss")
    pack_tokens: int = option(
        128, help="embed both views in one pass of padding-free packs of up to N tokens (0: padded batch)"
    )
    # The published recipe. A 30-step CPU budget needs a rate ~100x higher (recipes/small-cpu.yaml, measured in
    # bench/results/recipe_smallcpu.md): the InfoNCE loss collapses within ~10 steps there.
    attention_dropout: float = option(0.3, help="dropout on attention probabilities")
    hidden_dropout: float = option(0.0, help="dropout on each decoder layer's residual update (Llama has none)")
    learning_rate: float = option(3e-5, help="peak learning rate of AdamW")
    warmup_steps: int = option(0, help="linear warm-up steps")
    steps: int = option(1000, help="optimizer steps")
    batch_size: int = option(128, help="sentences per process and step (each is encoded twice)")
    max_seq_length: int = option(128, help="tokens per sentence")
    output_dir: str = option("runs/simcse", help="run folder: adapter, checkpoints, config, log, loss curve")

    stage = "simcse"

    def __post_init__(self):
        super().__post_init__()
        _check_dropout(self, "attention_dropout", "hidden_dropout")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, not {self.temperature}")
        if not isinstance(self.pack_tokens, int) or self.pack_tokens < 0:
            raise ValueError(f"pack_tokens must be an integer >= 0, not {self.pack_tokens!r}")


@dataclass
class SupervisedConfig(TrainConfig):
    """Supervised contrastive: (query, positive[, hard negative]) rows, in-batch and hard negatives."""

    instruction: str | None = option(None, help="instruction read before each query (never before documents)")
    query_field: str = option("query", help="query column (TSV header) or field (JSONL)")
    positive_field: str = option("positive", help="positive document column or field")
    negative_field: str = option("negative", help="hard negative column or field (optional in the data)")
    temperature: float = option(0.05, help="softmax temperature of the contrastive loss")
    gather_across_processes: bool = option(True, help="use every process's documents as negatives")
    grad_cache_chunk_size: int | None = option(
        64, help="GradCache: embed in chunks of N texts (large batches, little memory); 0 or none: one pass"
    )
    attention_dropout: float = option(0.0, help="dropout on attention probabilities")
    hidden_dropout: float = option(0.0, help="dropout on each decoder layer's residual update")
    learning_rate: float = option(2e-4, help="peak learning rate of AdamW")
    warmup_steps: int = option(300, help="linear warm-up steps")
    steps: int = option(1000, help="optimizer steps")
    batch_size: int = option(512, help="(query, positive[, negative]) rows per process and step")
    max_seq_length: int = option(512, help="tokens per query or document")
    output_dir: str = option("runs/supervised", help="run folder: adapter, checkpoints, config, log, loss curve")

    stage = "supervised"

    def __post_init__(self):
        super().__post_init__()
        _check_dropout(self, "attention_dropout", "hidden_dropout")
        if self.grad_cache_chunk_size == 0:
            self.grad_cache_chunk_size = None
        if self.grad_cache_chunk_size is not None and self.grad_cache_chunk_size < 1:
            raise ValueError(f"grad_cache_chunk_size must be >= 1 (or 0: off), not {self.grad_cache_chunk_size}")


def _check_dropout(config, *names: str) -> None:
    for name in names:
        if not 0 <= getattr(config, name) < 1:
            raise ValueError(f"{name} must be in [0, 1), not {getattr(config, name)}")


STAGES: dict[str, type[TrainConfig]] = {"mntp": MNTPConfig, "simcse": SimCSEConfig, "supervised": SupervisedConfig}
