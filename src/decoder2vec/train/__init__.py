"""Training stages (MNTP, unsupervised SimCSE, supervised contrastive) with LoRA, in one resumable loop."""

from .average import average_adapters
from .config import STAGES, MNTPConfig, SimCSEConfig, SupervisedConfig, TrainConfig
from .data import ContrastiveRow, DataError, pack_documents, read_rows, read_texts
from .mntp import MNTPCollator, MNTPLoss
from .run import TrainResult, train
from .simcse import InfoNCELoss, set_dropout
from .supervised import ContrastiveLoss, GradCache, gather_with_grad

__all__ = [
    "STAGES",
    "ContrastiveLoss",
    "ContrastiveRow",
    "DataError",
    "GradCache",
    "InfoNCELoss",
    "MNTPCollator",
    "MNTPConfig",
    "MNTPLoss",
    "SimCSEConfig",
    "SupervisedConfig",
    "TrainConfig",
    "TrainResult",
    "average_adapters",
    "gather_with_grad",
    "pack_documents",
    "read_rows",
    "read_texts",
    "set_dropout",
    "train",
]
