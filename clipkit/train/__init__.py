"""Training: contrastive losses, the Trainer (exact resume, torchrun, gradient cache) and its checkpoints."""
from .config import TrainConfig, TrainingError
from .losses import ClipLoss, SigLipLoss, create_loss, grad_cache_step
from .trainer import Trainer, train

__all__ = ["ClipLoss", "SigLipLoss", "TrainConfig", "Trainer", "TrainingError", "create_loss", "grad_cache_step",
           "train"]
