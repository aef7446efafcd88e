"""Stage 2: multi-worker training of the U-Net across Spark executors."""

from petseg.train.launch import TrainError, TrainResult, run_train

__all__ = ["TrainError", "TrainResult", "run_train"]
