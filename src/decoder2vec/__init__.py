"""decoder2vec: turn any decoder-only language model into a text encoder (LLM2Vec method)."""

from .attention import ARCHITECTURES, ArchitectureSupport, BidirectionalUnsupportedError, register_architecture
from .embed import embed_corpus, read_embeddings
from .export import EXPORT_FORMATS, ExportError, export_model
from .index import build_index, search
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
    "build_index",
    "embed_corpus",
    "export_model",
    "pool",
    "read_embeddings",
    "register_architecture",
    "search",
]
