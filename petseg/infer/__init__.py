"""Stage 3: segment image tables with a trained model in a batched Spark UDF."""

from petseg.infer.job import InferReport, run_infer, segment_column

__all__ = ["InferReport", "run_infer", "segment_column"]
