"""What the inference job segments: any supported input as one frame of rows to segment.

A petseg dataset, a Parquet dataset or catalog table of image bytes, or a folder or glob of image
files becomes one frame of (key, image bytes or path, height, width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import DataStreamReader
from pyspark.sql.types import BinaryType, LongType, StringType, StructField, StructType, TimestampType

from petseg.config import InferConfig, InputFormat
from petseg.errors import InputError
from petseg.io.fs import is_glob, list_files_frame, storage_for
from petseg.io.publish import MANIFEST_FILE, read_manifest
from petseg.io.urls import split_url
from petseg.session import default_parallelism

#: Key columns tried, in order, when infer.key_column is null.
KEY_CANDIDATES = ("id", "path", "key")
#: Rows per task when the job lists files itself: a few Arrow batches, so the per-task cost stays
#: small beside the model's work, and enough tasks to spread over the cluster.
FILES_PER_TASK = 1024
#: Tasks for a small input where the cluster's slots are unknown (Spark Connect does not tell a
#: client): enough to use a few cores; set infer.partitions to fill a large cluster.
CONNECT_MIN_TASKS = 2
#: Rows whose image sizes set the rows per Arrow batch: the input's first rows (its first files or
#: row groups), so sizing costs no pass over the input.
SIZE_SAMPLE_ROWS = 256
#: Spark's binaryFile source's columns: a streaming source must be given its schema.
BINARY_FILE_SCHEMA = StructType([
    StructField("path", StringType(), False),
    StructField("modificationTime", TimestampType(), False),
    StructField("length", LongType(), False),
    StructField("content", BinaryType(), True),
])

#: The file stream source's option: how far a file's mtime may lie behind the newest file the source
#: has taken (Spark's FileStreamOptions), 7 days by default.
MAX_FILE_AGE_OPTION = "maxFileAge"
#: Long.MaxValue milliseconds, the age Spark itself uses when it ignores maxFileAge: no file is too old.
UNBOUNDED_FILE_AGE = f"{2**63 - 1}ms"


@dataclass(frozen=True)
class ImageTable:
    """The rows to segment: ``key``, then ``image`` (bytes) or ``path`` (a file to read), and the
    original ``height``/``width`` where the bytes were already resized (a petseg dataset)."""

    frame: DataFrame
    key: str
    format: InputFormat
    reads_files: bool
    has_sizes: bool
    #: The largest encoded image among the first :data:`SIZE_SAMPLE_ROWS` rows; None for file paths.
    row_bytes: int | None = None


def detect_format(spark: SparkSession, url: str) -> InputFormat:
    """petastorm (a folder with Petastorm metadata), parquet (a folder of Parquet or a .parquet
    file), else images (a folder or glob of image files)."""
    storage = storage_for(spark)
    if is_glob(url):
        return InputFormat.images
    if storage.exists(f"{url.rstrip('/')}/_common_metadata"):
        return InputFormat.petastorm
    if url.endswith(".parquet") or storage.glob(url, "*.parquet") or storage.glob(url, "*=*/*.parquet"):
        return InputFormat.parquet
    if not storage.exists(url):
        raise InputError(f"infer.input={url!r} does not exist; pass a dataset URL, a table name or a folder of images")
    return InputFormat.images


def load_image_table(spark: SparkSession, *, infer: InferConfig) -> ImageTable:
    """The configured input as an :class:`ImageTable`, limited and partitioned as configured.

    Raises
    ------
    InputError
        When the input is missing or empty, or lacks the configured image or key column.
    """
    url = str(infer.input)
    fmt = infer.input_format if infer.input_format is not InputFormat.auto else detect_format(spark, url)
    if fmt is InputFormat.images:
        return _image_files(spark, url, infer)
    table = _image_columns(source_frame(spark, url, fmt), fmt=fmt, url=url, infer=infer)
    table = replace(table, row_bytes=sampled_row_bytes(table.frame))  # before a shuffle, so only the start is read
    frame = table.frame
    if infer.limit:
        frame = frame.limit(infer.limit)
    slots = default_parallelism(spark)
    if slots is None:  # Spark Connect: neither the slots nor the scan's partitions are known here
        if infer.partitions or infer.limit:
            frame = frame.repartition(infer.partitions or CONNECT_MIN_TASKS)
        return replace(table, frame=frame)
    current = frame.rdd.getNumPartitions()
    wanted = infer.partitions or max(slots, current)
    if wanted != current or infer.limit:
        frame = frame.repartition(wanted)
    return replace(table, frame=frame)


def load_image_stream(spark: SparkSession, *, infer: InferConfig) -> ImageTable:
    """The configured input as a streaming :class:`ImageTable`: each trigger brings the rows (image
    files, Parquet files, table rows) that the query's checkpoint has not seen.

    Image files come through Spark's binaryFile source with their bytes. Like every Spark file
    source it skips zero-length files (SPARK-26161) and reads a file once, when it is first listed:
    whatever writes into the folder must move finished files in (write elsewhere, then rename).
    Files, images or Parquet, are taken once by path, whatever their mtime (:func:`_file_stream`).

    Raises
    ------
    InputError
        When the input is missing, lies in a folder petseg publishes (:func:`check_stream_input`), or
        lacks the configured image or key column.
    """
    check_stream_input(spark, infer=infer)
    url = str(infer.input)
    fmt = infer.input_format if infer.input_format is not InputFormat.auto else detect_format(spark, url)
    if fmt is InputFormat.images:
        if not is_glob(url) and not storage_for(spark).is_dir(url):
            raise InputError(f"infer.input={url!r} is not a folder; point the stream at the folder images arrive in")
        frame = (
            _binary_files(_file_stream(spark, schema=BINARY_FILE_SCHEMA), url)
            # Hadoop writes a local file's URL file:/x; batch runs list it as file:///x. One form for both.
            .select(F.regexp_replace("path", "^file:/(?!/)", "file:///").alias("path"), F.col("content").alias("image"))
        )
        sample = _existing_images(spark, url)
        table = ImageTable(frame=frame, key="path", format=fmt, reads_files=False, has_sizes=False)
    else:
        sample = _image_columns(source_frame(spark, url, fmt), fmt=fmt, url=url, infer=infer).frame
        table = _image_columns(source_frame(spark, url, fmt, stream=True), fmt=fmt, url=url, infer=infer)
    # A stream's batches are sized from what the source already holds (the same kind of images).
    table = replace(table, row_bytes=None if sample is None else sampled_row_bytes(sample))
    if infer.partitions:
        table = replace(table, frame=table.frame.repartition(infer.partitions))
    return table


def check_stream_input(spark: SparkSession, *, infer: InferConfig) -> None:
    """Refuse to stream a folder that lies in a petseg published output (a dataset, masks, rejects).

    A stream takes each file once by path; a publish replaces the whole folder with files of new
    names, so every row would land again after each publish. The folder, the non-glob part of a glob,
    and each folder above it are checked for the manifest, with no Spark job.

    Raises
    ------
    InputError
        Naming ``infer.input``, the manifest found and the fix (``infer.mode=batch``).
    """
    url = str(infer.input)
    if infer.input_format is InputFormat.table:
        return
    parts = split_url(url.rstrip("/"))
    components = parts.path.split("/")
    first_glob = next((i for i, part in enumerate(components) if is_glob(part)), len(components))
    storage = storage_for(spark)
    # From the deepest folder up: a split's folder inside a dataset is replaced with the dataset.
    for depth in range(first_glob, 1, -1):
        folder = parts.with_path("/".join(components[:depth]))
        manifest = f"{folder}/{MANIFEST_FILE}"
        if storage.exists(manifest):
            found = read_manifest(folder)  # through pyarrow, which may lack the cluster's credentials
            kind = found["kind"] if found is not None else "output"
            raise InputError(
                f"infer.input={url!r} belongs to a petseg {kind} ({manifest}), which the job that writes it "
                f"replaces whole, under new file names: infer.mode={infer.mode.value} would segment every row "
                "again after each replacement. Use infer.mode=batch, which replaces infer.output with one row "
                "per input row"
            )


def _file_stream(spark: SparkSession, *, schema: StructType) -> DataStreamReader:
    """A stream reader for Spark's file source that takes each file it has not taken, whatever its mtime.

    By default the source, after its first micro-batch, skips a file whose mtime lies more than
    maxFileAge (7 days) behind the newest file it has taken: a photo copied with ``cp -p``,
    ``rsync -a`` or ``unzip``, or staged elsewhere for a week, would never be read. Unbounded, it
    forgets no path it has taken, and keeps all of them in the driver's memory (about 120 bytes
    plus the URL's length each, measured on Spark 3.5: see docs/inference.md). Not latestFirst with
    maxFilesPerTrigger, which also lifts the limit: it takes the newest files first, in capped batches.
    """
    return spark.readStream.schema(schema).option(MAX_FILE_AGE_OPTION, UNBOUNDED_FILE_AGE)


def _binary_files(reader: Any, url: str) -> DataFrame:
    # A folder is read with everything under it, as batch runs list it.
    return reader.format("binaryFile").option("recursiveFileLookup", str(not is_glob(url)).lower()).load(url)


def _existing_images(spark: SparkSession, url: str) -> DataFrame | None:
    """The image files a stream's folder or glob already holds, as (image); None while a glob matches
    nothing yet (a batch read refuses such a path; a stream waits for files)."""
    try:
        return _binary_files(spark.read, url).select(F.col("content").alias("image"))
    except AnalysisException as exc:
        if "PATH_NOT_FOUND" not in str(exc) and "Path does not exist" not in str(exc):
            raise
        return None


def sampled_row_bytes(frame: DataFrame, column: str = "image") -> int:
    """The largest value of a binary column among a frame's first :data:`SIZE_SAMPLE_ROWS` rows (0 if none)."""
    largest = frame.select(F.length(column).alias("n")).limit(SIZE_SAMPLE_ROWS).agg(F.max("n")).first()[0]
    return int(largest or 0)


def source_frame(spark: SparkSession, url: str, fmt: InputFormat, *, stream: bool = False) -> DataFrame:
    """A catalog table or a Parquet (or petseg) dataset as it is, batch or streaming.

    Raises
    ------
    InputError
        When the table does not exist, or the path is missing or not Parquet.
    """
    if fmt is InputFormat.table:
        if not spark.catalog.tableExists(url):
            raise InputError(f"infer.input={url!r} is not a table in the catalog; check the name or pass a path")
        return spark.readStream.table(url) if stream else spark.table(url)
    try:
        frame = spark.read.parquet(url)
    except Exception as exc:  # AnalysisException: path missing or not Parquet
        raise InputError(f"cannot read infer.input={url!r} as Parquet ({_first_line(exc)}); check the path") from None
    # A streaming file source needs its schema up front: the batch read's.
    return _file_stream(spark, schema=frame.schema).parquet(url) if stream else frame


def _image_columns(frame: DataFrame, *, fmt: InputFormat, url: str, infer: InferConfig) -> ImageTable:
    """(key, image[, height, width]) of a table of encoded images, checked against the config."""
    image = infer.image_column
    binary = [f.name for f in frame.schema.fields if isinstance(f.dataType, BinaryType)]
    if image not in binary:
        raise InputError(
            f"infer.image_column={image!r} is not a binary column of {url}; "
            f"binary columns there: {', '.join(binary) or 'none'}"
        )
    key = _key_column(frame, infer.key_column, url)
    has_sizes = fmt is InputFormat.petastorm and {"height", "width"} <= set(frame.columns)
    columns = [F.col(key), F.col(image).alias("image")]
    if has_sizes:
        # A petseg dataset stores images resized to the model's size; masks go back to the original.
        columns += [F.col("height").cast("int"), F.col("width").cast("int")]
    return ImageTable(frame=frame.select(*columns), key=key, format=fmt, reads_files=False, has_sizes=has_sizes)


def _image_files(spark: SparkSession, url: str, infer: InferConfig) -> ImageTable:
    # Listed by petseg rather than with Spark's binaryFile source, which silently skips
    # zero-length files (SPARK-26161) and fails the whole job on one unreadable file; here each
    # becomes a row with an error. Wide trees are listed on the executors.
    try:
        frame = list_files_frame(spark, url)
        if infer.limit:
            frame = frame.orderBy("path").limit(infer.limit)
        count = frame.count()
    except OSError as exc:
        raise InputError(f"cannot list infer.input={url!r}: {exc}") from None
    if not count:
        raise InputError(f"infer.input={url!r} matches no files; check the folder or glob")
    slots = default_parallelism(spark) or CONNECT_MIN_TASKS
    partitions = infer.partitions or max(slots, math.ceil(count / FILES_PER_TASK))
    return ImageTable(frame=frame.repartition(partitions), key="path", format=InputFormat.images, reads_files=True,
                      has_sizes=False)


def _key_column(frame: DataFrame, configured: str | None, url: str) -> str:
    if configured:
        if configured not in frame.columns:
            raise InputError(
                f"infer.key_column={configured!r} is not a column of {url}; columns: {', '.join(frame.columns)}"
            )
        return configured
    for name in KEY_CANDIDATES:
        if name in frame.columns:
            return name
    raise InputError(
        f"{url} has none of the key columns {', '.join(KEY_CANDIDATES)}; set infer.key_column to one of: "
        f"{', '.join(frame.columns)}"
    )


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
