"""Average LoRA adapters exactly: the result merged into the base equals the base plus the mean of their deltas.

Averaging the ``A`` and ``B`` matrices of LoRA adapters separately is *not* averaging what they do: the
update of one layer is ``scale * B @ A``, and the mean of products is not the product of means. The exact
average of ``k`` adapters is one adapter of rank ``r_1 + ... + r_k``: the ``A`` matrices stacked along the
rank, the ``B`` matrices side by side, each ``B_i`` multiplied by its weight and its own scale
(``alpha_i / r_i``), and the new scale set to 1 (``lora_alpha = rank``)::

    sum_i w_i * s_i * B_i @ A_i  ==  [w_1 s_1 B_1 | ... | w_k s_k B_k] @ [A_1; ...; A_k]

This averages checkpoints of one run (the tail of a SimCSE run, as weight averaging does) or runs that differ
only in their seed. ``scale`` multiplies the averaged update: the merged weights become ``base + scale * mean``,
i.e. they move back toward the base model for ``scale < 1`` (WiSE-FT's interpolation between the pretrained and
the fine-tuned weights; one adapter averaged with a zero one).

The adapters must adapt the same modules of the same base model, trained on the same stack of earlier (merged)
adapters; the result keeps that stack, so it loads like any run folder::

    average_adapters(["runs/simcse/checkpoints/step-0000040", "runs/simcse"], "runs/simcse-avg")
    encoder = Encoder.from_pretrained("gemma3-270m", adapter="runs/simcse-avg")
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["average_adapters"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_COPIED = ("decoder2vec_config.json", "decoder2vec_stack.json")


def average_adapters(
    folders: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    weights: Sequence[float] | None = None,
    scale: float = 1.0,
) -> Path:
    """Write to ``output`` one LoRA adapter whose update is ``scale`` times the weighted mean of the ``folders``'.

    ``weights`` default to equal (1/k each); they are normalized to sum to 1. ``scale`` (> 0) interpolates
    between the base model (toward 0) and the average (1). Written to a temporary folder and renamed, so
    ``output`` is either complete or absent. Returns ``output`` as a Path.
    """
    from safetensors.torch import load_file, save_file

    folders = [Path(f) for f in folders]
    if not folders:
        raise ValueError("average_adapters needs at least one adapter folder")
    for folder in folders:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} has no {name}; pass PEFT LoRA adapter folders (run folders)")
    weights = [1.0] * len(folders) if weights is None else [float(w) for w in weights]
    if len(weights) != len(folders) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be {len(folders)} non-negative numbers with a positive sum, not {weights}")
    if not scale > 0:
        raise ValueError(f"scale must be a positive fraction of the update (1 keeps it whole), not {scale}")
    weights = [scale * w / sum(weights) for w in weights]

    configs = [json.loads((f / ADAPTER_CONFIG).read_text()) for f in folders]
    states = [load_file(f / ADAPTER_WEIGHTS) for f in folders]
    _check_compatible(folders, configs, states)

    merged: dict[str, torch.Tensor] = {}
    for name in states[0]:
        if ".lora_A." in name:  # (r_i, in) stacked along the rank
            merged[name] = torch.cat([state[name] for state in states], dim=0).contiguous()
        elif ".lora_B." in name:  # (out, r_i) side by side, each scaled by its weight and its own alpha / r
            scaled = [w * _scale(c) * s[name] for w, c, s in zip(weights, configs, states, strict=True)]
            merged[name] = torch.cat(scaled, dim=1).contiguous()
        else:
            raise ValueError(f"{folders[0]}: unsupported adapter tensor {name!r} (only LoRA A/B matrices average)")
    rank = sum(c["r"] for c in configs)
    config = {**configs[0], "r": rank, "lora_alpha": rank, "rank_pattern": {}, "alpha_pattern": {}}

    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(merged, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    source = _run_folder(folders[0])
    for name in _COPIED:
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    if (source / "stack").is_dir():
        shutil.copytree(source / "stack", tmp / "stack")
    (tmp / "decoder2vec_average.json").write_text(
        json.dumps({"adapters": [str(f) for f in folders], "weights": weights, "scale": scale}, indent=1) + "\n"
    )
    shutil.rmtree(output, ignore_errors=True)
    os.replace(tmp, output)
    return output


def _scale(config: dict) -> float:
    return config["lora_alpha"] / config["r"]


def _run_folder(folder: Path) -> Path:
    """A checkpoint (run/checkpoints/step-N) keeps its stack and pooling files in the run folder above it."""
    if folder.parent.name == "checkpoints" and not (folder / "decoder2vec_config.json").is_file():
        return folder.parent.parent
    return folder


def _check_compatible(folders: list[Path], configs: list[dict], states: list[dict]) -> None:
    first = configs[0]
    for folder, config, state in zip(folders[1:], configs[1:], states[1:], strict=True):
        for key in ("base_model_name_or_path", "peft_type", "bias"):
            if config.get(key) != first.get(key):
                raise ValueError(
                    f"{folder} differs from {folders[0]} in {key}: {config.get(key)!r} vs {first.get(key)!r}"
                )
        if set(state) != set(states[0]):
            raise ValueError(f"{folder} adapts other modules than {folders[0]}; only like adapters can be averaged")
    for folder, config in zip(folders, configs, strict=True):
        if (
            config.get("use_dora")
            or config.get("use_rslora")
            or config.get("rank_pattern")
            or config.get("alpha_pattern")
        ):
            raise ValueError(f"{folder}: DoRA, rsLoRA and per-module ranks are not supported by average_adapters")
    stacks = {_stack_fingerprint(_run_folder(f)) for f in folders}
    if len(stacks) > 1:
        raise ValueError("the adapters were trained on different earlier stages (stack/); average like runs only")


def _stack_fingerprint(folder: Path) -> tuple:
    import hashlib

    stack = folder / "stack"
    if not stack.is_dir():
        return ()
    return tuple(
        (str(p.relative_to(stack)), hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(stack.rglob("*.safetensors"))
    )
