"""The Encoder: a Hugging Face decoder with bidirectional attention (+ LoRA adapters) that embeds text.

Read top to bottom: configuration, loading, one forward pass (tokenize -> backbone -> pool),
then ``encode`` which batches texts by length and returns vectors in input order.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .attention import ARCHITECTURES, ArchitectureSupport, check_bidirectional, set_bidirectional
from .config import option, save_config
from .depth import keep_first_layers
from .inputs import TextInput, TextPrompt, normalize_inputs, pad_batch, resolve_prompt, tokenize
from .int8 import (  # int8 names are still importable from here; from_pretrained reads them from this module
    INT8_MIN_COSINE,  # noqa: F401
    INT8_PROBE_TEXTS,  # noqa: F401
    QUANTIZATIONS,
    QuantizationError,  # noqa: F401
    check_int8,  # noqa: F401
    quantize_int8_checked,
    release_float_weights,
)
from .llm2vec_compat import detect_llm2vec_checkpoint
from .pooling import POOLING_MODES, pool
from .sources import ModelSourceError, resolve_source
from .vectors import check_precision, postprocess, truncate

__all__ = ["CONFIG_NAME", "Encoder", "EncoderConfig"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "decoder2vec_config.json"


@dataclass
class EncoderConfig:
    """How an Encoder turns text into vectors. Saved as ``decoder2vec_config.json`` next to a model."""

    pooling: str = option("mean", help="mean | weighted_mean | last_token | bos")
    bidirectional: bool = option(True, help="drop the causal mask so every token sees the whole input")
    max_length: int = option(512, help="longest input in tokens, instruction and special tokens included")
    padding_side: str = option("right", help="left | right: where padding goes in a batch (results are the same)")
    instruction_template: str = option("{instruction}: ", help="how an instruction is written before the text")
    append_eos: bool = option(False, help="add the tokenizer's EOS token id after each text (for last_token pooling)")
    attn_implementation: str | None = option(None, help="eager | sdpa | flash_attention_2; default: sdpa if supported")
    query_instruction: str | None = option(None, help="default instruction for queries (server, exports, model card)")
    document_instruction: str | None = option(None, help="default instruction for documents; usually none")
    prompt: str = option(
        "{text}",
        help="template the text is written into ({text} once or more), or a preset: prompteol | echo",
    )
    pooled_tokens: str | None = option(
        None,
        help="text (the tokens of the text's last copy) | prompt_end (the input's last token); "
        "default: the preset's, else text",
    )
    num_layers: int | None = option(
        None,
        help="embed from the first N decoder layers (then the final norm); the layers above are dropped, which "
        "also makes encoding faster. Default: all",
    )

    def __post_init__(self):
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of: {', '.join(POOLING_MODES)}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {self.padding_side!r}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, not {self.max_length!r}")
        if self.num_layers is not None and (not isinstance(self.num_layers, int) or self.num_layers < 1):
            raise ValueError(
                f"num_layers must be an integer >= 1 (the first N decoder layers), not {self.num_layers!r}"
            )
        if "{instruction}" not in self.instruction_template:
            raise ValueError("instruction_template must contain '{instruction}'")
        resolve_prompt(self.prompt, self.pooled_tokens)  # raises on an unknown preset or pooled_tokens

    @property
    def text_prompt(self) -> TextPrompt:
        """``prompt`` with its preset resolved (see ``decoder2vec.inputs.PROMPT_PRESETS``)."""
        return resolve_prompt(self.prompt, self.pooled_tokens)

    @property
    def adds_eos(self) -> bool:
        # Off by default: untrained SmolLM2 scores 31.6 on STS-B with the last real token, 19.3 with an appended EOS.
        return bool(self.append_eos)

    def save(self, folder: str | os.PathLike) -> None:
        save_config(self, Path(folder) / CONFIG_NAME)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> EncoderConfig | None:
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            return None
        known = {f.name for f in fields(cls)}
        data = json.loads(path.read_text())
        return cls(**{k: v for k, v in data.items() if k in known})


class Encoder(torch.nn.Module):
    """A decoder-only language model used as a text encoder.

    Example::

        encoder = Encoder.from_pretrained("smollm2-135m", pooling="mean")
        vectors = encoder.encode(["A cat sits.", "A dog runs."], normalize=True)  # (2, 576) numpy
    """

    def __init__(self, model, tokenizer, config: EncoderConfig, source: str = ""):
        super().__init__()
        self.model = model  # a *ForCausalLM (maybe PEFT-wrapped); its LM head is only used by MNTP training
        self.tokenizer = tokenizer
        self.config = config
        self.source = source
        self._replica_cache: tuple[tuple[str, ...], list[Encoder]] | None = None  # (devices, encoders)
        self.backend = getattr(model, "backend", "torch")  # onnx: an OnnxModel runs the graph with onnxruntime
        self.quantize: str | None = None  # int8 after from_pretrained(quantize="int8")
        self.float_layers: list[str] = []  # PyTorch's int8: the decoder's layers it kept in float32
        if self.backend == "torch":  # an ONNX graph was exported at its depth already
            keep_first_layers(self.model, config.num_layers)
        set_bidirectional(self.model, config.bidirectional)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike = "smollm2-135m",
        *,
        pooling: str | None = None,
        bidirectional: bool | None = None,
        adapter: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        max_length: int | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        quantize: str | None = None,
        backend: str | None = None,
        merge_adapters: bool = True,
        **config_overrides,
    ) -> Encoder:
        """Load an encoder from a model folder, a hub id, a ``.gguf`` file or a short name.

        Settings not given here come from the folder's ``decoder2vec_config.json`` when it has one,
        else from :class:`EncoderConfig`'s defaults. ``adapter`` is a PEFT LoRA folder, or a list of
        them, merged into the base weights in order. ``merge_adapters=False`` keeps the last one a live PEFT
        adapter (to inspect or train it); merged encodes faster, with the same vectors to float rounding.

        ``quantize="int8"``: dynamic int8 linear layers on the CPU, adapters merged first. ``backend`` is
        ``torch`` or ``onnx`` (onnxruntime). A folder written by ``export --format onnx`` runs with onnxruntime;
        any other source with ``backend="onnx"`` is exported to ONNX once into the cache
        (``decoder2vec.onnx_export.cached_onnx_folder``), with ``quantize="int8"`` as onnxruntime's dynamic int8.
        int8 defaults to PyTorch's (``backend="torch"``), the one that keeps real models' vectors: linear layers
        and the token embeddings in int8 on the engine this CPU runs fastest, the few layers int8 would hurt most
        kept in float32 (``float_layers``; see :func:`decoder2vec.int8.quantize_int8_checked`), the LM head
        dropped.
        """
        resolved = resolve_source(source)
        saved = EncoderConfig.load(resolved) if Path(resolved).is_dir() else None
        settings = asdict(saved) if saved else {}
        llm2vec = detect_llm2vec_checkpoint(resolved, _adapter_list(adapter))
        if llm2vec is not None:  # base folder with an MNTP adapter to merge, pooling from llm2vec_config.json
            settings = {**llm2vec.settings, **settings}
            resolved, adapter = llm2vec.base_folder, llm2vec.adapters
        adapters = _adapter_list(adapter)
        for path in adapters:  # an adapter trained on the first N layers only means something at that depth
            trained = EncoderConfig.load(path)
            if trained is not None and trained.num_layers is not None:
                settings["num_layers"] = trained.num_layers
        given = {"pooling": pooling, "bidirectional": bidirectional, "max_length": max_length, **config_overrides}
        settings.update({k: v for k, v in given.items() if v is not None})
        config = EncoderConfig(**settings)
        backend = _choose_backend(backend, resolved, quantize)
        if backend == "onnx":
            return cls._from_onnx(source, resolved, adapters, config, quantize)

        device = torch.device(device) if device is not None else _default_device()
        torch_dtype = _resolve_dtype(dtype, device)
        if quantize is not None and (device.type != "cpu" or torch_dtype != torch.float32):
            raise ValueError(f"quantize={quantize!r} runs on the CPU in float32; not on {device} in {torch_dtype}")
        model, tokenizer = _load_model(resolved, source, torch_dtype, config.attn_implementation)
        keep_first_layers(model, config.num_layers)  # before the adapters: they hold no weights above the cut
        for path in adapters:
            model = _attach_adapter(model, path)
        if merge_adapters and adapters:
            model = model.merge_and_unload()
        encoder = cls(model.to(device), tokenizer, config, source=os.fspath(source))
        encoder.adapters = adapters  # the folders loaded, in order (a model card lists their training stages)
        encoder.verify_attention()  # in float, before any quantization (see verify_attention)
        if quantize is not None:  # calibrated on some texts, proven on others (decoder2vec.int8)
            if hasattr(encoder.model, "merge_and_unload"):
                encoder.model = encoder.model.merge_and_unload()
            encode = lambda texts: encoder.encode(texts, show_progress=False)  # noqa: E731
            encoder.float_layers, encoder.quantize = quantize_int8_checked(encoder.backbone, encode), quantize
            release_float_weights(encoder.model)  # the LM head and the checkpoint's float32 copies
        return encoder.eval()

    @classmethod
    def _from_onnx(cls, source, resolved: str, adapters: list[str], config: EncoderConfig, quantize) -> Encoder:
        """An encoder whose model is an ONNX graph run by onnxruntime (see :mod:`decoder2vec.onnx_runtime`)."""
        from transformers import AutoTokenizer

        from .onnx_export import PRECISION_FILE, cached_onnx_folder
        from .onnx_runtime import OnnxModel, has_onnx_graph

        folder = Path(resolved)
        if has_onnx_graph(folder):
            record = folder / PRECISION_FILE
            precision = json.loads(record.read_text()).get("precision") if record.is_file() else "float32"
            if adapters or (quantize is not None and quantize != precision):
                raise ValueError(
                    f"{source!r} is an exported ONNX graph ({precision}): adapters and quantization are fixed at "
                    "export time; export the base model again with them (decoder2vec export --format onnx)"
                )
            quantize = None if precision == "float32" else precision
        else:
            folder = cached_onnx_folder(os.fspath(source), adapters, config, quantize)
        encoder = cls(OnnxModel(folder), AutoTokenizer.from_pretrained(folder), config, source=os.fspath(source))
        encoder.adapters = adapters
        encoder.quantize = quantize
        if quantize is None:
            encoder.verify_attention()  # on the graph itself
        else:  # proven on the float32 graph at export time; the attention it was traced with is fixed
            traced = json.loads((folder / PRECISION_FILE).read_text())["bidirectional"]
            if traced != config.bidirectional:
                raise ValueError(
                    f"the int8 graph of {source!r} was exported {'bidirectional' if traced else 'causal'}; "
                    f"it cannot run with bidirectional={config.bidirectional}"
                )
        return encoder.eval()

    def verify_attention(self) -> None:
        """Prove the model is bidirectional (or causal) as configured; raise otherwise.

        Run in float: int8 scales activations per batch, so with int8 any token moves a little when another
        one changes, whatever the mask. Quantized encoders are proven before quantizing (the float model, or
        the float32 ONNX graph at export time).
        """
        check_bidirectional(self.backbone, self.model.config, self.config.bidirectional, self.device)

    # ------------------------------------------------------------------ properties
    @property
    def backbone(self) -> torch.nn.Module:
        """The decoder stack without the LM head (LoRA layers, when present, are inside it)."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return model.base_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return candidate
        return 0

    # ------------------------------------------------------------------ one forward pass
    def tokenize(self, texts: Sequence[TextInput], instruction: str | None = None, *, max_length: int | None = None):
        """(instruction, text) pairs -> per-text token ids and pooled-token masks (training passes its max_length)."""
        pairs = normalize_inputs(texts, instruction)
        return tokenize(
            self.tokenizer,
            pairs,
            max_length=max_length or self.config.max_length,
            instruction_template=self.config.instruction_template,
            append_eos=self.config.adds_eos,
            prompt=self.config.text_prompt,
        )

    def collate(self, features) -> dict[str, torch.Tensor]:
        return pad_batch(features, pad_id=self.pad_token_id, padding_side=self.config.padding_side, device=self.device)

    def hidden_states(self, batch: dict[str, torch.Tensor], *, every_layer: bool = False):
        """A padded batch (from :meth:`collate`) -> the backbone's last states (batch, seq, dim), in the model's
        dtype; with ``every_layer`` the tuple (embeddings, layer 1, ..., last layer): the last entry has the
        model's final norm, the others are the raw residual stream."""
        out = self.backbone(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
            output_hidden_states=every_layer,
        )
        return out.hidden_states if every_layer else out.last_hidden_state

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A padded batch (from :meth:`collate`) -> pooled vectors (batch, dim), float32, with gradients."""
        hidden = self.hidden_states(batch)
        return pool(hidden.float(), batch["attention_mask"], batch["pool_mask"], self.config.pooling)

    # ------------------------------------------------------------------ encode
    def encode(
        self,
        texts: Sequence[TextInput],
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        normalize: bool = False,
        convert_to: str = "numpy",
        show_progress: bool | None = None,
        dimensions: int | None = None,
        precision: str = "float32",
        devices: Sequence[str | torch.device] | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Embed ``texts`` (strings, or (instruction, text) pairs) into a (len(texts), dim) array.

        ``instruction`` applies to every plain string; the model reads it but pooling skips it.
        Inputs are batched by length (longest first) and the result is in input order.
        ``dimensions`` keeps the first values of each vector (Matryoshka; normalized after truncation),
        ``precision`` is float32 | int8 | uint8 | binary (see :mod:`decoder2vec.vectors`).
        ``devices`` (e.g. ``["cuda:0", "cuda:1"]``) spreads the batches over one model replica per device,
        each driven by its own thread; the result is the same as on one device.
        """
        check_precision(precision)
        if dimensions is not None:
            truncate(torch.empty(0, self.dim), dimensions)  # validate before the work
        if convert_to not in ("numpy", "torch"):
            raise ValueError(f"convert_to must be 'numpy' or 'torch', not {convert_to!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        features = self.tokenize(texts, instruction)
        out = torch.empty(len(features), self.dim, dtype=torch.float32)
        order = sorted(range(len(features)), key=lambda i: -len(features[i].input_ids))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if show_progress is None:
            show_progress = len(batches) > 8
        replicas = self._replicas(devices)
        progress = tqdm(total=len(batches), desc="encode", unit="batch", disable=not show_progress)
        was_training = self.training
        self.eval()
        try:
            if len(replicas) == 1:
                _encode_batches(self, batches, features, out, progress)
            else:
                shares = [batches[i :: len(replicas)] for i in range(len(replicas))]
                with ThreadPoolExecutor(max_workers=len(replicas)) as pool_:
                    jobs = [
                        pool_.submit(_encode_batches, r, s, features, out, progress)
                        for r, s in zip(replicas, shares, strict=True)
                    ]
                    for job in jobs:
                        job.result()  # re-raises a replica's error here
        finally:
            progress.close()
            self.train(was_training)
        return postprocess(out, normalize=normalize, dimensions=dimensions, precision=precision, convert_to=convert_to)

    def _replicas(self, devices) -> list[Encoder]:
        """This encoder plus one copy per extra device; copies are kept until the weights may change."""
        if not devices:
            return [self]
        if len(devices) == 1:
            return [self.to(devices[0])]
        wanted = tuple(str(torch.device(d)) for d in devices)
        if self._replica_cache is None or self._replica_cache[0] != wanted:
            replicas = []
            for device in wanted:
                if torch.device(device) == self.device and self not in replicas:
                    replicas.append(self)
                else:
                    model = copy.deepcopy(self.model).to(device)
                    replicas.append(Encoder(model, self.tokenizer, self.config, self.source).eval())
            self._replica_cache = (wanted, replicas)
        return self._replica_cache[1]

    def train(self, mode: bool = True) -> Encoder:
        if mode:
            self._replica_cache = None  # training changes the weights the copies were made from
        return super().train(mode)

    # ------------------------------------------------------------------ saving
    def save_config(self, folder: str | os.PathLike) -> None:
        self.config.save(folder)


# ---------------------------------------------------------------------- helpers
def _encode_batches(encoder: Encoder, batches, features, out: torch.Tensor, progress) -> None:
    """Embed ``batches`` (lists of indices into ``features``) with one replica; rows go to ``out``."""
    with torch.inference_mode():  # thread-local: entered in the thread that runs the model
        for index in batches:
            out[index] = encoder(encoder.collate([features[i] for i in index])).cpu()
            progress.update(1)


BACKENDS = ("torch", "onnx")


def _choose_backend(backend: str | None, resolved: str, quantize: str | None) -> str:
    """torch unless asked otherwise or the folder is an ONNX export; int8 too runs on torch by default: on both
    real models measured (SmolLM2-135M, Gemma 3 270M) onnxruntime's dynamic int8 fails its own cosine check
    (min 0.32-0.89), PyTorch's passes on Gemma 3 270M (``bench/results/encode_gemma3_smollm2_amx_2threads.txt``)."""
    from .onnx_runtime import has_onnx_graph

    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    onnx_folder = Path(resolved).is_dir() and has_onnx_graph(resolved)
    if backend == "torch" and onnx_folder and not any(Path(resolved).glob("*.safetensors")):
        raise ModelSourceError(f"{resolved!r} holds only an ONNX graph; load it with backend='onnx'")
    if backend is None:
        backend = "onnx" if onnx_folder else "torch"
    return backend


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    names.update({"float16": torch.float16, "fp16": torch.float16})
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(names)}")
    return names[dtype]


def _load_model(resolved: str, source, dtype: torch.dtype, attn_implementation: str | None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        hf_config = AutoConfig.from_pretrained(resolved)
    except Exception as error:
        raise ModelSourceError(
            f"cannot read the model configuration of {source!r} ({type(error).__name__}: {error}). "
            "For a folder, check config.json; for a hub id, check the name and your network (HF_HUB_OFFLINE)."
        ) from error
    model_type = getattr(hf_config, "model_type", "?")
    support = ARCHITECTURES.get(model_type, ArchitectureSupport())
    if attn_implementation is None:
        attn_implementation = "sdpa" if "sdpa" in support.attention_implementations else "eager"
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, attn_implementation=attn_implementation)
    except ValueError as error:
        if "Unrecognized configuration" in str(error) or "does not support" in str(error):
            raise ModelSourceError(
                f"architecture {model_type!r} of {source!r} cannot be loaded as a decoder-only model "
                f"with attention {attn_implementation!r} ({error}). Supported and tested: {', '.join(sorted(ARCHITECTURES))}."
            ) from error
        raise
    except OSError as error:
        raise ModelSourceError(
            f"cannot load the weights or tokenizer of {source!r} ({type(error).__name__}: {error}). "
            "The files may be missing, truncated or corrupt: download or export the model again."
        ) from error
    except Exception as error:  # safetensors raises its own error type on corrupt files
        if type(error).__name__ == "SafetensorError":
            raise ModelSourceError(
                f"the safetensors weights of {source!r} are corrupt or truncated ({error}). "
                "Download or export the model again."
            ) from error
        raise
    if not getattr(tokenizer, "is_fast", False):
        raise ModelSourceError(
            f"the tokenizer of {source!r} is not a fast (Rust) tokenizer; decoder2vec needs token offsets. "
            "Save the model with a tokenizer.json."
        )
    return model, tokenizer


STACK_NAME = "decoder2vec_stack.json"  # in an adapter folder: earlier adapters it was trained on, merged first


def _adapter_list(adapter) -> list[str]:
    if adapter is None:
        return []
    paths = [os.fspath(adapter)] if isinstance(adapter, str | os.PathLike) else [os.fspath(a) for a in adapter]
    expanded, seen = [], set()
    for path in (full for p in paths for full in _with_stack(p)):
        fingerprint = _adapter_fingerprint(path)
        if fingerprint not in seen:  # an earlier stage listed both by the user and in a stack file
            seen.add(fingerprint)
            expanded.append(path)
    return expanded


def _with_stack(path: str) -> list[str]:
    """``path`` preceded by the adapters its ``decoder2vec_stack.json`` lists (relative to ``path``)."""
    stack = Path(path) / STACK_NAME
    if not stack.is_file():
        return [path]
    earlier = json.loads(stack.read_text()).get("merge_first", [])
    return [full for e in earlier for full in _with_stack(os.fspath(Path(path) / e))] + [path]


def _adapter_fingerprint(path: str) -> str:
    import hashlib

    weights = Path(path) / "adapter_model.safetensors"
    if not weights.is_file():
        return os.path.realpath(path)
    digest = hashlib.sha256()
    with weights.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _attach_adapter(model, path: str):
    """Merge any live adapter into the base weights, then load ``path`` as a new live LoRA adapter."""
    from peft import PeftModel

    if not (Path(path) / "adapter_config.json").is_file():
        raise ModelSourceError(f"adapter folder {path!r} has no adapter_config.json; pass a PEFT adapter folder")
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    import warnings

    with warnings.catch_warnings():  # peft reads `is_gradient_checkpointing`, which transformers 5 deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return PeftModel.from_pretrained(model, path)
