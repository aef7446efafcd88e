"""The Spark session every petseg stage runs on, and the checks of its confs that stages share."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from pyspark.sql import SparkSession

from petseg.env import prepare_process_environment
from petseg.errors import InputError

if TYPE_CHECKING:
    from pyspark import SparkConf
    from pyspark.sql.conf import RuntimeConfig

#: Spark confs GPU training needs on a cluster (the runner schedules one barrier task per GPU group).
GPU_CONFS = ("spark.executor.resource.gpu.amount", "spark.task.resource.gpu.amount")
#: Rows per Arrow batch between the JVM and a stage's Python UDFs (Spark's default: 10,000), which
#: ingest and inference each size for a job from their rows' bytes.
ARROW_BATCH_ROWS_CONF = "spark.sql.execution.arrow.maxRecordsPerBatch"


def get_or_create(*, master: str | None, remote: str | None = None, app_name: str = "petseg",
                  conf: Mapping[str, Any] | None = None) -> SparkSession:
    """Return the active session, or build one (the ``spark`` config section's keys, as arguments).

    Under spark-submit or on Databricks a session (and its master) already exists; its settings win,
    and the ``conf`` entries are applied only where Spark allows changing them at run time. With
    ``remote`` the session is a Spark Connect client of that server (``master`` is the server's
    business), and only the SQL confs among ``conf`` can apply.
    """
    prepare_process_environment(master=None if remote else master)
    if remote:
        builder = SparkSession.builder.remote(remote)
    else:
        builder = SparkSession.builder.appName(app_name)
        if master:
            builder = builder.master(master)
    for key, value in (conf or {}).items():
        builder = builder.config(key, str(value))
    return builder.getOrCreate()


class GpuSchedulingError(InputError):
    """Spark's GPU confs cannot give each task's model a GPU of its own; the message names the confs."""


def check_gpu_confs(spark: SparkSession) -> None:
    """Raise naming the missing Spark confs when GPU training is asked for on executors."""
    conf = spark.sparkContext.getConf()
    missing = [key for key in GPU_CONFS if not conf.contains(key)]
    master = conf.get("spark.master", "")
    if master.startswith(("spark://", "local-cluster")) and not (
        conf.contains("spark.executor.resource.gpu.discoveryScript") or conf.contains("spark.worker.resource.gpu.discoveryScript")
    ):
        missing.append("spark.executor.resource.gpu.discoveryScript (e.g. conf/gpu/get_gpus_resources.sh)")
    if missing:
        raise GpuSchedulingError(
            "train.use_gpu=true needs Spark's GPU scheduling, but these confs are not set: " + ", ".join(missing)
            + ". Set them at spark-submit (see docs/training.md, 'GPUs'), or set train.use_gpu=false"
        )


def check_gpu_task_slots(conf: "SparkConf | RuntimeConfig") -> None:
    """Refuse GPU scheduling under which a reused Python worker would be handed another task's GPU.

    Each worker's TensorFlow is pinned to the GPUs of its first task (:func:`petseg.env.pin_task_gpus`)
    and cannot move; Spark reuses workers and gives a task whichever of its executor's GPUs is free,
    so an executor with several GPUs, each task taking some of them, needs fresh workers.

    Raises
    ------
    GpuSchedulingError
        Naming the confs and the two ways out.
    """
    executor = float(conf.get("spark.executor.resource.gpu.amount", "0"))
    task = float(conf.get("spark.task.resource.gpu.amount", "0"))
    reuse = conf.get("spark.python.worker.reuse", "true").strip().lower() == "true"
    if task > 0 and executor > 1 and task < executor and reuse:
        raise GpuSchedulingError(
            f"spark.executor.resource.gpu.amount={conf.get('spark.executor.resource.gpu.amount')} with "
            f"spark.task.resource.gpu.amount={conf.get('spark.task.resource.gpu.amount')} lets Spark give a reused "
            "Python worker, whose TensorFlow is pinned to one GPU, a task on another; give each executor one GPU "
            "(spark.executor.resource.gpu.amount=1, as many executors as GPUs) or set spark.python.worker.reuse=false"
        )


def is_connect(spark: SparkSession) -> bool:
    """Whether ``spark`` is a Spark Connect session, which has no SparkContext, RDDs or JVM gateway.

    Told by the session's class, so that the check imports nothing of Connect's client (grpc), which
    a classic install may lack.
    """
    return type(spark).__module__.startswith("pyspark.sql.connect")


def task_cpus(spark: SparkSession) -> int:
    """Cores Spark gives each task (``spark.task.cpus``): the TensorFlow threads a UDF task may use."""
    return int(spark.conf.get("spark.task.cpus", "1") or "1")


def default_parallelism(spark: SparkSession) -> int | None:
    """The cluster's task slots (``defaultParallelism``); None over Spark Connect, which does not say."""
    return None if is_connect(spark) else spark.sparkContext.defaultParallelism


@contextlib.contextmanager
def session_confs(spark: SparkSession, confs: dict[str, str]) -> Iterator[None]:
    """Set session confs for the block, then put back what was there (or unset them)."""
    previous = {key: spark.conf.get(key, None) for key in confs}
    for key, value in confs.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
