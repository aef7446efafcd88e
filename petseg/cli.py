"""The ``petseg`` console script: ``petseg <job> [--conf FILE ...] [key=value ...]``.

It runs the same functions as the spark-submit entry points in jobs/, on a session it builds itself.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from petseg import config


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        invocation = config.parse_command_line(argv)
    except config.ConfigError as exc:
        print(f"petseg: {exc}", file=sys.stderr)
        return 2
    from petseg.errors import InputError
    from petseg.session import get_or_create

    cfg = invocation.config
    spark = get_or_create(cfg.spark)
    try:
        if invocation.job in ("ingest", "demo"):
            from petseg.ingest.convert import run_ingest

            print(run_ingest(spark, data=cfg.data).format(), flush=True)
        if invocation.job in ("train", "demo"):
            from petseg.train import run_train

            print(run_train(spark, cfg=cfg).format(), flush=True)
        if invocation.job in ("infer", "demo"):
            from petseg.infer.job import run_infer

            print(run_infer(spark, infer=cfg.infer, tracking=cfg.mlflow).format(), flush=True)
        if invocation.job in ("evaluate", "demo"):
            from petseg.evaluate import run_evaluate

            print(run_evaluate(spark, evaluate=cfg.evaluate).format(), flush=True)
    except InputError as exc:
        print(f"petseg {invocation.job}: {exc}", file=sys.stderr)
        return 1
    finally:
        # Stop only a session petseg started itself: on Databricks, or under spark-submit, the
        # session belongs to the cluster or the submitter (stopping Databricks' context fails the job).
        if cfg.spark.master is not None:
            spark.stop()
    return 0


def run() -> None:
    """The console script: exit with :func:`main`'s status, so that a failed job fails its process
    (Databricks' python_wheel_task, shells, schedulers) rather than returning a number nobody reads."""
    sys.exit(main())


if __name__ == "__main__":
    run()
