"""The process environment Spark and TensorFlow read at start-up, set before either starts.

With :mod:`petseg.config.layers` (the command line), this is the one module of the library that
reads or sets environment variables.
"""

from __future__ import annotations

import os
import sys

from petseg.errors import InputError

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


#: TensorFlow reads these when it first initialises its GPUs: which devices CUDA shows it, and
#: whether it may grow its memory as needed rather than take all of every visible GPU's at once.
CUDA_DEVICES_ENV = "CUDA_VISIBLE_DEVICES"
GPU_GROWTH_ENV = "TF_FORCE_GPU_ALLOW_GROWTH"


class GpuPinError(InputError):
    """A Python worker pinned to some GPUs was given a task that Spark assigned to others (an
    InputError, as training's missing GPU confs are: the job ends with one line naming the fix)."""


#: The GPUs :func:`pin_task_gpus` pinned this process to (None: not pinned).
_pinned: str | None = None


def pin_task_gpus() -> str | None:
    """Show this process's TensorFlow only the GPUs Spark assigned to the running task; call it in a
    task before TensorFlow is imported.

    Sets CUDA_VISIBLE_DEVICES to the task's ``gpu`` addresses (``TaskContext.resources()``) and turns
    on memory growth, so that tasks sharing a node never land on GPU 0 together, each holding all
    of its memory. A process cannot re-pin: CUDA reads the variable once. Spark reuses Python
    workers across tasks and hands a reused worker whatever address is free (verified: one worker
    of a two-GPU executor ran tasks on GPU 0 and on GPU 1), so a task assigned other GPUs than the
    worker's pin fails here rather than run on another task's GPU; the inference and evaluation jobs
    refuse such set-ups before they start (one GPU per executor, or ``spark.python.worker.reuse=false``).

    Returns
    -------
    str or None
        The addresses this process now sees (``"1"``, ``"0,1"``), or None for a task without GPUs,
        whose environment is left alone.

    Raises
    ------
    GpuPinError
        When this process was pinned to other GPUs by an earlier task.
    """
    from pyspark import TaskContext

    global _pinned
    context = TaskContext.get()
    gpu = context.resources().get("gpu") if context is not None else None
    if gpu is None:
        return None
    wanted = ",".join(gpu.addresses)
    if _pinned is None:
        os.environ[CUDA_DEVICES_ENV] = wanted
        os.environ[GPU_GROWTH_ENV] = "true"
        _pinned = wanted
    elif _pinned != wanted:
        raise GpuPinError(
            f"this Python worker's TensorFlow is pinned to GPU {_pinned}, but Spark assigned GPU {wanted} to the task, "
            "and a process cannot move to another GPU; give each executor one GPU "
            "(spark.executor.resource.gpu.amount=1) or set spark.python.worker.reuse=false"
        )
    return wanted


def visible_gpus() -> str | None:
    """CUDA_VISIBLE_DEVICES as the runner set it for this worker (None when unset)."""
    return os.environ.get(CUDA_DEVICES_ENV)


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
