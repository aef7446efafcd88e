"""The ``petseg`` console script: ``petseg <job> [--conf FILE ...] [key=value ...] [--print-config]``.

``petseg --help`` lists the stages and ``petseg <job> --help`` the keys a stage reads.

The one way in for every entry point: the console script, ``python -m petseg.cli``, the spark-submit
scripts in jobs/ and Databricks' python_wheel_task all call :func:`main`, which parses the arguments,
runs the stage functions on the active session (or one it builds) and turns any failure into one
last line, ``petseg: <stage> failed: <reason>``, and a non-zero exit status.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import TYPE_CHECKING, Sequence

from petseg import config, env
from petseg.errors import ConfigError, InputError, traceback_reason

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``petseg <job> ...`` (``sys.argv[1:]`` when ``argv`` is None); return the exit status.

    0 on success, 2 on a bad configuration (:class:`~petseg.errors.ConfigError`), 1 on any other
    failure. A failure ends with one line on stderr, ``petseg: <stage> failed: <reason>``; an
    unexpected one (a Spark or JVM error, a bug) prints its full trace above that line.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)  # a line per gateway connection at INFO
    args = list(sys.argv[1:] if argv is None else argv)
    stage = args[0] if args and args[0] in config.JOBS else "command line"
    try:
        invocation = config.parse_command_line(args)
    except ConfigError as exc:
        print(f"petseg: {stage} failed: {failure_reason(exc)}", file=sys.stderr)
        return 2
    if invocation.text is not None:  # help or --print-config: nothing to run
        print(invocation.text, flush=True)
        return 0
    cfg = invocation.config
    assert cfg is not None
    current = _CurrentStage(stage=invocation.job)
    spark = None
    status, failure = 0, None
    owned = False
    try:
        from pyspark.sql import SparkSession

        from petseg.session import get_or_create

        # A session that exists already (a notebook's, Databricks', a caller's) is not petseg's to stop.
        owned = SparkSession.getActiveSession() is None
        spark = get_or_create(**config.to_dict(cfg.spark))
        _run_stages(spark, invocation.job, cfg, current)
    except Exception as exc:  # noqa: BLE001 - every failure ends in the one line below
        if not isinstance(exc, (InputError, ConfigError)):
            traceback.print_exc()  # the full trace stays in the log, above the one line
        status = 2 if isinstance(exc, ConfigError) else 1
        failure = f"petseg: {current.stage} failed: {failure_reason(exc)}"
    finally:
        if spark is not None and owned:
            _end_session(spark, failed=failure is not None)
    if failure is not None:
        print(failure, file=sys.stderr, flush=True)  # last, after Spark's shutdown lines
    return status


def _end_session(spark: "SparkSession", *, failed: bool) -> None:
    """Stop the session petseg started, before the last line, so the JVM's shutdown lines come above it.

    On Databricks the session is the cluster's: stopping its context fails the job, and its log level
    is every notebook's on the cluster, so both are left alone. Under spark-submit the job is the
    application: after Python exits, the driver JVM's shutdown hooks log at INFO ("Shutdown hook
    called", "Deleting directory ...") below anything printed here, so a failed job quiets the JVM's
    log to warnings first.
    """
    if env.on_databricks():
        return
    from petseg.session import is_connect

    if failed and env.spark_master_chosen_elsewhere() and not is_connect(spark):
        spark.sparkContext.setLogLevel("WARN")
    spark.stop()


def failure_reason(exc: BaseException) -> str:
    """What went wrong, on one line: petseg's own message, or the line of a JVM or Python error that says it.

    petseg's errors (:class:`~petseg.errors.InputError`, :class:`~petseg.errors.ConfigError`) carry the
    fix in their message. Anything else is named by its type and message; for an error from the JVM
    that is the Java exception (``java.io.IOException: ...``), not py4j's "An error occurred while
    calling o34.getFileSystem", and for a failed Spark task it is the task's Python exception.
    """
    if isinstance(exc, (InputError, ConfigError)):
        return _one_line(str(exc))
    text = _error_text(exc)
    reason = traceback_reason(text) or next((line.strip() for line in text.splitlines() if line.strip()), "")
    return _one_line(reason or type(exc).__name__) + " (the full error is above)"


def _error_text(exc: BaseException) -> str:
    from py4j.protocol import Py4JJavaError
    from pyspark.errors.exceptions.captured import CapturedException

    if isinstance(exc, Py4JJavaError):
        return str(exc.java_exception.toString())
    if isinstance(exc, CapturedException):
        # PySpark's AnalysisException and kin: the message without the JVM stack trace.
        return f"{type(exc).__name__}: {exc.desc if exc.desc is not None else exc}"
    return f"{type(exc).__name__}: {exc}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _CurrentStage:
    """The stage running now, so that a failure of ``demo`` names the stage that failed."""

    def __init__(self, *, stage: str) -> None:
        self.stage = stage


def _run_stages(spark: "SparkSession", job: str, cfg: config.Config, current: _CurrentStage) -> None:
    if job in ("ingest", "demo"):
        from petseg.ingest import run_ingest

        current.stage = "ingest"
        print(run_ingest(spark, data=cfg.data).format(), flush=True)
    if job in ("train", "demo"):
        from petseg.train import run_train

        current.stage = "train"
        print(run_train(spark, data=cfg.data, model=cfg.model, train=cfg.train, tracking=cfg.mlflow).format(),
              flush=True)
    if job in ("infer", "demo"):
        from petseg.infer import run_infer

        current.stage = "infer"
        print(run_infer(spark, infer=cfg.infer, tracking=cfg.mlflow, max_image_pixels=cfg.data.max_image_pixels)
              .format(), flush=True)
    if job in ("evaluate", "demo"):
        from petseg.evaluate import run_evaluate

        current.stage = "evaluate"
        print(run_evaluate(spark, evaluate=cfg.evaluate, tracking=cfg.mlflow, max_image_pixels=cfg.data.max_image_pixels)
              .format(), flush=True)


def run() -> None:
    """The console script: exit with :func:`main`'s status, so that a failed job fails its process
    (Databricks' python_wheel_task, shells, schedulers) rather than returning a number nobody reads."""
    sys.exit(main())


if __name__ == "__main__":
    run()
