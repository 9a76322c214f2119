"""decoder2vec: turn any decoder-only language model into a text encoder (LLM2Vec method)."""

from .attention import ARCHITECTURES, ArchitectureSupport, BidirectionalUnsupportedError, register_architecture
from .export import EXPORT_FORMATS, ExportError, export_model
from .model import Encoder, EncoderConfig
from .pooling import POOLING_MODES, pool
from .sources import EMBEDDED_MODELS, ModelSourceError
from .vectors import PRECISIONS

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "ArchitectureSupport",
    "BidirectionalUnsupportedError",
    "EMBEDDED_MODELS",
    "EXPORT_FORMATS",
    "Encoder",
    "EncoderConfig",
    "ExportError",
    "ModelSourceError",
    "POOLING_MODES",
    "PRECISIONS",
    "export_model",
    "pool",
    "register_architecture",
]
