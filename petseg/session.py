"""The Spark session every petseg stage runs on."""

from __future__ import annotations

import contextlib
from typing import Iterator

from pyspark.sql import SparkSession

from petseg.config import SparkConfig
from petseg.env import prepare_process_environment


def get_or_create(spark_cfg: SparkConfig) -> SparkSession:
    """Return the active session, or build one from the ``spark`` config section.

    Under spark-submit or on Databricks a session (and its master) already exists; its settings win,
    and the ``spark.conf`` entries are applied only where Spark allows changing them at run time.
    With ``spark.remote`` the session is a Spark Connect client of that server (``spark.master`` is
    the server's business), and only the SQL confs among ``spark.conf`` can apply.
    """
    prepare_process_environment(master=None if spark_cfg.remote else spark_cfg.master)
    if spark_cfg.remote:
        builder = SparkSession.builder.remote(spark_cfg.remote)
    else:
        builder = SparkSession.builder.appName(spark_cfg.app_name)
        if spark_cfg.master:
            builder = builder.master(spark_cfg.master)
    for key, value in spark_cfg.conf.items():
        builder = builder.config(key, str(value))
    return builder.getOrCreate()


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
