"""The ``petseg`` console script: ``petseg <job> [--conf FILE ...] [key=value ...]``.

The one way in for every entry point: the console script, ``python -m petseg.cli``, the spark-submit
scripts in jobs/ and Databricks' python_wheel_task all call :func:`main`, which parses the arguments,
runs the stage functions on the active session (or one it builds) and turns a failure into one
readable line and a non-zero exit status.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Sequence

from petseg import config
from petseg.errors import ConfigError, InputError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``petseg <job> ...`` (``sys.argv[1:]`` when ``argv`` is None); return the exit status.

    0 on success, 1 when the input cannot be used (:class:`~petseg.errors.InputError`), 2 on a bad
    configuration (:class:`~petseg.errors.ConfigError`), each with one line on stderr.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)  # a line per gateway connection at INFO
    try:
        invocation = config.parse_command_line(argv)
    except ConfigError as exc:
        print(f"petseg: {exc}", file=sys.stderr)
        return 2
    from petseg.session import get_or_create

    cfg = invocation.config
    spark = get_or_create(cfg.spark)
    failure = None
    try:
        _run_stages(spark, invocation.job, cfg)
    except InputError as exc:
        failure = f"petseg {invocation.job}: {exc}"
    finally:
        # Stop only a session petseg started itself: on Databricks, or under spark-submit, the
        # session belongs to the cluster or the submitter (stopping Databricks' context fails the job).
        if cfg.spark.master is not None:
            spark.stop()
    if failure is not None:
        print(failure, file=sys.stderr)  # last, after Spark's shutdown lines
        return 1
    return 0


def _run_stages(spark: "SparkSession", job: str, cfg: config.Config) -> None:
    if job in ("ingest", "demo"):
        from petseg.ingest import run_ingest

        print(run_ingest(spark, data=cfg.data).format(), flush=True)
    if job in ("train", "demo"):
        from petseg.train import run_train

        print(run_train(spark, cfg=cfg).format(), flush=True)
    if job in ("infer", "demo"):
        from petseg.infer import run_infer

        print(run_infer(spark, infer=cfg.infer, tracking=cfg.mlflow, max_image_pixels=cfg.data.max_image_pixels)
              .format(), flush=True)
    if job in ("evaluate", "demo"):
        from petseg.evaluate import run_evaluate

        print(run_evaluate(spark, evaluate=cfg.evaluate, max_image_pixels=cfg.data.max_image_pixels).format(), flush=True)


def run() -> None:
    """The console script: exit with :func:`main`'s status, so that a failed job fails its process
    (Databricks' python_wheel_task, shells, schedulers) rather than returning a number nobody reads."""
    sys.exit(main())


if __name__ == "__main__":
    run()
