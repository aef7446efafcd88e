"""Stage 3 building block: the batched Spark UDF that segments a column of encoded images."""

from __future__ import annotations

from typing import Iterator

import cv2
import numpy as np
import pandas as pd
from pyspark.sql import Column
from pyspark.sql.functions import pandas_udf
from pyspark.sql.types import BinaryType, DoubleType, StringType, StructField, StructType

from petseg.images import CLASSES

#: What the UDF returns per row: masks as PNG (original and model resolution), class fractions, error.
SEGMENTATION_SCHEMA = StructType(
    [
        StructField("mask_png", BinaryType(), True),
        StructField("mask_model_png", BinaryType(), True),
        *[StructField(f"fraction_{name}", DoubleType(), True) for name in CLASSES],
        StructField("error", StringType(), True),
    ]
)


def _png(mask: np.ndarray | None) -> bytes | None:
    if mask is None:
        return None
    ok, buf = cv2.imencode(".png", mask)
    return buf.tobytes() if ok else None


def segment_udf(model_uri: str, *, batch_size: int = 32, model_resolution: bool = False):
    """A pandas UDF (Iterator of Series -> Iterator of DataFrame) segmenting a binary image column.

    The model loads once per Python worker (:func:`petseg.inference.load_model`); each Arrow batch
    (``spark.sql.execution.arrow.maxRecordsPerBatch`` rows) is predicted ``batch_size`` images at a
    time. Bad images give a null mask and a message in ``error``; the batch goes on.
    """

    @pandas_udf(SEGMENTATION_SCHEMA)  # type: ignore[call-overload]
    def segment(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        from petseg.inference import load_model, segment_images

        loaded = load_model(model_uri)
        for series in batches:
            segs = segment_images(loaded, series.tolist(), batch_size=batch_size)
            columns: dict[str, list] = {
                "mask_png": [_png(s.mask) for s in segs],
                "mask_model_png": [_png(s.mask_model) if model_resolution else None for s in segs],
            }
            for k, name in enumerate(CLASSES):
                columns[f"fraction_{name}"] = [None if s.fractions is None else s.fractions[k] for s in segs]
            columns["error"] = [s.error for s in segs]
            yield pd.DataFrame(columns)

    return segment


def segment_column(column: Column | str, model_uri: str, *, batch_size: int = 32, model_resolution: bool = False) -> Column:
    """``segment_udf(...)(column)``: a struct column of :data:`SEGMENTATION_SCHEMA`."""
    return segment_udf(model_uri, batch_size=batch_size, model_resolution=model_resolution)(column)
