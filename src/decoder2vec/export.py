"""Export an Encoder as a sentence-transformers, merged Hugging Face or ONNX folder, with a model card.

* ``merged``: every LoRA adapter merged into the weights, saved as a plain safetensors Hugging Face
  folder with ``decoder2vec_config.json`` (pooling, bidirectional, max length, default instructions),
  so ``Encoder.from_pretrained(folder)`` restores the same encoder.
* ``sentence-transformers``: the merged decoder (without its LM head, ``is_causal: false`` in
  ``config.json``) as the ``Transformer`` module, then a pooling module; ``SentenceTransformer(folder)``
  gives the same vectors as ``Encoder.encode`` (plain text: the chat template is removed, padding is
  on the right, the EOS id is appended by the tokenizer when the encoder appends one).
* ``onnx``: the merged decoder as ``onnx/model.onnx`` (see :mod:`decoder2vec.onnx_export`; ``quantize="int8"``
  for onnxruntime's dynamic int8), with the same tokenizer and pooling modules as the sentence-transformers
  folder behind :class:`decoder2vec.st_modules.OnnxTransformer`. It loads with
  ``SentenceTransformer(folder, backend="onnx")``, ``Encoder.from_pretrained(folder)`` (onnxruntime) and plain
  onnxruntime (see docs/inference.md).

An empty text: the merged and ONNX folders, read by ``Encoder`` or (ONNX) by sentence-transformers, embed ``""``
as decoder2vec does (one filler token when the tokenizer adds none). Stock sentence-transformers modules
cannot give a text of zero tokens a token; the model card of a sentence-transformers folder says what it does.

Every export writes ``README.md`` (base model, training stages and their configs when known, the
evaluation table when given, usage) and is built in a temporary folder next to the output, renamed
into place only when complete: a failed export leaves nothing at the output path.

Example::

    from decoder2vec import Encoder, export_model
    encoder = Encoder.from_pretrained("smollm2-135m", adapter="runs/simcse")
    export_model(encoder, "exports/smollm2-st", format="sentence-transformers")
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

from .sources import ModelSourceError

__all__ = ["EXPORT_FORMATS", "ExportError", "export_model", "register"]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("sentence-transformers", "merged", "onnx")
STAGE_NAMES = ("mntp", "simcse", "supervised")

# decoder2vec pooling -> sentence-transformers Pooling mode
_ST_POOLING = {"mean": "mean", "weighted_mean": "weightedmean", "last_token": "lasttoken", "bos": "cls"}
_PROBES = [
    "A man is playing a guitar.",
    "Unusual characters: tab\there, emoji 🙂, accents éàü, symbols <s> </s> [SEP].",
]


class ExportError(RuntimeError):
    """An export cannot be written faithfully. The message says why and what to do."""


# ---------------------------------------------------------------------- entry point
def export_model(
    encoder,
    output: str | os.PathLike,
    format: str = "merged",  # noqa: A002 - the CLI's --format
    *,
    evaluation: dict | None = None,
    overwrite: bool = False,
    quantize: str | None = None,
) -> Path:
    """Write ``encoder`` to ``output`` in ``format`` (sentence-transformers | merged | onnx); returns the folder.

    ``evaluation`` is an evaluation report (``decoder2vec eval -o report.json``) or a plain
    ``{task: score}`` mapping for the model card's table. ``quantize="int8"`` (onnx only) writes a dynamic
    int8 graph.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
    if quantize is not None and format != "onnx":
        raise ExportError(f"quantize={quantize!r} is for --format onnx; the {format} format is saved in float")
    if getattr(encoder, "quantize", None) or getattr(encoder, "backend", "torch") != "torch":
        raise ExportError(
            "this encoder is quantized or runs an ONNX graph; export the float model loaded with the torch backend "
            "(--quantize int8 on export quantizes the ONNX graph it writes)"
        )
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; choose another folder or pass overwrite=True (--overwrite)")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        notes = write_onnx_folder(encoder, tmp, quantize) if format == "onnx" else _WRITERS[format](encoder, tmp)
        write_model_card(tmp, encoder, format, evaluation=evaluation, notes=notes, title=output.name)
        _replace_folder(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s as %s to %s", encoder.source, format, output)
    return output


def _replace_folder(tmp: Path, output: Path) -> None:
    """Move the finished ``tmp`` to ``output``; an existing ``output`` is swapped out, then deleted."""
    if not output.exists():
        os.rename(tmp, output)
        return
    old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(output, old)
    os.rename(tmp, output)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------- merged
def merged_model(encoder):
    """The encoder's *ForCausalLM with every LoRA adapter merged in (a copy; the encoder is unchanged)."""
    model = encoder.model
    if hasattr(model, "merge_and_unload"):  # a PeftModel: merge a copy, keep the caller's adapter live
        model = copy.deepcopy(model).merge_and_unload()
    return model


def write_merged(encoder, folder: Path) -> list[str]:
    model = merged_model(encoder)
    model.save_pretrained(folder)
    encoder.tokenizer.save_pretrained(folder)
    encoder.config.save(folder)
    return []


# ---------------------------------------------------------------------- sentence-transformers
def write_sentence_transformers(encoder, folder: Path) -> list[str]:
    """Write the sentence-transformers layout; returns the notes on what it cannot express."""
    _check_plain_prompt(encoder, "sentence-transformers")
    backbone = merged_model(encoder).base_model  # the decoder without its LM head
    architectures = backbone.config.architectures
    try:
        backbone.save_pretrained(folder)
    finally:
        backbone.config.architectures = architectures  # save_pretrained renames them on the shared config
    first = "sentence_transformers.base.modules.transformer.Transformer"  # stock: loads without decoder2vec
    settings = {
        "transformer_task": "feature-extraction",
        # plain text, never the chat template (sentence-transformers uses it when it finds one)
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings",
        "processing_kwargs": {"text": {"max_length": encoder.config.max_length}},
    }
    return _write_st_layout(encoder, folder, first, settings)


def write_onnx_folder(encoder, folder: Path, quantize: str | None = None) -> list[str]:
    """The ONNX graph (:mod:`decoder2vec.onnx_export`) behind the sentence-transformers layout."""
    from .onnx_export import write_onnx
    from .onnx_runtime import ONNX_FILE

    _check_plain_prompt(encoder, "onnx")
    write_onnx(encoder, folder, quantize)
    settings = {"max_seq_length": encoder.config.max_length, "onnx_file": ONNX_FILE}
    return _write_st_layout(encoder, folder, "decoder2vec.st_modules.OnnxTransformer", settings)


def _check_plain_prompt(encoder, format: str) -> None:  # noqa: A002
    config = encoder.config
    if not config.text_prompt.is_plain:  # sentence-transformers' prompts are prefixes, pooled over all after them
        raise ExportError(
            f"the {format} format cannot express prompt={config.prompt!r} with pooled_tokens="
            f"{config.text_prompt.pooled!r} (a template around the text, pooling part of it); "
            "export with --format merged, which Encoder.from_pretrained reads with the prompt"
        )


def _write_st_layout(encoder, folder: Path, first_module: str, first_settings: dict) -> list[str]:
    """Tokenizer, modules.json (``first_module`` then pooling), settings and prompts; returns the notes."""
    config = encoder.config
    _write_plain_tokenizer(encoder, folder)
    _check_tokenizer(encoder, folder)
    notes = [
        "Instructions (sentence-transformers prompts) are approximated: sentence-transformers counts the prompt's "
        "tokens on the prompt alone and prepends it as plain text, while decoder2vec writes "
        f"`{config.instruction_template}` and leaves exactly the instruction's tokens out of pooling (by character "
        "offsets). Without an instruction the vectors are the same; with one they can differ slightly.",
        _empty_text_note(encoder, first_module),
    ]
    if first_module.startswith("decoder2vec."):
        notes.append(
            f"The first module is `{first_module}` (sentence-transformers' own ONNX backend needs Optimum, whose "
            "ONNX support requires transformers < 4.58): loading this folder with sentence-transformers needs "
            "`pip install decoder2vec[onnx]` and `trust_remote_code=True`, as sentence-transformers 6 asks for any "
            "module class of another package."
        )
    modules = [{"idx": 0, "name": "0", "path": "", "type": first_module}]
    for module, note in _st_pooling_modules(encoder):
        index = len(modules)
        path = f"{index}_{type(module).__name__}"
        (folder / path).mkdir()
        module.save(str(folder / path))
        modules.append({"idx": index, "name": str(index), "path": path, "type": _class_path(module)})
        if note:
            notes.append(note)
    _write_json(folder / "modules.json", modules)
    _write_json(folder / "sentence_bert_config.json", first_settings)
    prompts = {
        name: config.instruction_template.format(instruction=instruction) if instruction else ""
        for name, instruction in (("query", config.query_instruction), ("document", config.document_instruction))
    }
    _write_json(
        folder / "config_sentence_transformers.json",
        {
            "model_type": "SentenceTransformer",
            "prompts": prompts,
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
            "__version__": _versions(),
        },
    )
    encoder.config.save(folder)  # lets Encoder.from_pretrained(folder) read it back too
    return notes


def _empty_text_note(encoder, first_module: str) -> str:
    """How an empty text is embedded in this layout, against decoder2vec's own vector."""
    if not _special_ids_around_text(encoder):  # "" has no token at all with this tokenizer
        filler = encoder.tokenizer.convert_ids_to_tokens(encoder.tokenize([""])[0].input_ids)[0]
        if first_module.startswith("decoder2vec."):
            return (
                f"An empty text has no tokens with this tokenizer; `{first_module}` gives it one filler token "
                f"(`{filler}`), as decoder2vec does: the same vector."
            )
        return (
            "An empty text has no tokens with this tokenizer. decoder2vec reads one filler token "
            f"(`{filler}`) instead; stock sentence-transformers cannot (a module of its own would need "
            "trust_remote_code=True): a batch of only empty texts fails inside the model's attention ('cannot "
            "reshape tensor of 0 elements') and, batched with other texts, an empty text gets a zero vector. "
            "Drop empty texts first, or use Encoder.from_pretrained on this folder or the ONNX export."
        )
    if encoder.config.pooling in ("last_token", "bos"):
        return "An empty text reads the special tokens the tokenizer adds and pools them as decoder2vec does."
    return (
        "An empty text: decoder2vec pools the special tokens the tokenizer adds (its only tokens); here they have "
        "weight 0 (WordWeights), so sentence-transformers returns a zero vector for it. Encoder.from_pretrained "
        "on this folder gives decoder2vec's vector."
    )


def _st_pooling_modules(encoder) -> list[tuple[object, str]]:
    """The stock sentence-transformers modules after the Transformer that pool as the encoder does, with notes.

    sentence-transformers' Pooling reads every real token; decoder2vec leaves out the special tokens
    the tokenizer adds around a text (BOS; an appended EOS). A WordWeights module with weight 0 for
    those token ids removes them from ``mean`` (its weight sum becomes the denominator).
    """
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, WordWeights
    except ImportError as error:
        raise ExportError(
            "the sentence-transformers format needs the sentence-transformers package: "
            "pip install 'decoder2vec[st]' (or export with --format merged)"
        ) from error
    config = encoder.config
    mode = _ST_POOLING[config.pooling]
    if config.pooling in ("last_token", "bos"):  # the last real token (our EOS) / the first one (BOS): exact
        return [(Pooling(encoder.dim, pooling_mode=mode, include_prompt=True), "")]
    around = _special_ids_around_text(encoder)
    pooling = Pooling(encoder.dim, pooling_mode=mode, include_prompt=False)
    if not around:  # the tokenizer adds nothing around a text: stock pooling is exact
        note = ""
        if config.pooling == "weighted_mean":
            note = (
                "With a prompt, sentence-transformers' weightedmean keeps the text tokens' absolute position "
                "weights (prompt length + 1, ...); decoder2vec weights the text tokens 1, 2, ..., n."
            )
        return [(pooling, note)]
    vocab = encoder.tokenizer.convert_ids_to_tokens(list(range(len(encoder.tokenizer))))
    names = {vocab[i]: 0.0 for i in sorted(around)}
    weights = WordWeights(vocab=vocab, word_weights=names, unknown_word_weight=1.0)
    zeroed = set(_ids_not_weighted_one(weights.emb_layer.weight))
    if zeroed != set(around):
        raise ExportError(
            f"cannot give weight 0 to exactly the special tokens {sorted(around)} (got {sorted(zeroed)})"
        )
    listed = ", ".join(f"`{vocab[i]}`" for i in sorted(around))
    note = (
        f"The tokenizer adds {listed} around every text. decoder2vec leaves them out of pooling; this folder does "
        "the same with a WordWeights module (weight 0 for those ids) before Pooling. With a prompt, the direction of a vector "
        "matches but its length is smaller (the prompt's tokens stay in the weight sum): normalize."
    )
    if config.pooling == "weighted_mean":
        note += (
            " weighted_mean is not expressible exactly: sentence-transformers weights text tokens by absolute "
            "position (2, 3, ..., n + 1 after a BOS) and divides by the token count, decoder2vec weights them "
            "1, 2, ..., n and divides by the weight sum; the vectors are close in direction, not equal."
        )
    return [(weights, ""), (pooling, note)]


def _ids_not_weighted_one(weight) -> list[int]:  # WordWeights table (vocab, 1) -> ids whose weight is not 1
    return [int(i) for i in (weight.detach().squeeze(-1) != 1).nonzero().flatten()]


def _class_path(module) -> str:
    return f"{type(module).__module__}.{type(module).__name__}"


def _write_plain_tokenizer(encoder, folder: Path) -> None:
    """Save the tokenizer for plain-text use: no chat template, right padding, our max length, EOS when we add it."""
    tokenizer = encoder.tokenizer
    tokenizer.save_pretrained(folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    settings_path = folder / "tokenizer_config.json"
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    settings.pop("chat_template", None)
    settings["padding_side"] = "right"
    settings["model_max_length"] = encoder.config.max_length
    settings["split_special_tokens"] = True  # "</s>" typed in a text is text, as decoder2vec reads it
    if tokenizer.pad_token is None:  # sentence-transformers pads batches; decoder2vec pads with EOS then
        settings["pad_token"] = tokenizer.eos_token
    _write_json(settings_path, settings)
    if encoder.config.adds_eos:
        if tokenizer.eos_token is None:
            raise ExportError("the encoder appends EOS but the tokenizer has no eos_token; set one before exporting")
        tokenizer_path = folder / "tokenizer.json"
        data = json.loads(tokenizer_path.read_text())
        data["post_processor"] = _with_eos(data.get("post_processor"), tokenizer.eos_token, tokenizer.eos_token_id)
        _write_json(tokenizer_path, data)


def _with_eos(post_processor: dict | None, eos: str, eos_id: int) -> dict:
    """A tokenizers post-processor that also appends ``eos`` after every sequence."""
    special = {"SpecialToken": {"id": eos, "type_id": 0}}
    if post_processor and post_processor.get("type") == "TemplateProcessing":
        processor = copy.deepcopy(post_processor)
        processor["single"] = [*processor["single"], special]
        processor["pair"] = [*processor["pair"], {"SpecialToken": {"id": eos, "type_id": 1}}]
        processor["special_tokens"][eos] = {"id": eos, "ids": [eos_id], "tokens": [eos]}
        return processor
    if post_processor and post_processor.get("type") == "Sequence":
        processors = post_processor["processors"]
        if any(p.get("type") == "TemplateProcessing" for p in processors):
            return {
                **post_processor,
                "processors": [
                    _with_eos(p, eos, eos_id) if p.get("type") == "TemplateProcessing" else p for p in processors
                ],
            }
        return {**post_processor, "processors": [*processors, _with_eos(None, eos, eos_id)]}
    template = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}, special],
        "pair": [
            {"Sequence": {"id": "A", "type_id": 0}},
            special,
            {"Sequence": {"id": "B", "type_id": 1}},
            {"SpecialToken": {"id": eos, "type_id": 1}},
        ],
        "special_tokens": {eos: {"id": eos, "ids": [eos_id], "tokens": [eos]}},
    }
    if post_processor:
        return {"type": "Sequence", "processors": [post_processor, template]}
    return template


def _check_tokenizer(encoder, folder: Path) -> None:
    """The saved tokenizer, called as sentence-transformers calls it, must give decoder2vec's token ids."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(folder)
    long_text = " ".join(["word"] * (encoder.config.max_length + 8))
    probes = [*_PROBES, long_text]
    got = saved(probes, truncation=True, max_length=encoder.config.max_length)["input_ids"]
    expected = [f.input_ids for f in encoder.tokenize(probes)]
    for text, ids, want in zip(probes, got, expected, strict=True):
        if list(ids) != list(want):
            raise ExportError(
                f"the exported tokenizer gives {list(ids)[:8]}... for {text[:30]!r}, decoder2vec gives {want[:8]}...; "
                f"this tokenizer ({type(encoder.tokenizer).__name__}) cannot be exported for sentence-transformers "
                "as is. Use --format merged and load it with decoder2vec."
            )


def _special_ids_around_text(encoder) -> set[int]:
    """Token ids the encoder adds before and after a text (BOS, appended EOS), never part of its pooling."""
    features = encoder.tokenize(["A man is playing a guitar."])[0]
    first = features.pool_mask.index(1)
    last = len(features.pool_mask) - 1 - features.pool_mask[::-1].index(1)
    return {features.input_ids[i] for i in range(len(features.input_ids)) if i < first or i > last}


# ---------------------------------------------------------------------- model card
def write_model_card(folder: Path, encoder, format: str, *, evaluation=None, notes=(), title="") -> None:  # noqa: A002
    """README.md: base model, settings, training stages and configs, evaluation table, usage, limitations."""
    config = encoder.config
    base = _base_model_name(encoder)
    stages = training_stages(encoder)
    library = "transformers" if format == "merged" else "sentence-transformers"
    lines = [
        "---",
        f"library_name: {library}",
        f"base_model: {base}",
        "tags: [decoder2vec, llm2vec, sentence-embeddings, feature-extraction]",
        "pipeline_tag: feature-extraction",
        "---",
        "",
        f"# {title or Path(folder).name}",
        "",
        f"A text encoder made from the decoder-only model `{base}` with decoder2vec (LLM2Vec method), "
        f"exported as a {format} folder.",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| pooling | {config.pooling} |",
        f"| attention | {'bidirectional' if config.bidirectional else 'causal'} |",
        f"| max length | {config.max_length} tokens |",
        f"| dimensions | {encoder.dim} |",
        f"| instruction template | `{config.instruction_template}` |",
        f"| query instruction | {_code(config.query_instruction)} |",
        f"| document instruction | {_code(config.document_instruction)} |",
        f"| prompt | {_code(json.dumps(config.text_prompt.template))}, pooled: {config.text_prompt.pooled} |",
        "",
        "## Training",
        "",
    ]
    if stages:
        for index, (name, adapter, stage_config) in enumerate(stages, 1):
            lines += [f"{index}. **{name}** (adapter `{adapter}`)", "", "```json", json.dumps(stage_config, indent=2)]
            lines += ["```", ""]
    else:
        lines += ["No training stages recorded (an untrained model, or adapters without their stage config).", ""]
    lines += _precision_lines(folder)
    lines += ["## Evaluation", ""]
    lines += _evaluation_lines(evaluation) or ["Not evaluated at export time."]
    lines += ["", "## Usage", "", *_usage_lines(format, config)]
    if notes:
        lines += ["", "## What this format cannot express", ""] + [f"- {note}" for note in notes]
    (folder / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _precision_lines(folder: Path) -> list[str]:
    """What the ONNX graph computes in, and how far its vectors were measured from the Encoder's."""
    from .onnx_export import FLOAT32_TOLERANCE, INT8_MIN_COSINE, PRECISION_FILE

    path = Path(folder) / PRECISION_FILE
    if not path.is_file():
        return []
    measured = json.loads(path.read_text())
    lines = ["## Precision", ""]
    if measured["precision"] == "float32":
        lines.append(
            f"float32 ONNX graph (opset {measured['opset']}). On {measured['checked_texts']} probe texts its vectors "
            f"differ from the PyTorch Encoder's by at most {measured['max_abs_difference']:.1e} (absolute), "
            f"{measured.get('max_relative_difference', float('nan')):.1e} of a vector's largest component (export "
            f"fails above {FLOAT32_TOLERANCE:.0e} of it)."
        )
    else:
        lines.append(
            f"{measured['precision']} ONNX graph (opset {measured['opset']}): {measured['quantization']}. On "
            f"{measured['checked_texts']} probe texts each vector's cosine similarity to the float32 PyTorch "
            f"Encoder's is at least {measured['min_cosine']:.4f} (export fails below {INT8_MIN_COSINE}); the "
            f"largest absolute difference is {measured['max_abs_difference']:.1e}. Activations are quantized per "
            "batch, so a text's vector depends slightly on the texts batched with it."
        )
    return [*lines, ""]


def _code(value) -> str:
    return f"`{value}`" if value else "none"


def _base_model_name(encoder) -> str:
    """The name the user loaded (a short name, hub id or folder); a converted GGUF names its file."""
    source = encoder.source or getattr(encoder.model.config, "_name_or_path", "") or "unknown"
    record = Path(source) / "decoder2vec_source.json"
    if record.is_file():
        try:
            return json.loads(record.read_text()).get("gguf", source)
        except json.JSONDecodeError:
            pass
    return source


def training_stages(encoder) -> list[tuple[str, str, dict]]:
    """(stage, adapter folder, config) for each adapter the encoder was loaded with that records its stage."""
    from .model import _adapter_list

    adapters = list(getattr(encoder, "adapters", None) or [])  # set by Encoder.from_pretrained
    found = []
    for adapter in _adapter_list(adapters):
        for stage in STAGE_NAMES:
            path = Path(adapter) / f"{stage}_config.json"
            if path.is_file():
                try:
                    found.append((stage, adapter, json.loads(path.read_text())))
                except json.JSONDecodeError:
                    logger.warning("ignoring unreadable %s", path)
    return found


def _evaluation_lines(evaluation) -> list[str]:
    if not evaluation:
        return []
    if "tasks" in evaluation:  # a decoder2vec evaluation report
        lines = ["| task | type | main metric | score |", "|---|---|---|---:|"]
        for task in evaluation["tasks"]:
            score = task.get("main_score")
            shown = f"{score:.2f}" if isinstance(score, int | float) else str(score)
            lines.append(f"| {task.get('name')} | {task.get('type', '')} | {task.get('main_metric', '')} | {shown} |")
        return lines
    lines = ["| task | score |", "|---|---:|"]
    for name, score in evaluation.items():
        lines.append(f"| {name} | {score:.2f} |" if isinstance(score, int | float) else f"| {name} | {score} |")
    return lines


def _usage_lines(format: str, config) -> list[str]:  # noqa: A002
    name = "path/to/this/folder"
    query = config.query_instruction or "Given a question, retrieve passages that answer it"
    lines = [
        "With decoder2vec:",
        "",
        "```python",
        "from decoder2vec import Encoder",
        "",
        f'encoder = Encoder.from_pretrained("{name}")',
        'documents = encoder.encode(["A man is playing a guitar."], normalize=True)',
        f'queries = encoder.encode(["who plays music?"], instruction="{query}", normalize=True)',
        "```",
        "",
        "```bash",
        f"decoder2vec encode texts.txt -o vectors.npy --model {name} --normalize",
        f"decoder2vec serve --model {name} --port 8080",
        "```",
    ]
    if format == "onnx":
        lines += [
            "",
            "With sentence-transformers (the first module is decoder2vec's: `pip install decoder2vec[onnx]`):",
            "",
            "```python",
            "from sentence_transformers import SentenceTransformer",
            "",
            f'model = SentenceTransformer("{name}", backend="onnx", trust_remote_code=True)',
            'vectors = model.encode(["A man is playing a guitar."])',
            "```",
            "",
            "With plain onnxruntime: run `onnx/model.onnx` on `input_ids` and `attention_mask` (int64, padding on "
            "the right) and pool `last_hidden_state` as the Pooling module in this folder says (docs/inference.md "
            "in decoder2vec has a complete example).",
        ]
    if format == "sentence-transformers":
        lines += [
            "",
            "With sentence-transformers:",
            "",
            "```python",
            "from sentence_transformers import SentenceTransformer",
            "",
            f'model = SentenceTransformer("{name}")',
            'vectors = model.encode(["A man is playing a guitar."])',
            "```",
        ]
    return lines


# ---------------------------------------------------------------------- helpers
def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _versions() -> dict:
    from importlib import metadata

    versions = {}
    for package in ("decoder2vec", "transformers", "torch", "sentence-transformers"):
        try:
            versions[package.replace("-", "_")] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


_WRITERS = {"sentence-transformers": write_sentence_transformers, "merged": write_merged}


# ---------------------------------------------------------------------- CLI
def _export_command(args) -> None:
    from .cli import load_encoder

    evaluation = None
    if args.eval_report:
        path = Path(args.eval_report)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation report {str(path)!r} not found")
        evaluation = json.loads(path.read_text())
    quantize, args.quantize = args.quantize, None  # quantizes the graph written, not the model loaded
    encoder = load_encoder(args)
    try:
        folder = export_model(
            encoder, args.output, args.format, evaluation=evaluation, overwrite=args.overwrite, quantize=quantize
        )
    except (ExportError, FileExistsError, ModelSourceError) as error:
        raise ValueError(str(error)) from error
    print(
        json.dumps(
            {"format": args.format, "quantize": quantize, "output": str(folder), "config": asdict(encoder.config)}
        )
    )


def register(subparsers) -> None:
    from .cli import add_model_arguments

    parser = subparsers.add_parser("export", help="write a sentence-transformers, merged or ONNX model folder")
    parser.add_argument("output", help="the folder to create")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="sentence-transformers")
    parser.add_argument("--eval-report", default=None, help="evaluation report JSON for the model card's table")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_model_arguments(parser)
    parser.set_defaults(handler=_export_command)
