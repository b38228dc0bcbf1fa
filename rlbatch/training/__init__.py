"""The trainer loop, the learner interface and checkpoints."""
from rlbatch.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rlbatch.training.learner import Learner
from rlbatch.training.trainer import Progress, TrainReport, Trainer, solved

__all__ = ["CheckpointError", "Learner", "Progress", "TrainReport", "Trainer", "load_checkpoint",
           "save_checkpoint", "solved"]
