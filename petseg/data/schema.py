"""The Petastorm schema of a petseg dataset, and the Spark schema of its rejects table.

petastorm is imported only by :func:`pet_schema`: the split names and the rejects schema are needed
where petastorm is not (inference and evaluation on executors, Spark 4 environments).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from pyspark.sql.types import IntegerType, StringType, StructField, StructType

if TYPE_CHECKING:
    from petastorm.unischema import Unischema

#: The partition column: every split's row groups live in their own folder (split=train, split=test),
#: so a worker that reads one split never receives a row group of another.
SPLIT = "split"
SPLITS = ("train", "test")


def ignore_petastorm_pyarrow_deprecations() -> None:
    """Keep petastorm's calls into pyarrow's deprecated API from printing FutureWarnings.

    petastorm 0.13.1 still uses pyarrow's legacy ParquetDataset and ``pyarrow.localfs``, deprecated
    but working on the pinned pyarrow 14 (uber/petastorm#800, uber/petastorm#805): a screenful of
    warnings each time a dataset is written or a reader opened. Only warnings attributed to petastorm's
    own modules are ignored, so pyarrow's warnings about petseg's code still show.
    """
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm(\.|$)")


REJECTS_SCHEMA = StructType(
    [
        StructField("id", StringType(), True),
        StructField("split", StringType(), True),
        StructField("path", StringType(), True),
        StructField("reason", StringType(), False),
        StructField("detail", StringType(), True),
    ]
)


def pet_schema(*, image_size: int, image_codec: str = "raw") -> Unischema:
    """The Unischema of an ingested dataset at ``image_size`` x ``image_size``.

    Masks always use the raw ndarray codec: labels must stay exact, and runs of equal labels
    compress to about 1 KB a row under Parquet's own compression.
    """
    import numpy as np
    from petastorm.codecs import CompressedImageCodec, NdarrayCodec, ScalarCodec
    from petastorm.unischema import Unischema, UnischemaField

    image_codecs = {
        "raw": NdarrayCodec,
        # q95: visually lossless on pet photos; the source JPEGs are already compressed.
        "jpeg": lambda: CompressedImageCodec("jpeg", quality=95),
        "png": lambda: CompressedImageCodec("png"),
    }
    if image_codec not in image_codecs:
        raise ValueError(f"image_codec={image_codec!r} is not supported; use one of {', '.join(image_codecs)}")
    return Unischema(
        "PetSegExample",
        [
            UnischemaField("id", np.str_, (), ScalarCodec(StringType()), False),
            UnischemaField(SPLIT, np.str_, (), ScalarCodec(StringType()), False),
            UnischemaField("image", np.uint8, (image_size, image_size, 3), image_codecs[image_codec](), False),
            UnischemaField("mask", np.uint8, (image_size, image_size), NdarrayCodec(), False),
            UnischemaField("height", np.int32, (), ScalarCodec(IntegerType()), False),
            UnischemaField("width", np.int32, (), ScalarCodec(IntegerType()), False),
            UnischemaField("source_path", np.str_, (), ScalarCodec(StringType()), False),
        ],
    )
