"""Stage 3: segment an image table with an exported run in a batched pandas UDF and write the masks."""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Iterator, Tuple

import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf
from pyspark.sql.types import BinaryType, DataType, DoubleType, IntegerType, StringType, StructField, StructType

from petseg.config import InferConfig, InferMode, InputFormat, MlflowConfig, to_dict
from petseg.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from petseg.env import prepare_task_environment
from petseg.errors import InputError
from petseg.infer.streaming import check_output, error_reason, observe_counts, run_query
from petseg.io.fs import is_glob, storage_for
from petseg.io.publish import atomic_output, check_replaceable, verify_if_published
from petseg.io.urls import is_mlflow_uri, is_table_name
from petseg.model import artifact
from petseg.model.segment import ERROR_COLUMN, OUTPUT_COLUMNS
from petseg.session import ARROW_BATCH_ROWS_CONF, check_gpu_task_slots, session_confs, task_cpus
from petseg.tracking import flatten, tracked_run

if TYPE_CHECKING:
    from petseg.model.registry import MlflowModel

log = logging.getLogger(__name__)

#: 64-bit offsets for binary columns in Arrow batches (Spark >= 3.5): a batch whose images the sample
#: under-estimated costs memory, rather than failing past Arrow's 2 GB of bytes per column.
LARGE_VAR_TYPES_CONF = "spark.sql.execution.arrow.useLargeVarTypes"

#: Spark's type for each type name of the output contract (:attr:`petseg.model.segment.OutputColumn.type`).
SPARK_TYPES: dict[str, type[DataType]] = {
    "binary": BinaryType, "integer": IntegerType, "double": DoubleType, "string": StringType,
}
#: What the UDF returns per row, :data:`petseg.model.segment.OUTPUT_COLUMNS` in Spark's types: masks as
#: PNG (original and model resolution), the mask's size, class fractions, and the error that replaced
#: them for a bad row.
SEGMENTATION_SCHEMA = StructType([StructField(c.name, SPARK_TYPES[c.type](), c.nullable) for c in OUTPUT_COLUMNS])
#: The column the job adds before ``error`` for the exact model (an MLflow alias as the version it named).
MODEL_URI_COLUMN = "model_uri"
#: The column the job adds before ``error`` for the model's training run id.
MODEL_VERSION_COLUMN = "model_version"


class NothingSegmentedError(InputError):
    """The job segmented no row: the input was empty, or every row failed; the message says which."""


def segment_udf(
    model: "str | MlflowModel",
    *,
    batch_size: int = 32,
    model_resolution: bool = False,
    read_files: bool = False,
    threads: int | None = None,
    model_version: str | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
):
    """A pandas UDF (Iterator of (data, height, width) Series -> Iterator of DataFrame) that segments images.

    ``model`` is a run folder or an MLflow model pinned on the driver (:func:`petseg.model.registry.pin`),
    which each node fetches once. The model loads once per Python worker (:func:`petseg.model.artifact.load`), on the GPUs Spark
    assigned to the worker's first task, if any (:func:`petseg.env.pin_task_gpus`); each Arrow batch
    (``spark.sql.execution.arrow.maxRecordsPerBatch`` rows) is predicted ``batch_size`` images at a
    time. ``data`` holds encoded images, or file URLs when ``read_files``; ``height``/``width``
    (nullable) override the size the mask is returned at. A bad row (an image over
    ``max_image_pixels`` among them) gives a null mask and a message in ``error``; the batch goes on.
    """

    @pandas_udf(SEGMENTATION_SCHEMA)  # type: ignore[call-overload]
    def segment(batches: Iterator[Tuple[pd.Series, pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        from petseg.model.segment import image_rows, results_frame, segment_stream

        prepare_task_environment()  # before the load imports TensorFlow
        loaded = artifact.load(model, threads=threads, version=model_version, freeze=True)
        rows = (image_rows(*(column.tolist() for column in batch)) for batch in batches)
        for results in segment_stream(loaded, rows, batch_size=batch_size, read_files=read_files,
                                      model_resolution=model_resolution, max_pixels=max_image_pixels,
                                      threads=threads or 1):
            yield results_frame(results)

    return segment


def segment_column(
    column: Column | str,
    model_uri: "str | MlflowModel",
    *,
    batch_size: int = 32,
    model_resolution: bool = False,
    height: Column | str | None = None,
    width: Column | str | None = None,
    read_files: bool = False,
    threads: int | None = None,
    model_version: str | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Column:
    """A struct column of :data:`SEGMENTATION_SCHEMA` segmenting an encoded-image column.

    Parameters
    ----------
    column
        Encoded image bytes (JPEG, PNG, ... or petseg's raw arrays), or file URLs with ``read_files``.
    model_uri
        A training run's output folder (or its ``model/``) that every executor can open, or an MLflow
        model: ``models:/name/version``, ``models:/name@alias`` or ``runs:/id/model``, pinned here to one
        version (an alias that moves while the query runs does not mix models) and fetched by each
        node from MLflow's default servers, unless pinned before with :func:`petseg.model.registry.pin`.
    height, width
        Columns with the size to return masks at; by default the decoded image's own size.
    model_version
        The run the caller labels its rows with (:attr:`petseg.model.artifact.ModelArtifact.version`);
        executors fail rather than segment with another. None: whatever the folder holds.
    max_image_pixels
        Images larger than this (width x height) get an ``image_too_large`` error instead of a mask.
    """
    no_size = F.lit(None).cast("int")
    if isinstance(model_uri, str) and is_mlflow_uri(model_uri):
        from petseg.model.registry import pin

        model_uri = pin(model_uri)
    udf = segment_udf(
        model_uri, batch_size=batch_size, model_resolution=model_resolution, read_files=read_files, threads=threads,
        model_version=model_version, max_image_pixels=max_image_pixels,
    )
    return udf(
        F.col(column) if isinstance(column, str) else column,
        no_size if height is None else F.col(height) if isinstance(height, str) else height,
        no_size if width is None else F.col(width) if isinstance(width, str) else width,
    )


@dataclass(frozen=True)
class InferReport:
    input: str
    input_format: str
    output: str
    #: The exact model, as every row names it: a path, or ``models:/pets/3`` for ``models:/pets@champion``.
    model_uri: str
    model_version: str
    mode: str = "batch"
    segmented: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # error reason -> rows
    seconds: float = 0.0
    preview: str | None = None
    arrow_batch_rows: int | None = None
    #: infer.model as given, where it differs from model_uri (an alias).
    model_requested: str | None = None

    @property
    def rows(self) -> int:
        return self.segmented + sum(self.failed.values())

    def format(self) -> str:
        what = "infer" if self.mode == "batch" else f"infer ({self.mode})"
        new = "" if self.mode == "batch" else " new"
        lines = [
            f"{what}: {self.rows}{new} rows, segmented {self.segmented}, failed {sum(self.failed.values())}"
            f" ({self.rows / max(self.seconds, 1e-9):.1f} rows/s)"
        ]
        lines += [f"  failed {reason:<28} {n:>8}" for reason, n in sorted(self.failed.items())]
        lines.append(f"  input:  {self.input} ({self.input_format})")
        asked = f" for {self.model_requested}" if self.model_requested else ""
        lines.append(f"  model:  {self.model_uri}{asked} (version {self.model_version})")
        lines.append(f"  output: {self.output}")
        if self.preview:
            lines.append(f"  preview: {self.preview}")
        return "\n".join(lines)


def run_infer(
    spark: SparkSession,
    *,
    infer: InferConfig,
    tracking: MlflowConfig | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> InferReport:
    """Segment every row of ``infer.input`` and write the masks to ``infer.output``.

    The output holds the input's key, ``mask_png`` at the original resolution, ``mask_model_png``
    (with ``infer.model_resolution``), ``height``, ``width``, ``fraction_<class>``, ``model_uri`` (the
    exact model: an MLflow alias is written as the version it named), ``model_version`` (the training
    run's id) and ``error``. A path is written as Parquet, atomically; a table name with
    ``saveAsTable``, overwriting. Bad rows are kept with an error; the counts come back.

    ``infer.model`` may name an MLflow model (``models:/...``, ``runs:/...``), found on the servers
    ``tracking`` names (enabled or not). With ``tracking`` enabled, an MLflow run records the model
    version used, the input, the output and the counts. Images over ``max_image_pixels``
    (``data.max_image_pixels``) become ``image_too_large`` error rows.

    Raises
    ------
    InputError
        At once, before any Spark job, when the model is missing or not a petseg model (an MLflow
        name, version, alias or run that does not exist among them), the input
        is missing or lacks the image or key column, or the GPU confs would share GPUs between tasks
        (:func:`check_gpu_task_slots`).
    NothingSegmentedError
        After writing the output (so its errors can be read), when no row was segmented: the input
        has no rows, or every row failed.
    """
    start = time.perf_counter()
    model = artifact.resolve(str(infer.model), tracking_uri=tracking.tracking_uri if tracking else None,
                             registry_uri=tracking.registry_uri if tracking else None)  # fail before the input
    check_gpu_task_slots(spark.conf)
    version = model.version
    params = {**flatten({"infer": to_dict(infer)}), "model_uri": model.uri, "model_version": version,
              "model_mlflow_run_id": model.mlflow_run_id}
    with tracked_run(tracking, name="petseg-infer", params=params,
                     tags={"petseg.job": "infer", "petseg.model_version": version}) as tracked:
        report = _segment_and_write(spark, infer=infer, model=model, start=start, max_image_pixels=max_image_pixels)
        if tracked is not None:
            tracked.log_metrics({"rows": report.rows, "segmented": report.segmented,
                                 "failed": sum(report.failed.values()), "rows_per_s": report.rows / report.seconds})
    return report


def _segment_and_write(
    spark: SparkSession, *, infer: InferConfig, model: artifact.ModelArtifact, start: float, max_image_pixels: int
) -> InferReport:
    from petseg.infer.inputs import load_image_stream, load_image_table

    streaming = infer.mode is not InferMode.batch
    if streaming:
        check_output(spark, infer)
    elif not is_table_name(str(infer.output)):  # before any Spark job
        check_replaceable(storage_for(spark), str(infer.output), kind="masks", key="infer.output")
    if not streaming and infer.input_format is not InputFormat.table and not is_glob(str(infer.input)):
        verify_if_published(str(infer.input), key="infer.input")  # a petseg dataset: whole, one run's files
    table = (load_image_stream if streaming else load_image_table)(spark, infer=infer)
    taken = [f.name for f in SEGMENTATION_SCHEMA.fields] + [MODEL_URI_COLUMN, MODEL_VERSION_COLUMN]
    if table.key in taken:
        raise InputError(
            f"the key column {table.key!r} has the name of an output column ({', '.join(taken)}); "
            "set infer.key_column to another column, or rename it"
        )
    threads = task_cpus(spark)
    version = model.version
    segmentation = segment_column(
        "path" if table.reads_files else "image",
        model.source,
        batch_size=infer.batch_size,
        model_resolution=infer.model_resolution,
        height="height" if table.has_sizes else None,
        width="width" if table.has_sizes else None,
        read_files=table.reads_files,
        threads=threads,
        model_version=version,
        max_image_pixels=max_image_pixels,
    )
    out = table.frame.select(F.col(table.key), segmentation.alias("s")).select(
        table.key,
        *[f"s.{f.name}" for f in SEGMENTATION_SCHEMA.fields if f.name != ERROR_COLUMN],
        F.lit(model.uri).alias(MODEL_URI_COLUMN),
        F.lit(version).alias(MODEL_VERSION_COLUMN),
        f"s.{ERROR_COLUMN}",
    )
    batch_rows = arrow_batch_rows(infer, row_bytes=table.row_bytes)
    log.info("infer: %d rows per Arrow batch (largest sampled image %s bytes)", batch_rows, table.row_bytes)
    with session_confs(spark, {ARROW_BATCH_ROWS_CONF: str(batch_rows), LARGE_VAR_TYPES_CONF: "true"}):
        if streaming:
            counts: Counter[str] = Counter()
            run_query(spark, observe_counts(out), infer=infer, on_batch=counts.update)
            segmented = counts.pop("segmented", 0)
            failed = {reason: n for reason, n in counts.items() if n}
        else:
            segmented, failed = write_output(spark, out, output=str(infer.output))
    report = InferReport(
        input=str(infer.input),
        input_format=table.format.value,
        output=str(infer.output),
        model_uri=model.uri,
        model_version=version,
        model_requested=None if str(infer.model) == model.uri else str(infer.model),
        mode=infer.mode.value,
        segmented=segmented,
        failed=failed,
        seconds=time.perf_counter() - start,
        arrow_batch_rows=batch_rows,
    )
    log.info("infer wrote %d rows to %s", report.rows, infer.output)
    if infer.preview_images and segmented:
        from petseg.infer.preview import write_preview

        report = replace(report, preview=write_preview(spark, infer=infer, table=table))
    if not segmented:
        if not report.rows:
            if streaming:
                return report  # nothing new since the last run: a scheduled run has nothing to do
            raise NothingSegmentedError(
                f"infer.input={report.input!r} holds no rows to segment; point it at a non-empty table or folder"
            )
        raise NothingSegmentedError(
            f"none of the {report.rows} rows of infer.input={report.input!r} was segmented (failed: {failed}); "
            f"the error column of {report.output} says why for each row: fix those inputs"
        )
    return report


def arrow_batch_rows(infer: InferConfig, *, row_bytes: int | None) -> int:
    """Rows per Arrow batch: ``infer.arrow_batch_rows``, fewer where that many images of ``row_bytes``
    (the largest sampled; None when rows hold file paths) would pass ``infer.arrow_batch_bytes``."""
    if not row_bytes:
        return infer.arrow_batch_rows
    return max(1, min(infer.arrow_batch_rows, infer.arrow_batch_bytes // row_bytes))


def _count_written(written: DataFrame) -> tuple[int, dict[str, int]]:
    """(segmented, failed rows per reason), counted from what was written: reading a few columns back
    beats running the model twice."""
    counts = (
        written.select(error_reason().alias("reason"))
        .groupBy("reason")
        .count()
        .collect()
    )
    segmented = sum(r["count"] for r in counts if r["reason"] is None)
    return segmented, {r["reason"]: r["count"] for r in counts if r["reason"] is not None}


def write_output(spark: SparkSession, frame: DataFrame, *, output: str) -> tuple[int, dict[str, int]]:
    """Write ``frame`` to a catalog table or a Parquet folder, replacing what it held only once the write
    is complete; return (segmented, failed rows per reason), counted from what was written."""
    if is_table_name(output):
        return _count_written(replace_table(spark, frame, table=output))
    with atomic_output(storage_for(spark), output, kind="masks", key="infer.output") as staged:
        frame.write.mode("overwrite").parquet(staged.url)
        segmented, failed = _count_written(spark.read.parquet(staged.url))
        staged.rows = {"segmented": segmented, **failed}
    return segmented, failed


def replace_table(spark: SparkSession, frame: DataFrame, *, table: str) -> DataFrame:
    """Overwrite the catalog table ``table`` with ``frame`` so that a failed write leaves the old table.

    A Delta overwrite (Databricks' default format) is one transaction, so it is done in place:
    ``overwriteSchema`` lets the table take a new schema on re-run. Other formats (Parquet tables in a
    Hive metastore or Spark's own catalog) are dropped by ``saveAsTable``'s overwrite before the write
    starts, so ``frame`` goes to a staging table first, which then takes the old one's name: the old
    table is renamed aside and dropped only after. Returns the written table.
    """
    exists = spark.catalog.tableExists(table)
    provider = _table_provider(spark, table) if exists else spark.conf.get("spark.sql.sources.default", "parquet")
    if provider.lower() == "delta":
        frame.write.mode("overwrite").option("overwriteSchema", "true").saveAsTable(table)
        return spark.table(table)
    token = uuid.uuid4().hex[:12]
    staging, aside = _sibling_table(table, f"petseg_staging_{token}"), _sibling_table(table, f"petseg_old_{token}")
    writer = frame.write.mode("error") if not exists else frame.write.mode("error").format(provider)
    try:
        writer.saveAsTable(staging)
        if exists:
            spark.sql(f"ALTER TABLE {table} RENAME TO {aside}")
        try:
            spark.sql(f"ALTER TABLE {staging} RENAME TO {table}")
        except BaseException:
            if exists:
                spark.sql(f"ALTER TABLE {aside} RENAME TO {table}")
            raise
    except BaseException:
        spark.sql(f"DROP TABLE IF EXISTS {staging}")
        raise
    if exists:
        spark.sql(f"DROP TABLE IF EXISTS {aside}")
    return spark.table(table)


def _table_provider(spark: SparkSession, table: str) -> str:
    rows = spark.sql(f"DESCRIBE TABLE EXTENDED {table}").collect()
    return next((str(r["data_type"]) for r in rows if r["col_name"] == "Provider"), "parquet")


def _sibling_table(table: str, suffix: str) -> str:
    """``table``'s name with ``__<suffix>`` added to its last part, in the same schema."""
    if table.endswith("`"):
        return f"{table[:-1]}__{suffix}`"
    return f"{table}__{suffix}"
