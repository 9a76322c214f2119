"""One training loop for every stage (MNTP, SimCSE, supervised), on one CPU or many GPUs.

Read top to bottom: prepare the run folder (or find the checkpoint to resume), load the base model
with earlier stages' adapters merged, add a fresh LoRA adapter, build the stage, then loop:
micro-batches -> loss -> backward -> clip -> AdamW step -> log -> checkpoint. accelerate handles devices,
mixed precision and several processes (``accelerate launch`` / ``torchrun``); without a launcher it
runs in one process.

A run folder holds::

    adapter_config.json, adapter_model.safetensors   the trained LoRA adapter (PEFT format)
    decoder2vec_stack.json, stack/0, stack/1 ...     earlier adapters it was trained on (merged first)
    <stage>_config.json                              the full configuration (reusable with --config)
    decoder2vec_config.json                          how the encoder pools (for loading)
    log.json, loss.png                               loss and learning rate per step
    checkpoints/step-0000050/                        adapter, optimizer, scheduler, RNG and log at a step
                                                     (safetensors, tensor-only torch files, JSON: loading one
                                                     never unpickles arbitrary objects)
    merged/                                          with save_merged: the model with the adapter merged in

Checkpoints are written to a temporary folder and renamed, so a killed run never leaves half of one.
A resumed run continues at the checkpoint's step with its optimizer, scheduler and random state; data
order and MNTP masks are a function of (seed, step), so it sees the same batches as a run that never stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..model import STACK_NAME, Encoder, _adapter_list
from .config import TrainConfig
from .fused_lora import fuse_lora
from .stages import build_stage

__all__ = ["TrainResult", "train"]

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class TrainResult:
    run_dir: Path
    encoder: Encoder  # the trained encoder, adapter live, in eval mode
    log: list[dict]  # one entry per step: step, loss, lr, seconds
    start_step: int = 0  # the checkpoint's step when the run resumed, else 0


def train(config: TrainConfig) -> TrainResult:
    """Train one stage as ``config`` says; returns the run folder, the trained encoder and the log."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    # cpu=True without GPUs: under torchrun, accelerate then runs one process per CPU worker (gloo), not one alone
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    run_dir = Path(config.output_dir)
    resume_from = _find_resume_checkpoint(run_dir, config)
    set_seed(config.seed)

    # ---- model: base + earlier adapters merged, then a new LoRA adapter
    encoder = Encoder.from_pretrained(
        config.model,
        adapter=config.adapter,
        pooling=config.pooling,
        bidirectional=config.bidirectional,
        num_layers=config.num_layers,
        dtype=config.dtype,
        device=accelerator.device,
    )
    encoder.model = _add_lora(encoder.model, config)
    stage = build_stage(config, encoder)
    if config.fused_lora:
        stage.cleanup.append(fuse_lora(encoder.model))

    # ---- optimizer and schedule (sized from steps, never from epochs)
    parameters = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps
    )
    # The scheduler is not prepared: accelerate would step it once per process.
    module, optimizer = accelerator.prepare(stage.module, optimizer)

    start, log = 0, []
    if resume_from is not None:
        start, log = _load_checkpoint(resume_from, encoder, optimizer, scheduler, accelerator)
        logger.info("resuming %s at step %d", run_dir, start)
    if accelerator.is_main_process:
        _write_run_files(run_dir, config, encoder)
    order = _BatchOrder(
        len(stage.examples), config.batch_size, accelerator.num_processes, accelerator.process_index, config.seed
    )

    # ---- the loop
    module.train()
    accumulation = config.gradient_accumulation_steps
    bar = tqdm(
        total=config.steps,
        initial=start,
        desc=config.stage,
        unit="step",
        disable=not (config.progress and accelerator.is_main_process),
    )
    clock = time.perf_counter() - (log[-1]["seconds"] if log else 0.0)
    for step in range(start, config.steps):
        lr = scheduler.get_last_lr()[0]
        step_loss = 0.0
        for micro in range(accumulation):
            index = step * accumulation + micro
            examples = [stage.examples[i] for i in order.indices(index)]
            generator = torch.Generator().manual_seed(
                config.seed * 1_000_003 + index * 101 + accelerator.process_index
            )
            sync = accelerator.no_sync(module) if micro < accumulation - 1 else contextlib.nullcontext()
            with sync:
                loss = stage.step(
                    module,
                    examples,
                    generator,
                    backward=lambda value: accelerator.backward(value / accumulation),
                    no_sync=lambda: accelerator.no_sync(module),
                )
            step_loss += loss.float().item() / accumulation
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        mean_loss = accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), reduction="mean").item()
        log.append({"step": step + 1, "loss": mean_loss, "lr": lr, "seconds": round(time.perf_counter() - clock, 3)})
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
        if accelerator.is_main_process:
            _write_json(run_dir / "log.json", {"stage": config.stage, "steps": log})
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            _save_checkpoint(
                run_dir, step + 1, encoder, optimizer, scheduler, log, accelerator, config.keep_checkpoints
            )
        if config.step_delay:
            time.sleep(config.step_delay)
    bar.close()

    # ---- the run folder: final adapter, loss curve, maybe a merged model
    for undo in stage.cleanup:
        undo()
    encoder.eval()
    if accelerator.is_main_process:
        _save_adapter_atomically(encoder, run_dir)
        _write_json(run_dir / "log.json", {"stage": config.stage, "steps": log})
        plot_loss(log, run_dir / "loss.png", title=f"{config.stage}: {Path(config.model).name}")
        if config.save_merged:
            save_merged(encoder, run_dir / "merged")
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, encoder, log, start)


# ---------------------------------------------------------------------- model
def _add_lora(model, config: TrainConfig):
    """Merge a live adapter (the last earlier stage) into the base, then wrap in a fresh LoRA adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = model.config.get_text_config().num_hidden_layers
    if config.lora_layers is not None and config.lora_layers > layers:
        raise ValueError(f"lora_layers {config.lora_layers} exceeds the model's {layers} decoder layers")
    targets = config.lora_target_modules or "all-linear"  # every linear layer but the LM head
    top = None
    if config.lora_layers is not None:  # below the lowest adapted layer nothing needs a gradient: backward stops
        top = list(range(layers - config.lora_layers, layers))
        if isinstance(targets, str):  # peft takes a layer range only with module names: those of "all-linear"
            targets = sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
                - {"lm_head"}
            )
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        layers_to_transform=top,
        bias="none",
    )
    with warnings.catch_warnings():  # peft reads `is_gradient_checkpointing`, which transformers 5 deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, lora)


def save_merged(encoder: Encoder, folder: Path) -> None:
    """Save the model with its live adapter merged in (plus tokenizer and pooling), atomically."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = encoder.model
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged.save_pretrained(tmp)
    encoder.tokenizer.save_pretrained(tmp)
    encoder.save_config(tmp)
    encoder.model = merged
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


# ---------------------------------------------------------------------- data order
class _BatchOrder:
    """Which examples micro-batch ``index`` holds: a fresh permutation per epoch, seeded; sliced per process."""

    def __init__(self, size: int, batch_size: int, processes: int, rank: int, seed: int):
        if size == 0:
            raise ValueError("the training data is empty")
        self.size, self.batch_size, self.processes, self.rank, self.seed = size, batch_size, processes, rank, seed

    @lru_cache(maxsize=4)  # noqa: B019 (a handful of epochs, freed with the run)
    def _permutation(self, epoch: int) -> list[int]:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def indices(self, index: int) -> list[int]:
        first = (index * self.processes + self.rank) * self.batch_size
        return [self._permutation(p // self.size)[p % self.size] for p in range(first, first + self.batch_size)]


# ---------------------------------------------------------------------- run folder and checkpoints
def _find_resume_checkpoint(run_dir: Path, config: TrainConfig) -> Path | None:
    checkpoints = _checkpoints(run_dir)
    if checkpoints and not config.resume:
        raise ValueError(
            f"output_dir {str(run_dir)!r} already holds a run (checkpoint {checkpoints[-1].name}); "
            "pass --resume true to continue it, or choose another --output-dir"
        )
    if config.resume and not checkpoints:
        logger.warning("resume: no checkpoint in %s, starting from step 0", run_dir)
    return checkpoints[-1] if config.resume and checkpoints else None


def _checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    complete = [p for p in folder.glob("step-*") if (p / "state.json").is_file()]
    return sorted(complete, key=lambda p: int(p.name.split("-")[1]))


def _write_run_files(run_dir: Path, config: TrainConfig, encoder: Encoder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_dir / f"{config.stage}_config.json", asdict(config))
    encoder.save_config(run_dir)
    earlier = _adapter_list(config.adapter)
    if earlier:  # copies, so the run folder stays valid when the earlier runs move or disappear
        stack = run_dir / "stack"
        shutil.rmtree(stack, ignore_errors=True)
        for i, path in enumerate(earlier):
            (stack / str(i)).mkdir(parents=True)
            for name in ADAPTER_FILES:
                shutil.copy2(Path(path) / name, stack / str(i) / name)
        _write_json(run_dir / STACK_NAME, {"merge_first": [f"stack/{i}" for i in range(len(earlier))]})


def _save_checkpoint(run_dir, step, encoder, optimizer, scheduler, log, accelerator, keep: int) -> None:
    """adapter + optimizer + scheduler + RNG (one file per process) + step and log, via temp folder and rename."""
    # accelerate's save_state would write the full model's weights; only the adapter changes here.
    final = run_dir / CHECKPOINTS / f"step-{step:07d}"
    tmp = run_dir / CHECKPOINTS / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        encoder.model.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    _write_json(tmp / f"rng-{accelerator.process_index}.json", _rng_state())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / "state.json", {"step": step, "log": log})  # written last: marks the folder complete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(folder: Path, encoder, optimizer, scheduler, accelerator) -> tuple[int, list[dict]]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((folder / "state.json").read_text())
    set_peft_model_state_dict(encoder.model, load_file(folder / "adapter_model.safetensors"))
    optimizer.load_state_dict(_load_tensors(folder / "optimizer.pt"))
    scheduler.load_state_dict(_load_tensors(folder / "scheduler.pt"))
    rng_file = folder / f"rng-{accelerator.process_index}.json"
    if rng_file.is_file():
        _set_rng_state(json.loads(rng_file.read_text()))
    else:
        logger.warning(
            "%s has no random state for process %d; dropout differs from an unbroken run",
            folder,
            accelerator.process_index,
        )
    return state["step"], state["log"]


class CheckpointError(ValueError):
    """A checkpoint file is not in the plain form this version writes (tensors, numbers, JSON); it is not read."""


def _load_tensors(path: Path):
    """``torch.load`` restricted to tensors and plain containers: a pickle that would build other objects
    (and so could run code) is refused before anything of it runs."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values, so it was not loaded (unpickling them "
            f"could run code): {reason}. Resume only from checkpoints this program wrote; delete the folder "
            f"{path.parent} or train into another --output-dir."
        ) from None


def _rng_state() -> dict:
    """Every random generator's state as JSON-friendly lists and numbers (read back without unpickling)."""
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    cuda = [state.tolist() for state in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None
    return {
        "python": [version, list(python_state), gauss],
        "numpy": [name, keys.tolist(), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state().tolist(),
        "cuda": cuda,
    }


def _set_rng_state(state: dict) -> None:
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _save_adapter_atomically(encoder: Encoder, run_dir: Path) -> None:
    tmp = run_dir / f".adapter.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.model.save_pretrained(tmp)
    for name in ADAPTER_FILES:
        os.replace(tmp / name, run_dir / name)
    shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def plot_loss(log: list[dict], path: Path, title: str = "") -> None:
    """Loss (and learning rate, dashed, right axis) per step as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [entry["step"] for entry in log]
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot(steps, [entry["loss"] for entry in log], color="tab:blue", label="loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    rate = axis.twinx()
    rate.plot(steps, [entry["lr"] for entry in log], color="tab:orange", linestyle="--", label="learning rate")
    rate.set_ylabel("learning rate")
    axis.set_title(title)
    figure.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    figure.savefig(tmp)
    plt.close(figure)
    os.replace(tmp, path)
