"""Training recipes: named YAML files of stage options, shipped in ``decoder2vec/recipes/``.

A recipe has one section per stage (``mntp``, ``simcse``, ``supervised``) with options of that stage's config
dataclass, and an optional ``pipeline`` section (the model and evaluation ``decoder2vec pipeline`` uses with it).
``--recipe NAME`` (or a path to a YAML file of the same shape) gives the base values of a stage; ``--config`` and
command-line options override them.

- ``llm2vec``: the published recipe, for GPUs. It equals the stage dataclasses' defaults.
- ``small-cpu``: the small-budget recipe measured on a 2-core CPU; what ``decoder2vec pipeline`` and ``make demo``
  run when no GPU is present.

Options tied to the depth of the recipe's own model (``num_layers``, ``lora_layers``: ``small-cpu`` cuts Gemma 3
270M to 13 of its 18 layers) apply only to that model (the ``pipeline`` section's ``model``); with another model
they are left out, with a warning.

Example::

    from decoder2vec.train import SimCSEConfig, recipe_options
    config = SimCSEConfig(**recipe_options("small-cpu", "simcse"), data=["sentences.txt"])
"""

from __future__ import annotations

import os
import warnings
from importlib import resources
from pathlib import Path

import yaml

__all__ = ["DEFAULT_CPU_RECIPE", "DEFAULT_GPU_RECIPE", "available_recipes", "load_recipe", "recipe_options"]

DEFAULT_CPU_RECIPE = "small-cpu"
DEFAULT_GPU_RECIPE = "llm2vec"
SECTIONS = ("mntp", "simcse", "supervised", "pipeline")
# chosen for the depth of the recipe's model: meaningless (or an error) on a model with other layers
MODEL_SPECIFIC = ("num_layers", "lora_layers")


def _folder():
    return resources.files("decoder2vec") / "recipes"


def available_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(p.name[: -len(".yaml")] for p in _folder().iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | os.PathLike) -> dict:
    """A recipe as a dict of sections, from a shipped name (``small-cpu``) or a YAML file path."""
    text = None
    path = Path(name_or_path)
    if path.suffix.lower() in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {str(path)!r} not found")
        text = path.read_text()
    else:
        shipped = _folder() / f"{name_or_path}.yaml"
        if not shipped.is_file():
            raise ValueError(
                f"unknown recipe {str(name_or_path)!r}; choose one of: {', '.join(available_recipes())} "
                "(or give the path of a YAML file)"
            )
        text = shipped.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {str(name_or_path)!r} must be a mapping of sections ({', '.join(SECTIONS)})")
    for section in SECTIONS:
        value = data.get(section, {})
        if not isinstance(value, dict):
            raise ValueError(f"recipe {str(name_or_path)!r}: section {section!r} must be a mapping of options")
    return data


def recipe_options(name_or_path: str | os.PathLike | None, stage: str, model: str | None = None) -> dict:
    """The options a recipe gives one stage (empty without a recipe), for ``model`` when given: the options in
    ``MODEL_SPECIFIC`` are left out when the recipe names another model."""
    if name_or_path is None:
        return {}
    if stage not in SECTIONS:
        raise ValueError(f"unknown recipe section {stage!r}; choose one of: {', '.join(SECTIONS)}")
    recipe = load_recipe(name_or_path)
    options = dict(recipe.get(stage) or {})
    own_model = (recipe.get("pipeline") or {}).get("model")
    if model is not None and own_model is not None and str(model) != own_model:
        dropped = {name: options.pop(name) for name in MODEL_SPECIFIC if name in options}
        if dropped:
            listed = ", ".join(f"{name}: {value}" for name, value in dropped.items())
            warnings.warn(
                f"recipe {str(name_or_path)!r} sets {listed} for {own_model}; not applied to {model} "
                "(set it in a config file or recipe of your own for this model)",
                stacklevel=2,
            )
    return options
