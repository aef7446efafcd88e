"""Stage 1: pet images and trimaps to a Petastorm Parquet dataset, with a rejects table beside it."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator

import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import BinaryType, IntegerType, StructField, StructType

from petseg.config import DataConfig, Source
from petseg.data.decode import DEFAULT_MAX_IMAGE_PIXELS, prepare_example
from petseg.data.schema import REJECTS_SCHEMA, SPLIT, encode_value, ignore_petastorm_pyarrow_deprecations, pet_fields, pet_schema
from petseg.data.unischema import write_common_metadata
from petseg.errors import ConfigError, InputError, RejectedInput
from petseg.ingest.pairs import PAIRS_SCHEMA, DecodeTasks, example_bytes
from petseg.io.fs import Storage, read_file, storage_for
from petseg.io.publish import atomic_output, check_replaceable
from petseg.session import ARROW_BATCH_ROWS_CONF, session_confs

log = logging.getLogger(__name__)

#: What the decode stage returns per input row: the example's columns, or a reason it was rejected.
PREPARED_SCHEMA = StructType(
    [f for f in PAIRS_SCHEMA.fields if f.name not in ("image", "mask", "mask_path")]
    + [
        StructField("image", BinaryType(), True),
        StructField("mask", BinaryType(), True),
        StructField("height", IntegerType(), True),
        StructField("width", IntegerType(), True),
    ]
)


#: Rows per cached batch of the decoded examples (Spark's default: 10,000).
CACHE_BATCH_ROWS_CONF = "spark.sql.inMemoryColumnarStorage.batchSize"
#: Bytes of decoded examples per cached and Arrow batch: 128 raw 128x128 examples.
DECODE_BATCH_BYTES = 8 * 1024 * 1024


class IngestError(InputError):
    """Nothing usable was ingested; the message says why and where the rejects are."""


@dataclass(frozen=True)
class IngestReport:
    dataset: str
    rejects: str
    written: dict[str, int] = field(default_factory=dict)  # split -> rows
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> rows
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> wall time
    writer: str = ""  # which wrote the metadata: see dataset_writer
    decode_tasks: int = 0  # tasks that read and decoded the input

    @property
    def read(self) -> int:
        return sum(self.written.values()) + sum(self.rejected.values())

    def format(self) -> str:
        lines = [f"ingest: read {self.read}, written {sum(self.written.values())}, rejected {sum(self.rejected.values())}"]
        lines += [f"  written  {split:<28} {n:>8}" for split, n in sorted(self.written.items())]
        lines += [f"  rejected {reason:<28} {n:>8}" for reason, n in sorted(self.rejected.items())]
        if self.seconds:
            lines.append("  seconds: " + ", ".join(f"{phase} {t:.1f}" for phase, t in self.seconds.items())
                         + (f" ({self.decode_tasks} decode tasks)" if self.decode_tasks else ""))
        lines.append(f"  dataset: {self.dataset}")
        if self.writer:
            lines.append(f"  writer:  {WRITERS[self.writer]}")
        if self.rejected:
            lines.append(f"  rejects: {self.rejects}")
        return "\n".join(lines)


@contextlib.contextmanager
def _load_synthetic(spark: SparkSession, *, data: DataConfig, tasks: DecodeTasks) -> Iterator[DataFrame]:
    """Generated pets (data.source=synthetic), rendered by tasks sized by their count."""
    from petseg.ingest.synthetic import load_synthetic

    yield load_synthetic(
        spark,
        count=data.synthetic_count,
        seed=data.synthetic_seed,
        test_fraction=data.synthetic_test_fraction,
        partitions=tasks.tasks(files=data.synthetic_count),
    )


def _load_oxford(spark: SparkSession, *, data: DataConfig, tasks: DecodeTasks) -> ContextManager[DataFrame]:
    """The Oxford-IIIT Pet release under data.input (data.source=oxford), decoded by tasks sized by its volume."""
    from petseg.ingest.oxford import load_oxford

    return load_oxford(spark, root=str(data.input), tasks=tasks)


@contextlib.contextmanager
def _load_tfds(spark: SparkSession, *, data: DataConfig, tasks: DecodeTasks) -> Iterator[DataFrame]:
    """The TFDS build in the data_dir data.input (data.source=tfds); ``tasks`` is not used."""
    # One task per slice of the TFDS splits (petseg.ingest.tfds.SLICE_SIZE, 256 examples), whatever
    # data.partitions says: already bounded, whatever the build's size.
    from petseg.ingest.tfds import load_tfds

    yield load_tfds(spark, data_dir=str(data.input), name=data.tfds_name, download=data.tfds_download)


#: data.source -> the loader that reads it into :data:`petseg.ingest.pairs.PAIRS_SCHEMA` rows, as a
#: context manager: what a loader hands its tasks (a listing's file) lives as long as the job uses the
#: rows. Each loader imports its module when called, so a job imports only the source it reads.
LOADERS: dict[Source, Callable[..., ContextManager[DataFrame]]] = {
    Source.synthetic: _load_synthetic,
    Source.oxford: _load_oxford,
    Source.tfds: _load_tfds,
}


def decode_tasks(spark: SparkSession, data: DataConfig) -> DecodeTasks:
    """How the configured source's decode tasks are sized: ``data.partitions`` if set, else by the
    input's volume (``data.max_files_per_task``, ``data.max_mb_per_task``), at least twice the
    cluster's default parallelism."""
    return DecodeTasks(
        fixed=data.partitions,
        max_files=data.max_files_per_task,
        max_bytes=data.max_mb_per_task * 1024 * 1024,
        example_bytes=example_bytes(data.image_size),
        min_tasks=2 * spark.sparkContext.defaultParallelism,
    )


def load_pairs(spark: SparkSession, data: DataConfig) -> ContextManager[DataFrame]:
    """The configured source as a DataFrame of :data:`petseg.ingest.pairs.PAIRS_SCHEMA`, for as long
    as the returned context lasts.

    Raises
    ------
    ConfigError
        When ``data.source`` has no loader in :data:`LOADERS`, naming it and the sources there are.
    """
    loader = LOADERS.get(data.source)
    if loader is None:
        choices = ", ".join(source.value for source in LOADERS)
        raise ConfigError(
            f"data.source={getattr(data.source, 'value', data.source)!r} has no ingest loader; use one of {choices}"
        )
    return loader(spark, data=data, tasks=decode_tasks(spark, data))


def prepare_pairs(
    pairs: DataFrame, *, image_size: int, image_codec: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> DataFrame:
    """Decode, check, resize and encode every pair on the executors (:data:`PREPARED_SCHEMA`); images
    and trimaps over ``max_image_pixels`` are rejected from their headers. Files a source left
    unread (null bytes) are read here, from ``path`` and ``mask_path``."""
    return pairs.mapInPandas(_prepare_batches(image_size, image_codec, max_image_pixels), PREPARED_SCHEMA)


def _prepare_batches(
    image_size: int, image_codec: str, max_image_pixels: int
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    def prepare(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        fields = {f.name: f for f in pet_fields(image_size=image_size, image_codec=image_codec)}
        image_field, mask_field = fields["image"], fields["mask"]
        for batch in batches:
            out = {name: [] for name in ("image", "mask", "height", "width")}
            reasons, details = batch["reason"].tolist(), batch["detail"].tolist()
            paths, mask_paths = batch["path"].tolist(), batch["mask_path"].tolist()
            for i, (image, mask, reason) in enumerate(zip(batch["image"], batch["mask"], batch["reason"])):
                example = None
                if reason is None:
                    try:
                        image = read_file(paths[i]) if image is None else image
                        mask = read_file(mask_paths[i]) if mask is None else mask
                        example = prepare_example(image, mask, size=image_size, max_pixels=max_image_pixels)
                    except RejectedInput as exc:
                        reasons[i], details[i] = exc.reason, exc.detail
                if example is None:
                    for values in out.values():
                        values.append(None)
                    continue
                out["image"].append(encode_value(image_field, example.image))
                out["mask"].append(encode_value(mask_field, example.mask))
                out["height"].append(example.height)
                out["width"].append(example.width)
            yield pd.DataFrame(
                {
                    "id": batch["id"],
                    "split": batch["split"],
                    "path": batch["path"],
                    "reason": reasons,
                    "detail": details,
                    **{k: pd.Series(v, dtype="object" if k in ("image", "mask") else "Int32") for k, v in out.items()},
                }
            )

    return prepare


#: Which code writes a dataset's Petastorm metadata (see :func:`dataset_writer`).
WRITERS = {
    "petastorm": "petastorm's materialize_dataset",
    "petseg": "petseg's own (Petastorm's format, petastorm not used)",
}


def dataset_writer() -> str:
    """``petastorm`` where petastorm 0.13.1 can write (it is installed and pyarrow is older than 15), else ``petseg``.

    The one place the choice is made. Both write the same data files; only the ``_common_metadata``
    footer comes from petastorm's ``materialize_dataset`` or from :func:`write_common_metadata`, which
    writes the same keys. petastorm 0.13.1 calls pyarrow's legacy ParquetDataset, which pyarrow 15
    removed, and imports ``pyarrow.filesystem``, gone since pyarrow 16 (uber/petastorm#805).
    """
    import importlib.util

    import pyarrow

    if int(pyarrow.__version__.split(".")[0]) >= 15 or importlib.util.find_spec("petastorm") is None:
        return "petseg"
    return "petastorm"


def parquet_write_options(*, rowgroup_size_mb: int) -> dict[str, str]:
    """The Parquet settings petastorm's ``materialize_dataset`` puts in the Hadoop configuration
    (``_init_spark``), given to each write as options, which Spark copies into that write's Hadoop
    configuration: row groups of ``rowgroup_size_mb``, checked for size from the third row on (not
    the 100th: a 128x128 example is 65 KB), and no summary files."""
    return {
        "parquet.block.size": str(rowgroup_size_mb * 1024 * 1024),
        "parquet.block.size.row.check.min": "3",
        "parquet.row-group.size.row.check.min": "3",
        "parquet.summary.metadata.level": "NONE",
    }


def write_dataset(spark: SparkSession, examples: DataFrame, *, url: str, data: DataConfig, split_rows: dict[str, int],
                  writer: str) -> None:
    """Write accepted examples as a Petastorm dataset partitioned by split into the new folder ``url``.

    Each split is its own Hive-style folder (``split=train``), so its row groups hold only its rows
    and a reader filtering on split skips the others without opening them. Within a split, files
    are capped at ceil(rows / min_row_groups_per_split) records: every file holds at least one row
    group, so even a small split gets enough row groups for Petastorm to shard across workers, while
    data.rowgroup_size_mb bounds them for large splits. ``writer`` (:func:`dataset_writer`) says who
    writes the ``_common_metadata``.
    """
    fields = pet_fields(image_size=data.image_size, image_codec=data.image_codec.value)
    columns = [f.name for f in fields if f.name != SPLIT]
    options = parquet_write_options(rowgroup_size_mb=data.rowgroup_size_mb)
    with _metadata_writer(spark, url, data=data, writer=writer):
        for split, rows in sorted(split_rows.items()):
            (
                examples.where(F.col(SPLIT) == split)
                .withColumnRenamed("path", "source_path")
                .select(*columns)
                .write.mode("overwrite")
                .options(**options)
                .option("maxRecordsPerFile", max(1, math.ceil(rows / data.min_row_groups_per_split)))
                .parquet(f"{url}/{SPLIT}={split}")
            )
    if writer == "petseg":
        write_common_metadata(url, fields)


def _metadata_writer(spark: SparkSession, url: str, *, data: DataConfig, writer: str) -> ContextManager[Any]:
    """petastorm's ``materialize_dataset`` around the writes where it writes the metadata, else nothing."""
    if writer == "petseg":
        return contextlib.nullcontext()
    from petastorm.etl.dataset_metadata import materialize_dataset

    ignore_petastorm_pyarrow_deprecations()
    schema = pet_schema(image_size=data.image_size, image_codec=data.image_codec.value)
    return materialize_dataset(spark, url, schema, data.rowgroup_size_mb)


def rejects_table(rejects: DataFrame) -> DataFrame:
    """The rejects' columns in one partition, for one small file.

    ``repartition(1)``, not ``coalesce(1)``: a coalesce would run everything upstream of it in a single
    task, here a scan of the whole cached frame, images and all; the shuffle moves only the
    projected reject rows, while the scan stays spread over the cluster.
    """
    return rejects.select([f.name for f in REJECTS_SCHEMA.fields]).repartition(1)


def write_rejects(rejects: DataFrame, *, url: str) -> None:
    """Write the rejects table (id, split, path, reason, detail) as Parquet into the new folder ``url``;
    with no rejects, an empty table, so that the folder says this run rejected nothing."""
    rejects_table(rejects).write.mode("overwrite").parquet(url)


def run_ingest(spark: SparkSession, *, data: DataConfig, writer: str | None = None) -> IngestReport:
    """Read the configured source, write the Petastorm dataset and the rejects table, and report counts.

    Parameters
    ----------
    spark
        The session to run on.
    data
        The ``data`` section of a validated config (see :mod:`petseg.config`).
    writer
        ``petastorm`` or ``petseg``: who writes the dataset's metadata; None lets
        :func:`dataset_writer` choose, as every job does.

    Returns
    -------
    IngestReport
        Rows written per split and rejected per reason; ``read == written + rejected``.

    Raises
    ------
    InputError
        When the input is missing or empty, or (after the rejects are written, so they can be
        inspected) when no valid example remains.
    """
    writer = writer or dataset_writer()
    if writer not in WRITERS:
        raise ValueError(f"writer={writer!r} is not a dataset writer; use one of {', '.join(WRITERS)}, or None")
    storage = storage_for(spark)
    check_replaceable(storage, data.dataset, kind="dataset", key="data.dataset")  # before any Spark job
    check_replaceable(storage, str(data.rejects), kind="rejects", key="data.rejects")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase], clock = round(now - clock, 2), now

    with load_pairs(spark, data) as pairs:
        lap("list")
        return _decode_and_write(spark, pairs, data=data, writer=writer, storage=storage, lap=lap, seconds=seconds)


def decode_batch_confs(image_size: int) -> dict[str, str]:
    """Session confs for ingest's decode and cache: batches of :data:`DECODE_BATCH_BYTES` of examples.

    Spark builds each cached batch (``spark.sql.inMemoryColumnarStorage.batchSize`` rows, 10,000 by
    default) in growing heap buffers that its memory manager does not see, and hands Python's output
    back in Arrow batches of ``spark.sql.execution.arrow.maxRecordsPerBatch`` rows (10,000 too): at
    128x128 a whole 1,024-row task, 64 MB a column, built, doubled and copied at once. Small
    batches keep that transient memory a few MB a column.
    """
    rows = str(max(1, DECODE_BATCH_BYTES // example_bytes(image_size)))
    return {CACHE_BATCH_ROWS_CONF: rows, ARROW_BATCH_ROWS_CONF: rows}


def _decode_and_write(spark: SparkSession, pairs: DataFrame, *, data: DataConfig, writer: str, storage: Storage,
                      lap: Callable[[str], None], seconds: dict[str, float]) -> IngestReport:
    """Decode ``pairs`` once, count them, write the rejects and the dataset, publish both."""
    # Read when the cache is first built (the counts below) and by every pass through Python: held throughout.
    with session_confs(spark, decode_batch_confs(data.image_size)):
        return _decode_and_write_batched(spark, pairs, data=data, writer=writer, storage=storage, lap=lap,
                                         seconds=seconds)


def _decode_and_write_batched(spark: SparkSession, pairs: DataFrame, *, data: DataConfig, writer: str,
                              storage: Storage, lap: Callable[[str], None], seconds: dict[str, float]) -> IngestReport:
    prepared = prepare_pairs(pairs, image_size=data.image_size, image_codec=data.image_codec.value,
                             max_image_pixels=data.max_image_pixels)
    # Three consumers below (counts, rejects, dataset): decode once, onto the executors' local disks.
    # In memory (MEMORY_AND_DISK, 64 MB a task) 2 GB executors ran out of heap with ~1.3 GB of
    # decoded examples cached each, at 100,000 photos, small batches or not; on disk a task holds one
    # batch at a time, and the disk cache is read back from the page cache.
    prepared = prepared.persist(StorageLevel.DISK_ONLY)
    try:
        counts = prepared.groupBy(F.col("reason").isNull().alias("ok"), "split", "reason").count().collect()
        written: Counter[str] = Counter()
        rejected: Counter[str] = Counter()
        for row in counts:
            if row["ok"]:
                written[row["split"]] += row["count"]
            else:
                rejected[row["reason"]] += row["count"]
        if not written and not rejected:
            raise InputError(f"the {data.source.value} input {data.input or ''} produced no rows; check data.input")
        lap("decode")
        report = IngestReport(
            dataset=data.dataset, rejects=str(data.rejects), written=dict(written), rejected=dict(rejected), seconds=seconds,
            writer=writer, decode_tasks=pairs.rdd.getNumPartitions(),
        )
        rejects_out = functools.partial(atomic_output, storage, str(data.rejects), kind="rejects", key="data.rejects")
        if not written:
            with rejects_out() as staged:  # published alone, so that they can be inspected
                write_rejects(prepared.where(F.col("reason").isNotNull()), url=staged.url)
                staged.rows = dict(rejected)
            raise IngestError(
                f"no valid example remains out of {report.read} read; see the rejects table at {data.rejects} "
                f"(reasons: {dict(rejected)})"
            )
        # Both written, then both published (the dataset first): a failed write leaves the last run's pair.
        with rejects_out() as staged_rejects, \
                atomic_output(storage, data.dataset, kind="dataset", key="data.dataset") as staged:
            write_rejects(prepared.where(F.col("reason").isNotNull()), url=staged_rejects.url)
            staged_rejects.rows = dict(rejected)
            lap("rejects")
            write_dataset(spark, prepared.where(F.col("reason").isNull()), url=staged.url, data=data,
                          split_rows=dict(written), writer=writer)
            staged.rows = dict(written)
        lap("dataset")
    finally:
        prepared.unpersist()
    log.info("ingest wrote %d examples to %s", sum(written.values()), data.dataset)
    return report
