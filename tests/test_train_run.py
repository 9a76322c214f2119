import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from decoder2vec import Encoder
from decoder2vec.cli import main
from decoder2vec.train import MNTPConfig, SimCSEConfig, train
from tiny import CORPUS

TEXTS = CORPUS[:7]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("\n".join(CORPUS) + "\n")
    return path


def _mntp(model, text_file, out, **overrides):
    settings = dict(
        model=str(model),
        data=[str(text_file)],
        output_dir=str(out),
        steps=4,
        batch_size=4,
        max_seq_length=16,
        checkpoint_every=2,
        progress=False,
        seed=0,
    )
    return MNTPConfig(**{**settings, **overrides})


def test_run_folder_logs_checkpoints_and_loads(tiny_llama_dir, text_file, tmp_path):
    config = _mntp(tiny_llama_dir, text_file, tmp_path / "mntp", steps=5, warmup_steps=2, keep_checkpoints=2)
    result = train(config)
    run = result.run_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "mntp_config.json", "log.json", "loss.png"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / "mntp_config.json").read_text())["steps"] == 5
    log = json.loads((run / "log.json").read_text())["steps"]
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5] and all(np.isfinite(e["loss"]) for e in log)
    lrs = [e["lr"] for e in log]  # warm-up then linear decay, sized from steps: never 0 during the run
    assert lrs[0] < lrs[1] and lrs[2] > lrs[3] > lrs[4] > 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004", "step-0000005"]
    reloaded = Encoder.from_pretrained(str(tiny_llama_dir), adapter=str(run), device="cpu").encode(TEXTS)
    assert np.abs(reloaded - result.encoder.encode(TEXTS)).max() < 1e-5
    base = Encoder.from_pretrained(str(tiny_llama_dir), device="cpu").encode(TEXTS)
    assert np.abs(reloaded - base).max() > 1e-4  # the adapter learned something
    with pytest.raises(ValueError, match="already holds a run"):
        train(config)


def test_stacked_stages_merged_and_unmerged_agree(tiny_llama_dir, text_file, tmp_path):
    mntp = train(_mntp(tiny_llama_dir, text_file, tmp_path / "mntp", learning_rate=1e-2))
    simcse = SimCSEConfig(
        model=str(tiny_llama_dir),
        adapter=[str(mntp.run_dir)],
        data=[str(text_file)],
        output_dir=str(tmp_path / "simcse"),
        steps=3,
        batch_size=4,
        learning_rate=1e-2,
        save_merged=True,
        progress=False,
    )
    result = train(simcse)
    run = result.run_dir
    assert json.loads((run / "decoder2vec_stack.json").read_text()) == {"merge_first": ["stack/0"]}
    live = Encoder.from_pretrained(str(tiny_llama_dir), adapter=str(run), device="cpu").encode(TEXTS)
    merged = Encoder.from_pretrained(str(run / "merged"), device="cpu").encode(TEXTS)
    explicit = Encoder.from_pretrained(str(tiny_llama_dir), adapter=[str(mntp.run_dir), str(run)], device="cpu")
    only_simcse = Encoder.from_pretrained(str(tiny_llama_dir), adapter=str(run / "stack" / "0"), device="cpu")
    assert np.abs(live - merged).max() < 1e-4
    assert np.abs(live - explicit.encode(TEXTS)).max() < 1e-5  # the MNTP adapter is merged once, not twice
    assert np.abs(live - result.encoder.encode(TEXTS)).max() < 1e-4
    assert np.abs(live - only_simcse.encode(TEXTS)).max() > 1e-4  # the SimCSE adapter changed the vectors


def _run_log(run):
    return json.loads((Path(run) / "log.json").read_text())["steps"]


def test_lora_on_the_top_layers_only(tiny_llama_dir, text_file, tmp_path):
    from safetensors.torch import load_file

    from decoder2vec.train.run import _add_lora

    config = SimCSEConfig(
        model=str(tiny_llama_dir), data=[str(text_file)], output_dir=str(tmp_path / "top"), steps=2, batch_size=4,
        max_seq_length=16, progress=False, lora_layers=1,
    )  # fmt: skip
    result = train(config)
    names = load_file(result.run_dir / "adapter_model.safetensors")
    assert names and all(".layers.1." in name for name in names)  # the tiny model has layers 0 and 1
    # nothing below the adapted layer needs a gradient, so backward stops there
    encoder = Encoder.from_pretrained(tiny_llama_dir, device="cpu")
    encoder.model = _add_lora(encoder.model, config)
    needs_grad = {}
    for index, layer in enumerate(encoder.backbone.layers):
        layer.register_forward_hook(lambda m, a, out, i=index: _record(needs_grad, i, out))
    encoder.train()
    encoder(encoder.collate(encoder.tokenize(TEXTS[:2])))
    assert needs_grad == {0: False, 1: True}
    with pytest.raises(ValueError, match="lora_layers 3 exceeds the model's 2 decoder layers"):
        _add_lora(Encoder.from_pretrained(tiny_llama_dir, device="cpu").model, SimCSEConfig(lora_layers=3))
    with pytest.raises(ValueError, match="lora_layers must be an integer >= 1"):
        SimCSEConfig(lora_layers=0)


def _record(needs_grad: dict, index: int, output) -> None:  # a forward hook that returns None keeps the output
    needs_grad[index] = (output[0] if isinstance(output, tuple) else output).requires_grad


def test_resume_after_sigkill_continues_where_it_stopped(tiny_llama_dir, text_file, tmp_path):
    steps = 14
    config = _mntp(tiny_llama_dir, text_file, tmp_path / "killed", steps=steps, step_delay=0.25, lora_dropout=0.1)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config.__dict__))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "decoder2vec.cli", "train", "mntp", "--config", str(config_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-0000004"
    deadline = time.monotonic() + 240
    while not checkpoint.is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.is_dir(), "the run never wrote its second checkpoint"
    assert _run_log(tmp_path / "killed")[-1]["step"] < steps  # killed in the middle of training

    resumed = train(MNTPConfig(**{**config.__dict__, "resume": True, "step_delay": 0.0}))
    assert resumed.start_step >= 4 and resumed.start_step % 2 == 0
    log = resumed.log
    assert [e["step"] for e in log] == list(range(1, steps + 1))
    optimizer = torch.load(tmp_path / "killed" / "checkpoints" / f"step-{steps:07d}" / "optimizer.pt")
    assert {int(s["step"]) for s in optimizer["state"].values()} == {steps}  # Adam state carried across the kill

    reference = train(MNTPConfig(**{**config.__dict__, "output_dir": str(tmp_path / "unbroken"), "step_delay": 0.0}))
    expected = [e["loss"] for e in reference.log]
    assert np.allclose([e["loss"] for e in log], expected, atol=1e-4), (log, expected)
    fresh = train(
        MNTPConfig(
            **{
                **config.__dict__,
                "output_dir": str(tmp_path / "fresh"),
                "steps": steps - resumed.start_step,
                "step_delay": 0.0,
            }
        )
    )
    assert not np.allclose([e["loss"] for e in fresh.log][:2], expected[resumed.start_step :][:2], atol=1e-4)


class _RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_checkpoint_that_would_run_code(tiny_llama_dir, text_file, tmp_path):
    config = _mntp(tiny_llama_dir, text_file, tmp_path / "run", steps=2)
    train(config)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000002"
    assert (checkpoint / "rng-0.json").is_file() and not list(checkpoint.glob("rng-*.pt"))  # no pickled RNG
    marker = tmp_path / "code-ran"
    torch.save({"state": {}, "param_groups": [], "payload": _RunsCode(marker)}, checkpoint / "optimizer.pt")
    with pytest.raises(ValueError, match=r"optimizer.pt holds objects other than tensors .* could run code"):
        train(MNTPConfig(**{**config.__dict__, "resume": True, "steps": 3}))
    assert not marker.exists()


def test_cli_train_from_yaml_with_overrides(tiny_llama_dir, text_file, tmp_path, capsys):
    config = tmp_path / "simcse.yaml"
    config.write_text(f"model: {tiny_llama_dir}\ndata: [{text_file}]\nsteps: 5\nbatch_size: 4\nprogress: false\n")
    out = tmp_path / "run"
    assert main(["train", "simcse", "--config", str(config), "--steps", "2", "--output-dir", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["steps"] == 2 and printed["run_dir"] == str(out)
    saved = json.loads((out / "simcse_config.json").read_text())
    assert saved["steps"] == 2 and saved["batch_size"] == 4 and saved["attention_dropout"] == 0.3
    assert main(["train", "mntp", "--model", str(tiny_llama_dir), "--data", str(tmp_path / "nope.txt")]) == 1
    assert "data file" in capsys.readouterr().err
    config.write_text("steps: 2\nlearning_rat: 0.1\n")
    assert main(["train", "mntp", "--config", str(config)]) == 1
    assert "unknown option(s) for MNTPConfig: learning_rat" in capsys.readouterr().err


def test_pipeline_command_runs_stages_for_each_seed(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "text").mkdir(parents=True)
    (data / "sts").mkdir()
    (data / "text" / "wikitext2_valid.tokens").write_text(" = Title = \n\n " + " ".join(CORPUS[:30]) + "\n")
    (data / "text" / "wiki_sentences.txt").write_text("\n".join(CORPUS) + "\n")
    rows = ["sentence1\tsentence2\tscore\tgenre"] + [
        f"{a}\t{b}\t{i % 5}\tx" for i, (a, b) in enumerate(zip(TEXTS[:5], TEXTS[1:6], strict=True))
    ]
    (data / "sts" / "stsb_test.tsv").write_text("\n".join(rows) + "\n")
    (data / "sts" / "stsb_dev.tsv").write_text("\n".join(rows[:1] + rows[:0:-1]) + "\n")
    args = [
        "pipeline",
        "--model",
        str(tiny_llama_dir),
        "--data-dir",
        str(data),
        "--output-dir",
        str(tmp_path / "runs"),
    ]
    args += ["--stages", "mntp,simcse", "--seeds", "0", "1", "--average-last", "2", "--checkpoint-every", "1"]
    args += ["--mntp-steps", "2", "--mntp-batch-size", "2", "--mntp-max-seq-length", "16"]
    args += ["--simcse-steps", "3", "--simcse-batch-size", "4", "--simcse-max-seq-length", "16"]
    args += ["--causal-baseline", "true", "--score-each-stage", "true", "--progress", "false"]
    args += ["--scales", "1,0.5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for label in ("untrained, causal", "untrained, bidirectional", "seed 0: after mntp", "seed 1: trained"):
        assert label in out
    assert "| **mean** |" in out and "| spread (max - min) |" in out
    results = json.loads((tmp_path / "runs" / "pipeline_results.json").read_text())
    assert [run["seed"] for run in results["runs"]] == [0, 1]
    assert results["recipe"] == "small-cpu" and results["stages"] == ["mntp", "simcse"]
    # the options each stage ran with: the recipe's (its Gemma depth left out for this model) and the command line's
    assert (
        results["recipe_options"]["simcse"]["steps"] == 3 and "num_layers" not in results["recipe_options"]["simcse"]
    )
    scores = [run["scores"]["stsb"] for run in results["runs"]]
    assert results["summary"]["stsb"]["mean"] == pytest.approx(sum(scores) / 2, abs=0.01)
    first = results["runs"][0]
    assert first["averaged_checkpoints"] == ["step-0000002", "step-0000003"]  # the last 2 of the SimCSE run
    assert first["adapter"] == str(tmp_path / "runs" / "seed-0" / "final")
    # the scale kept is the one that scored best on STS-B dev; the candidates are gone
    assert set(first["scale_scores"]) == {"1", "0.5"} and "update x 0.5" in out
    assert first["scale_scores"][f"{first['scale']:g}"] == max(first["scale_scores"].values())
    record = json.loads((tmp_path / "runs" / "seed-0" / "final" / "decoder2vec_average.json").read_text())
    assert record["scale"] == first["scale"] and len(record["adapters"]) == 2
    assert sorted(p.name for p in (tmp_path / "runs" / "seed-0").iterdir()) == ["final", "mntp", "simcse"]
    simcse_config = json.loads((tmp_path / "runs" / "seed-1" / "simcse" / "simcse_config.json").read_text())
    assert simcse_config["seed"] == 1 and simcse_config["adapter"] == [str(tmp_path / "runs" / "seed-1" / "mntp")]
    loaded = Encoder.from_pretrained(str(tiny_llama_dir), adapter=first["adapter"], device="cpu").encode(TEXTS)
    assert np.isfinite(loaded).all()


@pytest.mark.slow
def test_smollm2_simcse_steps_then_embed(smollm2_dir, shared_data, tmp_path):
    config = SimCSEConfig(
        model=smollm2_dir,
        data=[f"{shared_data}/text/wiki_sentences.txt"],
        output_dir=str(tmp_path / "run"),
        steps=2,
        batch_size=4,
        max_seq_length=16,
        progress=False,
    )
    result = train(config)
    assert all(np.isfinite(e["loss"]) for e in result.log)
    vectors = Encoder.from_pretrained(smollm2_dir, adapter=str(result.run_dir)).encode(["A cat.", "A dog runs."])
    assert vectors.shape == (2, 576) and np.isfinite(vectors).all()


def test_two_processes_with_torchrun(tiny_llama_dir, tmp_path):
    """The same command under torchrun: 2 CPU processes (gloo), negatives gathered, GradCache, checkpoints per rank."""
    rows = tmp_path / "rows.tsv"
    rows.write_text("".join(f"{CORPUS[i]}\t{CORPUS[i + 1]}\t{CORPUS[i + 2]}\n" for i in range(12)))
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "decoder2vec.cli",
        "train",
        "supervised",
        "--model",
        str(tiny_llama_dir),
        "--data",
        str(rows),
        "--steps",
        "2",
        "--batch-size",
        "3",
        "--grad-cache-chunk-size",
        "4",
        "--checkpoint-every",
        "1",
        "--progress",
        "false",
        "--output-dir",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len([line for line in done.stdout.splitlines() if line.startswith("{")]) == 1  # one summary, from rank 0
    assert [e["step"] for e in _run_log(out)] == [1, 2]
    assert {p.name for p in (out / "checkpoints" / "step-0000002").glob("rng-*.json")} == {"rng-0.json", "rng-1.json"}
    vectors = Encoder.from_pretrained(str(tiny_llama_dir), adapter=str(out), device="cpu").encode(TEXTS)
    assert np.isfinite(vectors).all()
