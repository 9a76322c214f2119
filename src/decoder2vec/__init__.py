"""decoder2vec: turn any decoder-only language model into a text encoder (LLM2Vec method)."""

from .attention import ARCHITECTURES, ArchitectureSupport, BidirectionalUnsupportedError, register_architecture
from .model import Encoder, EncoderConfig
from .pooling import POOLING_MODES, pool
from .sources import EMBEDDED_MODELS, ModelSourceError

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "ArchitectureSupport",
    "BidirectionalUnsupportedError",
    "EMBEDDED_MODELS",
    "Encoder",
    "EncoderConfig",
    "ModelSourceError",
    "POOLING_MODES",
    "pool",
    "register_architecture",
]
