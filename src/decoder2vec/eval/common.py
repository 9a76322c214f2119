"""Helpers every evaluator shares: reading text files with a clear error, embedding, cosine similarity.

An evaluator only needs an object with ``encode(texts, instruction=..., batch_size=..., show_progress=...)``
returning a ``(len(texts), dim)`` array, so the tests can pass a small fake in place of an :class:`Encoder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["cosine_matrix", "cosine_scores", "embed", "pair_cosine_scores", "read_text", "require_file"]


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or a FileNotFoundError that says which file the task wanted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found; check the path (or --data-dir / DECODER2VEC_DATA)")
    return path


def read_text(path: str | Path, what: str, encoding: str = "utf-8") -> str:
    """The whole file as text, without a UTF-8 byte-order mark; a decode error names the fix."""
    path = require_file(path, what)
    data = path.read_bytes()
    if encoding.replace("-", "").replace("_", "").lower() == "utf8":
        encoding = "utf-8-sig"  # drops a leading byte-order mark (MRPC has one)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not valid {encoding} (byte {error.start}: {data[error.start : error.start + 1]!r}); "
            "pass its real encoding, e.g. encoding='latin-1' (TREC from SentEval is Latin-1)"
        ) from None


def embed(
    encoder,
    texts: Sequence[str],
    *,
    instruction: str | None = None,
    batch_size: int = 32,
    show_progress: bool | None = None,
) -> np.ndarray:
    """``encoder.encode`` as a float32 numpy array, checked to have one row per text."""
    vectors = encoder.encode(list(texts), instruction=instruction, batch_size=batch_size, show_progress=show_progress)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise ValueError(f"encode returned shape {vectors.shape} for {len(texts)} texts; expected ({len(texts)}, dim)")
    return vectors


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)


def cosine_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of row i of ``a`` with row i of ``b``: (n,)."""
    return (_unit(a) * _unit(b)).sum(axis=1)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of ``a`` with every row of ``b``: (len(a), len(b))."""
    return _unit(a) @ _unit(b).T


def pair_cosine_scores(
    encoder,
    sentences1: Sequence[str],
    sentences2: Sequence[str],
    *,
    instruction: str | None,
    batch_size: int,
    show_progress: bool | None,
) -> np.ndarray:  # (n_pairs,)
    """Cosine similarity of each (sentences1[i], sentences2[i]) pair; each distinct sentence is embedded once."""
    unique = list(dict.fromkeys(list(sentences1) + list(sentences2)))
    index = {sentence: i for i, sentence in enumerate(unique)}
    vectors = embed(encoder, unique, instruction=instruction, batch_size=batch_size, show_progress=show_progress)
    return cosine_scores(vectors[[index[s] for s in sentences1]], vectors[[index[s] for s in sentences2]])
