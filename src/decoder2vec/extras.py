"""Which optional extra brings which package, and the message that says how to install a missing one.

The core install (``pip install decoder2vec``) runs encode, train, eval on local files and export --format merged.
Other features import their packages when used; where one is missing, :func:`missing_extra_message` turns
the ``ModuleNotFoundError`` into ``... pip install "decoder2vec[serve]"``. ``decoder2vec.cli.main`` prints it.
"""

from __future__ import annotations

__all__ = ["EXTRA_OF_MODULE", "missing_extra_message"]

# top-level import name -> the extra that declares its distribution (pyproject.toml; tests/test_packaging.py checks)
EXTRA_OF_MODULE = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "orjson": "serve",
    "pydantic": "serve",
    "starlette": "serve",
    "sentence_transformers": "export",
    "datasets": "data",
    "pyarrow": "data",
    "mteb": "mteb",
    "ray": "ray",
    "faiss": "faiss",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
}


def missing_extra_message(error: ImportError) -> str | None:
    """``pip install "decoder2vec[EXTRA]"`` advice for an ImportError of an optional package; None for others."""
    module = (getattr(error, "name", None) or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return f'this needs the optional package {module!r}, which the core install leaves out: pip install "decoder2vec[{extra}]"'
