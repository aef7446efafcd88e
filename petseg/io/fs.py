"""File-system operations on dataset URLs through Spark's Hadoop FileSystem.

Going through the JVM's FileSystem means one code path for file://, hdfs://, s3a://, gs:// and abfss://,
with the credentials the cluster already has configured.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Any, Iterator

from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


class Storage:
    """Hadoop FileSystem operations for one Spark session."""

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
        if not fs.rename(src_path, dst_path):
            raise OSError(f"could not rename {src} to {dst}; check permissions and that {dst} does not exist")

    @contextlib.contextmanager
    def atomic_output(self, url: str) -> Iterator[str]:
        """Yield a temporary sibling URL to write into; on success it replaces ``url``.

        A failed write leaves ``url`` as it was (the old output, or nothing) and removes the
        temporary folder. On HDFS and local disks the final rename is atomic; on object stores
        (s3a, gs) rename is a copy, but readers still never see a half-written new output.
        """
        base = url.rstrip("/")
        token = uuid.uuid4().hex[:12]
        tmp, old = f"{base}.petseg-tmp-{token}", f"{base}.petseg-old-{token}"
        try:
            yield tmp
        except BaseException:
            self.delete(tmp)
            raise
        had_old = self.exists(base)
        if had_old:
            self.rename(base, old)
        try:
            self.rename(tmp, base)
        except BaseException:
            if had_old:
                self.rename(old, base)
            self.delete(tmp)
            raise
        if had_old:
            self.delete(old)
        log.info("wrote %s", base)
