"""A picture of a bulk run's result: a few photos with the masks the job wrote laid over them."""

from __future__ import annotations

import cv2
import numpy as np
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from petseg.config import InferConfig, InputFormat
from petseg.data.decode import decode_rgb, resize_mask
from petseg.errors import RejectedInput
from petseg.infer.inputs import ImageTable, source_frame
from petseg.io.fs import read_file, storage_for
from petseg.io.urls import is_table_name

#: The longest side of a photo in the preview: enough to judge a mask, small on the driver.
PREVIEW_SIDE = 320


def preview_url(output: str) -> str:
    """Where the preview of a folder output goes: beside it, as ``<output>_preview.png``."""
    return f"{output.rstrip('/')}_preview.png"


def write_preview(spark: SparkSession, *, infer: InferConfig, table: ImageTable) -> str | None:
    """Lay the masks of the first ``infer.preview_images`` segmented rows of the output over their
    photos and write the grid to :func:`preview_url`; return its URL (None: no row was segmented).

    The rows come from the output as written, so the picture shows what the job wrote. Image files
    are read again by path; for tables the input is filtered to those keys, one more pass over it.
    """
    output = str(infer.output)
    written = spark.table(output) if is_table_name(output) else spark.read.parquet(output)
    key = table.key
    sample = (written.where(F.col("error").isNull()).select(key, "mask_png")
              .limit(infer.preview_images).collect())
    if not sample:
        return None
    keys = [r[key] for r in sample]
    if table.format is InputFormat.images:
        images = {k: read_file(k) for k in keys}
    else:
        # The input as it is: no limit, and no repartition shuffling its images to find a few keys.
        source = source_frame(spark, str(infer.input), table.format)
        picked = source.where(F.col(key).isin(keys)).select(key, F.col(infer.image_column).alias("image"))
        images = {r[key]: r["image"] for r in picked.collect()}
    titles, photos, masks = [], [], []
    for row in sample:
        mask = cv2.imdecode(np.frombuffer(row["mask_png"], np.uint8), cv2.IMREAD_UNCHANGED)
        try:
            photo = decode_rgb(images.get(row[key]), min_side=PREVIEW_SIDE)
        except RejectedInput:
            continue  # changed since the job read it
        factor = min(1.0, PREVIEW_SIDE / max(mask.shape))  # shrink large photos, never enlarge small ones
        size = tuple(max(1, round(side * factor)) for side in mask.shape)
        titles.append(str(row[key]).rsplit("/", 1)[-1])  # a path by its file name
        photos.append(cv2.resize(photo, (size[1], size[0]), interpolation=cv2.INTER_AREA))
        masks.append(resize_mask(mask, size))
    if not titles:
        return None
    from petseg.plots import overlay_png

    url = preview_url(output)
    storage_for(spark).write_bytes(url, overlay_png(titles, photos, masks))
    return url
