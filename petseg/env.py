"""The process environment Spark and TensorFlow read at start-up, set before either starts.

With :mod:`petseg.config.layers` (the command line), this is the one module of the library that
reads or sets environment variables.
"""

from __future__ import annotations

import os
import sys

#: tf-keras (Keras 2) must be selected before TensorFlow is first imported: Keras 3 fails in model.fit
#: under MultiWorkerMirroredStrategy with two workers.
LEGACY_KERAS_ENV = "TF_USE_LEGACY_KERAS"


def training_process_environment(*, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for an isolated training process: this one's (TF_CONFIG and CUDA_VISIBLE_DEVICES
    from the runner included), with tf-keras selected."""
    env = dict(os.environ)
    env[LEGACY_KERAS_ENV] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO/WARNING lines would bury the epochs
    env.update(extra or {})
    return env


def visible_gpus() -> str | None:
    """CUDA_VISIBLE_DEVICES as the runner set it for this worker (None when unset)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def prepare_process_environment(*, master: str | None) -> None:
    """Set the variables Spark and TensorFlow read at start-up, before either starts in this process.

    TF_USE_LEGACY_KERAS selects tf-keras; for a local master (``local[...]``), PYSPARK_PYTHON makes the
    executors run this interpreter (else they run ``python3`` from PATH, which lacks petseg's
    packages). Any other master, or none (spark-submit, YARN, Kubernetes, Databricks), has executors
    on other machines, where this interpreter's path means nothing: their Python is the cluster's to
    set (``spark.pyspark.python``). Values a user set are kept.
    """
    os.environ.setdefault(LEGACY_KERAS_ENV, "1")
    if master is not None and master.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


def spark_master_chosen_elsewhere() -> bool:
    """Whether a null ``spark.master`` is left to a launcher that may place executors on other machines.

    spark-submit starts the driver's Python with ``PYSPARK_GATEWAY_PORT`` set (pyspark's own
    java_gateway.py reads it), and every Databricks driver has ``DATABRICKS_RUNTIME_VERSION``. Anywhere
    else a session built without a master is pyspark's default, ``local[*]``, on this machine.
    """
    return "PYSPARK_GATEWAY_PORT" in os.environ or "DATABRICKS_RUNTIME_VERSION" in os.environ
