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
    """
    prepare_process_environment(master=spark_cfg.master)
    builder = SparkSession.builder.appName(spark_cfg.app_name)
    if spark_cfg.master:
        builder = builder.master(spark_cfg.master)
    for key, value in spark_cfg.conf.items():
        builder = builder.config(key, str(value))
    return builder.getOrCreate()


def task_cpus(spark: SparkSession) -> int:
    """Cores Spark gives each task (``spark.task.cpus``): the TensorFlow threads a UDF task may use."""
    return int(spark.sparkContext.getConf().get("spark.task.cpus", "1"))


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
