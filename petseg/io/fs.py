"""File operations every stage needs: listing and reading files, writing and publishing outputs.

What Spark writes is moved and published through the cluster's Hadoop FileSystem (:class:`Storage`),
with the credentials the cluster already has configured: one code path for file://, hdfs://,
s3a://, gs:// and abfss://. Over Spark Connect there is no JVM gateway to reach it, so the same
operations go through pyarrow on the client (:class:`ArrowStorage`), which must then see the
storage the server writes (a Databricks job on serverless compute sees /Volumes and cloud URLs).
:func:`storage_for` picks one. Files are listed and read through pyarrow (:func:`list_files`,
:func:`read_file`), on the driver or on executors. All follow :mod:`petseg.io.urls`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

import pandas as pd

from petseg.errors import RejectedInput
from petseg.io import urls

if TYPE_CHECKING:  # read_file runs where Spark is not installed: in the MLflow model's own environment
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

log = logging.getLogger(__name__)

#: Subfolders from which a listing runs on the executors, a task per few folders (Spark lists a
#: table's partition folders in parallel from 32, spark.sql.sources.parallelPartitionDiscovery.threshold).
PARALLEL_LISTING_FOLDERS = 32
#: Arrow for ``createDataFrame`` of a pandas frame (off by default on Spark 3.5).
ARROW_PYSPARK_CONF = "spark.sql.execution.arrow.pyspark.enabled"


class Storage:
    """Files and folders of outputs: what each stage needs to check inputs and publish outputs.

    Subclasses give the primitive operations; publishing (:mod:`petseg.io.publish`) is built on them once.
    """

    def exists(self, url: str) -> bool:
        raise NotImplementedError

    def is_dir(self, url: str) -> bool:
        raise NotImplementedError

    def glob(self, url: str, pattern: str) -> list[tuple[str, int]]:
        """(path, length) of the files under ``url`` matching a Hadoop glob such as ``*.{jpg,png}``."""
        raise NotImplementedError

    def write_bytes(self, url: str, data: bytes) -> None:
        """Write a small file (a report, a PNG), replacing it."""
        raise NotImplementedError

    def delete(self, url: str) -> None:
        raise NotImplementedError

    def rename(self, src: str, dst: str) -> None:
        raise NotImplementedError

    def siblings(self, url: str, mark: str) -> list[str]:
        """URLs of the files and folders beside ``url`` named ``<url's name><mark>*``."""
        raise NotImplementedError

    def modified(self, url: str) -> float:
        """When ``url`` was last modified, in seconds since the epoch."""
        raise NotImplementedError

    def create_new(self, url: str, data: bytes) -> bool:
        """Write a small file only if ``url`` does not exist; False if it does."""
        raise NotImplementedError


class HadoopStorage(Storage):
    """Storage through the Hadoop FileSystem of a classic session's JVM."""

    def __init__(self, spark: SparkSession) -> None:
        self._spark = spark
        self._jvm: Any = spark.sparkContext._jvm
        self._hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()

    def _path(self, url: str) -> tuple[Any, Any]:
        path = self._jvm.org.apache.hadoop.fs.Path(url)
        return path.getFileSystem(self._hadoop_conf), path

    def exists(self, url: str) -> bool:
        fs, path = self._path(url)
        return bool(fs.exists(path))

    def is_dir(self, url: str) -> bool:
        fs, path = self._path(url)
        return bool(fs.exists(path) and fs.getFileStatus(path).isDirectory())

    def glob(self, url: str, pattern: str) -> list[tuple[str, int]]:
        """(path, length) of the files under ``url`` matching a Hadoop glob such as ``*.{jpg,png}``."""
        fs, path = self._path(f"{url.rstrip('/')}/{pattern}")
        statuses = fs.globStatus(path) or []
        return [(str(s.getPath().toString()), int(s.getLen())) for s in statuses if s.isFile()]

    def write_bytes(self, url: str, data: bytes) -> None:
        """Write a small file (a report, a PNG) through the cluster's FileSystem, replacing it."""
        fs, path = self._path(url)
        stream = fs.create(path, True)
        try:
            stream.write(bytearray(data))
        finally:
            stream.close()

    def delete(self, url: str) -> None:
        fs, path = self._path(url)
        if fs.exists(path):
            fs.delete(path, True)

    def rename(self, src: str, dst: str) -> None:
        fs, src_path = self._path(src)
        _, dst_path = self._path(dst)
        # Hadoop moves a folder *into* an existing folder of the target's name, which would nest one
        # run's output inside another's: refuse instead.
        if fs.exists(dst_path) or not fs.rename(src_path, dst_path):
            raise OSError(f"could not rename {src} to {dst}; check permissions and that {dst} does not exist")

    def siblings(self, url: str, mark: str) -> list[str]:
        fs, path = self._path(f"{url.rstrip('/')}{mark}*")
        return [str(s.getPath().toString()) for s in fs.globStatus(path) or []]

    def modified(self, url: str) -> float:
        fs, path = self._path(url)
        return fs.getFileStatus(path).getModificationTime() / 1000.0

    def create_new(self, url: str, data: bytes) -> bool:
        fs, path = self._path(url)
        try:
            stream = fs.create(path, False)  # exclusive on HDFS and local disks; check-then-write on object stores
        except Exception as exc:  # py4j's Py4JJavaError around FileAlreadyExistsException
            if fs.exists(path):
                return False
            raise OSError(f"could not create {url}: {exc}") from None
        try:
            stream.write(bytearray(data))
        finally:
            stream.close()
        return True


class ArrowStorage(Storage):
    """Storage through pyarrow's file systems (:func:`petseg.io.urls.arrow_filesystem`), for
    sessions without a JVM gateway (Spark Connect)."""

    def exists(self, url: str) -> bool:
        from pyarrow import fs as pafs

        fs, path = urls.arrow_filesystem(url)
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def is_dir(self, url: str) -> bool:
        from pyarrow import fs as pafs

        fs, path = urls.arrow_filesystem(url)
        return fs.get_file_info(path).type == pafs.FileType.Directory

    def glob(self, url: str, pattern: str) -> list[tuple[str, int]]:
        from pyarrow import fs as pafs

        target = _ListTarget.of(f"{url.rstrip('/')}/{pattern}")
        fs, base = urls.arrow_filesystem(target.url(target.base_path))
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        depth = max(len(p) for p in target.patterns)
        found = []
        for entry in fs.get_file_info(pafs.FileSelector(base, recursive=depth > 1)):
            relative = entry.path[len(base.rstrip("/")) + 1:].split("/")
            if entry.type == pafs.FileType.File and any(
                len(relative) == len(p) and all(fnmatchcase(r, q) for r, q in zip(relative, p)) for p in target.patterns
            ):
                found.append((target.url(f"{target.base_path.rstrip('/')}/{'/'.join(relative)}"), int(entry.size)))
        return found

    def write_bytes(self, url: str, data: bytes) -> None:
        fs, path = urls.arrow_filesystem(url)
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as stream:
            stream.write(data)

    def delete(self, url: str) -> None:
        from pyarrow import fs as pafs

        fs, path = urls.arrow_filesystem(url)
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif kind != pafs.FileType.NotFound:
            fs.delete_file(path)

    def rename(self, src: str, dst: str) -> None:
        fs, src_path = urls.arrow_filesystem(src)
        _, dst_path = urls.arrow_filesystem(dst)
        if self.exists(dst):
            raise OSError(f"could not rename {src} to {dst}: {dst} exists")
        try:
            fs.move(src_path, dst_path)
        except OSError as exc:
            raise OSError(f"could not rename {src} to {dst} ({exc}); check permissions") from None

    def siblings(self, url: str, mark: str) -> list[str]:
        from pyarrow import fs as pafs

        parts = urls.split_url(url.rstrip("/"))
        parent, name = parts.path.rsplit("/", 1)
        fs, path = urls.arrow_filesystem(parts.with_path(parent or "/"))
        return [parts.with_path(f"{parent}/{e.base_name}")
                for e in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                if e.base_name.startswith(name + mark)]

    def modified(self, url: str) -> float:
        fs, path = urls.arrow_filesystem(url)
        mtime = fs.get_file_info(path).mtime
        return mtime.timestamp() if mtime is not None else 0.0

    def create_new(self, url: str, data: bytes) -> bool:
        if urls.is_local(url):
            path = urls.local_path(url)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return True
        if self.exists(url):  # object stores have no exclusive create here: check, then write
            return False
        self.write_bytes(url, data)
        return True


def storage_for(spark: SparkSession) -> Storage:
    """The :class:`Storage` of a session: Hadoop's for a classic one, pyarrow's over Spark Connect."""
    from petseg.session import is_connect

    return ArrowStorage() if is_connect(spark) else HadoopStorage(spark)


def list_files(url: str) -> list[str]:
    """URLs of every file under a folder (recursively), or matching a glob, on the driver.

    Globs follow Hadoop's: ``*``, ``?`` and ``[...]`` within one path component, ``{a,b}``
    alternatives; a matching folder contributes every file under it. Names starting with ``.`` or
    ``_`` are hidden, as Spark treats them. The URLs come back in the form ``url`` was given, their
    paths literal (see :mod:`petseg.io.urls`), so :func:`read_file` opens each as listed. pyarrow
    lists a whole tree in one native call (7 us a file here), where walking Hadoop's iterator
    through py4j costs ~4 ms a file. :func:`list_files_frame` lists wide trees on the executors.
    """
    return [path for path, _ in list_files_sized(url)]


def list_files_sized(url: str) -> list[tuple[str, int]]:
    """:func:`list_files` with each file's length in bytes, from the same listing call."""
    target = _ListTarget.of(url)
    return target.files(target.kind())


def list_files_frame(spark: SparkSession, url: str, *, parallel_folders: int = PARALLEL_LISTING_FOLDERS) -> DataFrame:
    """:func:`list_files` as a one-column (``path``) DataFrame, listed on the executors when wide.

    Where the listed folder (the part of ``url`` before its first glob) holds ``parallel_folders``
    or more subfolders that can match, each is listed by a task, so that a bucket of dated folders
    is listed in parallel and its paths never pass through the driver; its own files, and smaller
    trees, are listed on the driver. A flat folder of a million files is one listing call either way.
    """
    target = _ListTarget.of(url)
    kind = target.kind()
    folders = target.folders() if kind == "folder" else []
    if len(folders) < parallel_folders:
        return _strings_frame(spark, "path", [path for path, _ in target.files(kind)])

    def list_folders(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            for folder in batch["folder"]:
                yield pd.DataFrame({"path": [path for path, _ in target.walk(folder)]}, dtype=object)

    from petseg.session import default_parallelism

    tasks = min(len(folders), 4 * (default_parallelism(spark) or 2))
    listed = (
        _strings_frame(spark, "folder", folders)
        .repartition(tasks)
        .mapInPandas(list_folders, "path string")
    )
    return listed.unionByName(_strings_frame(spark, "path", [path for path, _ in target.walk(recursive=False)]))


def _strings_frame(spark: SparkSession, column: str, values: list[str]) -> DataFrame:
    """``values`` as a one-column DataFrame, converted on the driver through Arrow.

    Without Arrow (Spark 3.5's default), ``createDataFrame`` pickles the rows and a Python worker
    unpickles them again in every Spark job over the frame (a listing's count, then the shuffle into
    the tasks that read the files): 0.4-0.9 CPU-s of a second Python daemon on 4,000 paths, and the
    pickled rows in the driver's JVM. Through Arrow the rows become a local relation. Spark Connect
    always converts through Arrow, and a server may refuse the conf.
    """
    from petseg.session import is_connect, session_confs

    confs = {} if is_connect(spark) else {ARROW_PYSPARK_CONF: "true"}
    with session_confs(spark, confs):
        return spark.createDataFrame(pd.DataFrame({column: values}, dtype=object), f"{column} string")


@contextlib.contextmanager
def driver_table(spark: SparkSession, table: "pa.Table", *, partitions: int) -> Iterator[DataFrame]:
    """A table built on the driver (a listing, its pairing) as a DataFrame of ``partitions`` tasks,
    whose rows reach the executors in a file rather than inside the tasks; the file is removed on exit.

    ``spark.createDataFrame`` of local rows puts them in the tasks themselves (a ParallelCollection):
    each task, and the driver's memory while it schedules them, then grows with the listing, past
    Spark's recommended 1,000 KiB a task at ~40,000 paths. Here the table is written as one Parquet
    file with a row group per task, given to every node with ``SparkContext.addFile`` (fetched once
    per executor from the driver's file server), and each task reads only its own row group.
    """
    import pyarrow.parquet as pq
    from pyspark import SparkFiles

    folder = tempfile.mkdtemp(prefix="petseg-handover-")
    name = f"petseg-rows-{uuid.uuid4().hex}.parquet"  # addFile refuses a second file of the same name
    local = os.path.join(folder, name)
    partitions = max(1, min(partitions, table.num_rows))
    pq.write_table(table, local, row_group_size=max(1, math.ceil(table.num_rows / partitions)))
    groups = pq.ParquetFile(local).num_row_groups
    schema = _spark_schema(table.schema)

    def read_groups(batches: Iterator["pa.RecordBatch"]) -> Iterator["pa.RecordBatch"]:
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(SparkFiles.get(name))
        for batch in batches:
            for group in batch.column(0).to_pylist():
                yield from rows.read_row_group(group).to_batches()

    try:
        spark.sparkContext.addFile(local)
        yield spark.range(groups, numPartitions=max(1, groups)).mapInArrow(read_groups, schema)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _spark_schema(schema: "pa.Schema") -> "StructType":
    """Spark's type for each string, integer and binary column of an Arrow schema."""
    import pyarrow as pa
    from pyspark.sql.types import BinaryType, IntegerType, LongType, StringType, StructField, StructType

    types = {pa.string(): StringType(), pa.int32(): IntegerType(), pa.int64(): LongType(), pa.binary(): BinaryType()}
    unknown = [f"{f.name}: {f.type}" for f in schema if f.type not in types]
    if unknown:
        raise TypeError(f"columns {unknown} have no Spark type here; use string, int32, int64 or binary columns")
    return StructType([StructField(f.name, types[f.type], f.nullable) for f in schema])


def _hidden(part: str) -> bool:
    # Spark's rule: _x and .x are hidden, but not a partition folder such as _c=1.
    return part.startswith((".", "_")) and "=" not in part


class _ListTarget(NamedTuple):
    """A URL to list, split at its first glob component: the folder to list and the patterns (a
    list of path components each, braces expanded) that relative paths under it must match."""

    parts: urls.Url
    base_path: str
    patterns: tuple[tuple[str, ...], ...]
    globbed: bool

    @classmethod
    def of(cls, url: str) -> "_ListTarget":
        parts = urls.split_url(url)
        components = parts.path.split("/")
        first_glob = next((i for i, part in enumerate(components) if is_glob(part)), None)
        if first_glob is None:
            return cls(parts, parts.path, ((),), False)
        patterns = tuple(tuple(p.split("/")) for p in _expand_braces("/".join(components[first_glob:])))
        return cls(parts, "/".join(components[:first_glob]), patterns, True)

    def url(self, path: str) -> str:
        return self.parts.with_path(path)

    def kind(self) -> str:
        """file, folder or missing: what the base path is."""
        from pyarrow import fs as pafs

        fs, base = urls.arrow_filesystem(self.url(self.base_path))
        kind = fs.get_file_info(base).type
        return "file" if kind == pafs.FileType.File else "folder" if kind == pafs.FileType.Directory else "missing"

    def files(self, kind: str) -> list[tuple[str, int]]:
        """(URL, bytes) of every matching file, listed here, given what the base is (:meth:`kind`)."""
        if kind == "file":
            if self.globbed:
                return []
            fs, base = urls.arrow_filesystem(self.url(self.base_path))
            return [(self.url(self.base_path), fs.get_file_info(base).size)]
        return self.walk() if kind == "folder" else []

    def matches(self, relative: list[str]) -> bool:
        if any(_hidden(part) for part in relative):
            return False
        return any(len(relative) >= len(p) and all(fnmatchcase(r, q) for r, q in zip(relative, p))
                   for p in self.patterns)

    def folders(self) -> list[str]:
        """The base's visible subfolders that a pattern's first component matches (names only)."""
        from pyarrow import fs as pafs

        fs, base = urls.arrow_filesystem(self.url(self.base_path))
        names = [e.base_name for e in fs.get_file_info(pafs.FileSelector(base)) if e.type == pafs.FileType.Directory]
        return sorted(n for n in names if not _hidden(n) and any(not p or fnmatchcase(n, p[0]) for p in self.patterns))

    def walk(self, folder: str = "", *, recursive: bool = True) -> list[tuple[str, int]]:
        """(URL, bytes) of the matching files under the base, or under its subfolder ``folder``."""
        from pyarrow import fs as pafs

        fs, base = urls.arrow_filesystem(self.url(self.base_path))
        base = base.rstrip("/")
        found = []
        selector = pafs.FileSelector(f"{base}/{folder}" if folder else base, recursive=recursive)
        for entry in fs.get_file_info(selector):
            if entry.type != pafs.FileType.File:
                continue
            relative = entry.path[len(base) + 1:].split("/")
            if self.matches(relative):
                found.append((self.url(f"{self.base_path.rstrip('/')}/{'/'.join(relative)}"), entry.size))
        return found


def is_glob(path: str) -> bool:
    """Whether a path holds Hadoop glob characters."""
    return any(c in path for c in "*?[{")


def _expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [expanded for option in match.group(1).split(",") for expanded in _expand_braces(head + option + tail)]


def read_file(url: str) -> bytes:
    """The bytes of one file, on an executor.

    Local paths (including Databricks' /dbfs and /Volumes mounts) are opened directly; other
    schemes through :func:`petseg.io.urls.arrow_filesystem`.

    Raises
    ------
    RejectedInput
        ``file_unreadable``, naming the file and the operating system's reason.
    """
    try:
        if urls.is_local(url):
            with open(urls.local_path(url), "rb") as handle:
                return handle.read()
        fs, path = urls.arrow_filesystem(url)
        with fs.open_input_stream(path) as stream:
            return stream.readall()
    except (OSError, ValueError) as exc:
        raise RejectedInput("file_unreadable", f"{url}: {exc}") from None
