"""What happens to vectors after pooling: normalize, truncate (Matryoshka), quantize.

The order is fixed: truncate to ``dimensions`` first, then L2-normalize (so a truncated vector is
unit length again), then quantize. Quantization never depends on the other vectors of a batch,
so the same text gives the same bytes in a batch of one and in a batch of thousands.

* ``float32``: the vectors as they are.
* ``int8``: ``round(127 * x / |x|)``: the unit-length vector scaled to [-127, 127]. Dot products of
  int8 vectors are about ``127**2`` times the cosine similarity of the float vectors.
* ``uint8``: the int8 values shifted by 128 into [1, 255] (for stores that only take unsigned bytes).
* ``binary``: one bit per dimension, 1 where the value is > 0, packed 8 to a byte (``numpy.packbits``,
  first dimension in the highest bit): ``ceil(dim / 8)`` uint8 values. Compare with Hamming distance.

Example::

    vectors = postprocess(torch.randn(2, 64), normalize=True, dimensions=32, precision="int8")  # (2, 32) int8
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["PRECISIONS", "hamming_distance", "l2_normalize", "postprocess", "quantize", "truncate"]

PRECISIONS = ("float32", "int8", "uint8", "binary")


def l2_normalize(vectors: torch.Tensor) -> torch.Tensor:
    """L2-normalize each row; an all-zero row stays zero."""
    return torch.nn.functional.normalize(vectors.float(), dim=-1)


def truncate(vectors: torch.Tensor, dimensions: int | None) -> torch.Tensor:
    """Keep the first ``dimensions`` values of each row (Matryoshka truncation); None keeps all."""
    if dimensions is None:
        return vectors
    full = vectors.shape[-1]
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= full:
        raise ValueError(f"dimensions must be an integer from 1 to {full} (the model's size), not {dimensions!r}")
    return vectors[..., :dimensions]


def quantize(vectors: torch.Tensor, precision: str) -> np.ndarray:
    """float vectors (n, dim) -> a numpy array in ``precision`` (see the module docstring)."""
    check_precision(precision)
    if precision == "float32":
        return vectors.float().numpy()
    if precision == "binary":
        return np.packbits(vectors.numpy() > 0, axis=-1)
    scaled = torch.round(l2_normalize(vectors) * 127).to(torch.int16)  # in [-127, 127]
    if precision == "uint8":
        return (scaled + 128).to(torch.uint8).numpy()
    return scaled.to(torch.int8).numpy()


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")


def postprocess(
    vectors: torch.Tensor,  # (n, dim) float
    *,
    normalize: bool = False,
    dimensions: int | None = None,
    precision: str = "float32",
    convert_to: str = "numpy",
) -> np.ndarray | torch.Tensor:
    """Truncate, then normalize, then quantize pooled vectors; numpy array or torch tensor."""
    check_precision(precision)
    vectors = truncate(vectors.detach().cpu().float(), dimensions)
    if normalize:
        vectors = l2_normalize(vectors)
    out = quantize(vectors, precision)
    return torch.from_numpy(out) if convert_to == "torch" else out


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit differences between packed binary vectors: a (n, bytes), b (m, bytes) -> (n, m) int."""
    xor = np.bitwise_xor(a[:, None, :], b[None, :, :])
    return np.unpackbits(xor, axis=-1).sum(axis=-1)
