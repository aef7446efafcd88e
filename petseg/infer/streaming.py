"""Inference for images that keep arriving: a Structured Streaming query over the batch job's UDF.

``infer.mode=incremental`` runs the query with ``trigger(availableNow=True)``: everything the
checkpoint has not seen, then stop (a nightly Databricks job). ``infer.mode=stream`` keeps it
running, one micro-batch per ``infer.trigger_interval``, until SIGTERM or Ctrl-C. Either way the
rows are those of batch inference (same UDF, decoding, error rows and columns), and Spark's sinks
make each input land exactly once: the Parquet file sink commits a micro-batch's files in its
``_spark_metadata`` log, which every Spark reader of the folder follows, and a catalog table is
written with ``toTable``. A run killed midway leaves uncommitted files that readers ignore; the next
run redoes that micro-batch from the checkpoint. On the input side, the file source takes each file
once by path, whatever its mtime, and a folder petseg publishes (rewritten whole) is refused: see
:func:`petseg.infer.inputs.load_image_stream`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any, Callable, Iterator

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from petseg.config import InferConfig, InferMode
from petseg.errors import InputError
from petseg.io.fs import storage_for
from petseg.io.urls import is_table_name

log = logging.getLogger(__name__)

#: The name the query's observed counts go by in its progress reports.
COUNTS = "petseg_counts"
#: Seconds between checks for a stop signal while a stream runs.
POLL_SECONDS = 1.0


def checkpoint_location(infer: InferConfig) -> str:
    """``infer.checkpoint``, or ``_checkpoint`` inside a folder output: a hidden name, which Spark's
    readers skip, and deleting the output then starts afresh rather than skipping every input."""
    if infer.checkpoint:
        return str(infer.checkpoint)
    return f"{str(infer.output).rstrip('/')}/_checkpoint"


def check_output(spark: SparkSession, infer: InferConfig) -> None:
    """Refuse a folder that a batch run wrote: the file sink's readers would hide those rows.

    Raises
    ------
    InputError
        Naming the folder and the two ways out.
    """
    output = str(infer.output)
    if is_table_name(output):
        return
    storage = storage_for(spark)
    if storage.exists(output) and not storage.exists(f"{output.rstrip('/')}/_spark_metadata"):
        raise InputError(
            f"infer.output={output!r} holds the output of a batch run (infer.mode=batch); infer.mode="
            f"{infer.mode.value} appends to a streaming sink: use another infer.output, or delete this one"
        )


def error_reason() -> Column:
    """The reason of a row's ``error`` (``<reason>: <detail>``); null for a segmented row."""
    return F.split(F.col("error"), ":").getItem(0)


def observe_counts(frame: DataFrame) -> DataFrame:
    """``frame`` reporting, per micro-batch, how many rows it segmented and how many failed for each reason."""
    from petseg.model.segment import ERROR_REASONS

    reason = error_reason()
    return frame.observe(
        COUNTS,
        F.count_if(F.col("error").isNull()).alias("segmented"),
        *[F.count_if(reason == r).alias(r) for r in ERROR_REASONS],
        F.count_if(F.col("error").isNotNull() & ~reason.isin(*ERROR_REASONS)).alias("other"),
    )


def run_query(
    spark: SparkSession, out: DataFrame, *, infer: InferConfig, on_batch: Callable[[dict[str, int]], None]
) -> None:
    """Write ``out`` (a streaming frame from :func:`observe_counts`) to ``infer.output`` and wait:
    until the input is drained (incremental) or a stop signal (stream). ``on_batch`` gets each
    micro-batch's counts."""
    writer = out.writeStream.option("checkpointLocation", checkpoint_location(infer)).queryName("petseg_infer")
    if infer.mode is InferMode.incremental:
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=infer.trigger_interval)
    output = str(infer.output)
    query = writer.toTable(output) if is_table_name(output) else writer.format("parquet").start(output)
    last_batch = -1  # batch ids only grow: the last one counted is all the state needed

    def collect() -> None:
        nonlocal last_batch
        for progress in query.recentProgress:
            counts = progress.get("observedMetrics", {}).get(COUNTS)
            if counts is not None and progress["batchId"] > last_batch:
                last_batch = progress["batchId"]
                on_batch({k: int(v) for k, v in counts.items()})

    with _stop_on_signals() as stop:
        try:
            while query.isActive and not stop.is_set():
                query.awaitTermination(POLL_SECONDS)
                collect()
        finally:
            if query.isActive:
                log.info("stopping the stream; the next run resumes from %s", checkpoint_location(infer))
                query.stop()
    collect()
    error = query.exception()
    if error is not None:
        raise error


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM (what Databricks, YARN and Kubernetes send to stop a job) or SIGINT,
    so the stream stops between polls; the previous handlers come back on exit."""
    stop = threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
