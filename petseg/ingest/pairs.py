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

