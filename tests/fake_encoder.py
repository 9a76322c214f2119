"""A stand-in for an Encoder in evaluator tests: every text maps to a vector the test chooses."""

from __future__ import annotations

import numpy as np


class FakeEncoder:
    """``encode`` looks each text up in ``vectors`` and records (texts, instruction) of every call."""

    def __init__(self, vectors: dict[str, list[float]]):
        self.vectors = {text: np.asarray(v, dtype=np.float32) for text, v in vectors.items()}
        self.calls: list[tuple[list[str], str | None]] = []

    def encode(self, texts, instruction=None, batch_size=32, show_progress=None, **kwargs):
        self.calls.append((list(texts), instruction))
        missing = [t for t in texts if t not in self.vectors]
        assert not missing, f"the test gave no vector for {missing}"
        return np.stack([self.vectors[t] for t in texts])

    def instruction_of(self, text: str) -> str | None:
        """The instruction the (last) call that embedded ``text`` used."""
        for texts, instruction in reversed(self.calls):
            if text in texts:
                return instruction
        raise AssertionError(f"{text!r} was never embedded")
