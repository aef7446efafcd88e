"""Stage 3: segment image tables with a trained model in a batched Spark UDF.

The Spark job's names load on first use (PEP 562): the MLflow model
(:mod:`petseg.model.pyfunc`) and :mod:`petseg.model.segment` run where Spark is not installed.
"""

from typing import Any

__all__ = ["InferReport", "run_infer", "segment_column"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from petseg.infer import job

        return getattr(job, name)
    raise AttributeError(f"module 'petseg.infer' has no attribute {name!r}")
