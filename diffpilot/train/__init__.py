"""Training: the one trainer every registered policy kind trains through, and the jobs that feed it."""

from diffpilot.train.trainer import BatchSource, Evaluator, TensorRows, Trainer, TrainerConfig, TrainResult, fit, train

__all__ = ["BatchSource", "Evaluator", "TensorRows", "TrainResult", "Trainer", "TrainerConfig", "fit", "train"]
