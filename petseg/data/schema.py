"""The fields of a petseg dataset, their encodings, and the Spark schema of its rejects table.

A dataset is a Petastorm dataset: Parquet files whose image and mask columns hold values encoded as
Petastorm's codecs encode them. :data:`pet_fields` is the one description of its fields;
:func:`encode_value` encodes a value byte for byte as petastorm 0.13.1 does, without importing it,
so every stack writes the same files. petastorm is imported only by :func:`pet_schema`, which builds
its Unischema where petastorm itself writes the metadata.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

from pyspark.sql.types import IntegerType, StringType, StructField, StructType

if TYPE_CHECKING:
    from petastorm.unischema import Unischema

#: The partition column: every split's row groups live in their own folder (split=train, split=test),
#: so a worker that reads one split never receives a row group of another.
SPLIT = "split"
SPLITS = ("train", "test")

#: The name the Unischema carries; petastorm shows it, nothing reads it.
SCHEMA_NAME = "PetSegExample"

#: data.image_codec -> the codec of the image field. Masks are always ``ndarray``: labels must stay
#: exact, and runs of equal labels compress to about 1 KB a row under Parquet's own compression.
IMAGE_CODECS = {"raw": "ndarray", "jpeg": "jpeg", "png": "png"}

#: q95: visually lossless on pet photos; the source JPEGs are already compressed.
JPEG_QUALITY = 95


class Field(NamedTuple):
    """One field of a dataset, as its Unischema describes it.

    ``dtype`` is the numpy scalar type's name (``uint8``, ``int32``, ``str_``); ``codec`` is
    ``scalar`` (a plain Parquet value), ``ndarray`` (``np.save``'s bytes), ``jpeg`` or ``png``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    codec: str
    nullable: bool = False


def pet_fields(*, image_size: int, image_codec: str = "raw") -> tuple[Field, ...]:
    """The fields of a dataset of ``image_size`` x ``image_size`` images, in the order they are written."""
    if image_codec not in IMAGE_CODECS:
        raise ValueError(f"image_codec={image_codec!r} is not supported; use one of {', '.join(IMAGE_CODECS)}")
    return (
        Field("id", "str_", (), "scalar"),
        Field(SPLIT, "str_", (), "scalar"),
        Field("image", "uint8", (image_size, image_size, 3), IMAGE_CODECS[image_codec]),
        Field("mask", "uint8", (image_size, image_size), "ndarray"),
        Field("height", "int32", (), "scalar"),
        Field("width", "int32", (), "scalar"),
        Field("source_path", "str_", (), "scalar"),
    )


def encode_value(field: Field, value: Any) -> bytes:
    """``value`` (a numpy array of the field's dtype and shape) as the field's codec stores it.

    The bytes petastorm 0.13.1's ``NdarrayCodec`` and ``CompressedImageCodec`` write: ``np.save``'s
    output, or OpenCV's JPEG (quality :data:`JPEG_QUALITY`) or PNG of the RGB image turned BGR.
    """
    import io

    import numpy as np

    if value.dtype != np.dtype(field.dtype) or tuple(value.shape) != field.shape:
        raise ValueError(f"{field.name}: a {value.dtype} array of shape {value.shape} where the dataset stores "
                         f"{field.dtype} {field.shape}")
    if field.codec == "ndarray":
        buffer = io.BytesIO()
        np.save(buffer, value)
        return buffer.getvalue()
    if field.codec in ("jpeg", "png"):
        import cv2

        pixels = value[:, :, ::-1] if value.ndim == 3 else value
        ok, encoded = cv2.imencode(f".{field.codec}", np.ascontiguousarray(pixels),
                                   [int(cv2.IMWRITE_JPEG_QUALITY), JPEG_QUALITY])
        if not ok:
            raise ValueError(f"{field.name}: OpenCV could not encode a {value.shape} array as {field.codec}")
        return encoded.tobytes()
    raise ValueError(f"{field.name}: the {field.codec!r} codec stores plain values, not arrays")


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
    """petastorm's Unischema of :func:`pet_fields`, for petastorm's own ``materialize_dataset``."""
    import numpy as np
    from petastorm.codecs import CompressedImageCodec, NdarrayCodec, ScalarCodec
    from petastorm.unischema import Unischema, UnischemaField

    spark_types = {"str_": StringType, "int32": IntegerType}
    codecs = {
        "ndarray": NdarrayCodec,
        "jpeg": lambda: CompressedImageCodec("jpeg", quality=JPEG_QUALITY),
        "png": lambda: CompressedImageCodec("png"),
    }
    return Unischema(
        SCHEMA_NAME,
        [
            UnischemaField(f.name, getattr(np, f.dtype), f.shape,
                           ScalarCodec(spark_types[f.dtype]()) if f.codec == "scalar" else codecs[f.codec](), f.nullable)
            for f in pet_fields(image_size=image_size, image_codec=image_codec)
        ],
    )
