"""Training engine: the loop plus its numeric parts (batching, loss, schedule, checkpoints, metrics)."""

from .loop import TrainResult, evaluate_loss, train

__all__ = ["TrainResult", "evaluate_loss", "train"]
