"""Stage 2: multi-worker training of the U-Net across Spark executors."""

from petseg.train.launch import TrainError, TrainResult, TrainStopped, run_train

__all__ = ["TrainError", "TrainResult", "TrainStopped", "run_train"]
