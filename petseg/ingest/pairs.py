"""What every ingest source yields: one DataFrame of encoded image/trimap pairs (:data:`PAIRS_SCHEMA`).

A row either carries both encoded files or a ``reason`` saying why it cannot (a trimap with no
image, an image in no split list, ...). Decoding happens once, later, in
:mod:`petseg.ingest.convert`, the same way for every source (oxford, tfds, synthetic).

A source whose files are on storage may leave ``image`` and ``mask`` null and name the files in
``path`` and ``mask_path`` instead: the decode task reads them itself. Bytes that travel from a
JVM file scan to Python through Arrow cost the JVM about as much CPU as the decoding costs Python
(measured on 500x375 JPEGs: 1.2 against 3.7 CPU-seconds per 2,000 images, 0.4 when the task
reads the files), and a file that cannot be read becomes a reject rather than a failed job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pyspark.sql.types import BinaryType, StringType, StructField, StructType

PAIRS_SCHEMA = StructType(
    [
        StructField("id", StringType(), True),
        StructField("split", StringType(), True),
        StructField("path", StringType(), True),
        StructField("image", BinaryType(), True),
        StructField("mask", BinaryType(), True),
        StructField("reason", StringType(), True),
        StructField("detail", StringType(), True),
        StructField("mask_path", StringType(), True),
    ]
)



@dataclass(frozen=True, kw_only=True)
class DecodeTasks:
    """How many decode tasks an input gets: sized by its volume, so that what a task reads, holds,
    persists and shuffles stays bounded however many photos there are.

    Attributes
    ----------
    fixed
        ``data.partitions``: exactly this many tasks, whatever the volume; None sizes by volume.
    max_files
        ``data.max_files_per_task``: at most this many files (pairs) a task.
    max_bytes
        ``data.max_mb_per_task`` in bytes: at most this many bytes of input files, and of decoded
        examples, a task.
    example_bytes
        One decoded example's bytes at most (raw image and mask at the model's size).
    min_tasks
        At least this many (twice the cluster's default parallelism), however small the input.
    """

    fixed: int | None
    max_files: int
    max_bytes: int
    example_bytes: int
    min_tasks: int

    def tasks(self, *, files: int, input_bytes: int = 0) -> int:
        """Tasks for ``files`` pairs of ``input_bytes`` (0 where the files are made, not read)."""
        if self.fixed:
            return self.fixed
        by_volume = max(
            math.ceil(files / self.max_files),
            math.ceil(input_bytes / self.max_bytes),
            math.ceil(files * self.example_bytes / self.max_bytes),
        )
        return max(1, min(max(self.min_tasks, by_volume), files))


def example_bytes(image_size: int) -> int:
    """A decoded example's bytes at most: an RGB image and a one-channel mask of ``image_size``
    squared, stored raw (a PNG-coded dataset's are smaller)."""
    return image_size * image_size * (3 + 1)
