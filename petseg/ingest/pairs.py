"""What every ingest source yields: one DataFrame of encoded image/trimap pairs (:data:`PAIRS_SCHEMA`).

A row either carries both encoded files or a ``reason`` saying why it cannot (a trimap with no
image, an image in no split list, ...). Decoding happens once, later, in
:mod:`petseg.ingest.convert`, the same way for every source (oxford, tfds, synthetic).
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
    ]
)

