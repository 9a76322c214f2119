import dataclasses
import json

import pytest
import torch

from decoder2vec.cli import main
from decoder2vec.train import MNTPConfig, SimCSEConfig, SupervisedConfig
from decoder2vec.train.pipeline import PipelineConfig, _resolved, default_recipe, results_table, summarize
from decoder2vec.train.recipes import available_recipes, load_recipe, recipe_options
from tiny import CORPUS

STAGE_CLASSES = {"mntp": MNTPConfig, "simcse": SimCSEConfig, "supervised": SupervisedConfig}


def test_shipped_recipes():
    assert {"llm2vec", "small-cpu"} <= set(available_recipes())
    for name in available_recipes():
        recipe = load_recipe(name)
        for stage, cls in STAGE_CLASSES.items():
            known = {f.name for f in dataclasses.fields(cls)}
            assert set(recipe.get(stage) or {}) <= known, (name, stage)
            cls(**(recipe.get(stage) or {}))  # every recipe section is a valid configuration


@pytest.mark.parametrize("stage", list(STAGE_CLASSES))
def test_stage_defaults_are_the_llm2vec_recipe(stage):
    section = load_recipe("llm2vec")[stage]
    defaults = STAGE_CLASSES[stage]()
    assert {key: getattr(defaults, key) for key in section} == section
    # the published figures themselves, so neither the file nor the defaults drift
    published = {
        "mntp": {
            "steps": 1000,
            "batch_size": 32,
            "max_seq_length": 512,
            "mask_probability": 0.2,
            "learning_rate": 5e-5,
        },
        "simcse": {"steps": 1000, "batch_size": 128, "learning_rate": 3e-5, "attention_dropout": 0.3},
        "supervised": {"steps": 1000, "batch_size": 512, "learning_rate": 2e-4},
    }[stage]
    assert {key: getattr(defaults, key) for key in published} == published


def test_train_help_shows_the_published_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "simcse", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 3e-05)" in text and "(default: 1000)" in text and "(default: 128)" in text
    assert "--recipe" in text and "small-cpu" in text


def test_pipeline_uses_the_small_recipe_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_recipe() == "small-cpu"
    config, recipe = _resolved(PipelineConfig())
    assert config.recipe == "small-cpu" and recipe == load_recipe("small-cpu")
    small = load_recipe("small-cpu")
    assert config.model == small["pipeline"]["model"] and config.stages == small["pipeline"]["stages"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_recipe() == "llm2vec"


def test_recipe_then_config_file_then_options(tiny_llama_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(CORPUS) + "\n")
    config = tmp_path / "simcse.yaml"
    config.write_text("batch_size: 4\nmax_seq_length: 16\n")
    out = tmp_path / "run"
    args = ["train", "simcse", "--recipe", "small-cpu", "--config", str(config), "--steps", "2"]
    args += ["--model", str(tiny_llama_dir), "--data", str(text), "--output-dir", str(out), "--progress", "false"]
    with pytest.warns(UserWarning, match="sets num_layers: 13 for gemma3-270m; not applied"):
        assert main(args) == 0
    saved = json.loads((out / "simcse_config.json").read_text())
    small = recipe_options("small-cpu", "simcse")
    assert saved["learning_rate"] == small["learning_rate"]  # from the recipe
    assert saved["batch_size"] == 4 and saved["max_seq_length"] == 16  # the config file wins over the recipe
    assert saved["steps"] == 2  # and the command line over both
    assert saved["num_layers"] is None  # the recipe's depth is for its own model (Gemma's 18 layers), not this one


def test_depth_options_apply_only_to_the_recipes_model():
    own = load_recipe("small-cpu")["pipeline"]["model"]
    assert recipe_options("small-cpu", "simcse")["num_layers"] == 13
    assert recipe_options("small-cpu", "simcse", own)["num_layers"] == 13
    with pytest.warns(UserWarning, match="sets num_layers: 13 for gemma3-270m; not applied to smollm2-135m"):
        other = recipe_options("small-cpu", "simcse", "smollm2-135m")
    assert (
        "num_layers" not in other and other["learning_rate"] == recipe_options("small-cpu", "simcse")["learning_rate"]
    )


def test_unknown_recipe_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown recipe 'nope'; choose one of: .*small-cpu"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("simcse: [1, 2]\n")
    with pytest.raises(ValueError, match="section 'simcse' must be a mapping"):
        load_recipe(bad)
    assert main(["train", "mntp", "--recipe", "nope"]) == 1
    assert "unknown recipe" in capsys.readouterr().err


def test_pipeline_config_lists():
    config = PipelineConfig(seeds=["0,1", "2"], stages="mntp,simcse", eval_tasks=["stsb", "sickr"])
    assert config.seeds == [0, 1, 2] and config.stages == ["mntp", "simcse"]
    with pytest.raises(ValueError, match="seeds"):
        PipelineConfig(seeds="a,b")
    assert PipelineConfig(baseline_tasks="none").baseline_tasks == []  # skip scoring the untrained model
    assert PipelineConfig(scales="1,0.5").scales == [1.0, 0.5]
    with pytest.raises(ValueError, match="scales must be fractions"):
        PipelineConfig(scales="1,0")


def test_summary_and_table():
    runs = [
        {"seed": 0, "scores": {"stsb": 70.0, "sickr": 60.0}, "minutes": 1.0},
        {"seed": 1, "scores": {"stsb": 72.5, "sickr": 61.0}, "minutes": 1.0},
        {"seed": 2, "scores": {"stsb": 71.0, "sickr": 59.0}, "minutes": 1.0},
    ]
    summary = summarize(runs, ["stsb", "sickr"])
    assert summary["stsb"] == {"mean": 71.17, "spread": 2.5, "min": 70.0, "max": 72.5}
    assert summary["sickr"]["spread"] == 2.0
    table = results_table(
        {
            "eval_tasks": ["stsb", "sickr"],
            "untrained": {"bidirectional": {"stsb": 50.0}},
            "runs": runs,
            "summary": summary,
        }
    )
    assert "| **mean** | **71.17** | **60.00** | |" in table and "| spread (max - min) | 2.50 | 2.00 | |" in table
