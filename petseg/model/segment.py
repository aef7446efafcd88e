"""Segmenting encoded images with a loaded model: decode, predict, masks back at each image's size.

Two ways in, with the same decoding (:mod:`petseg.data.decode`) and preprocessing
(:mod:`petseg.model.preprocessing`) as training, driven by the model's artifact
(:mod:`petseg.model.artifact`); a bad image gets an error, not a mask, and the rest go on:

* :func:`segment_images`: a list of encoded images to masks as arrays, for local use and tests;
* :func:`segment_stream`: the inference UDF's pipeline. Batches of rows (bytes or file URLs) to
  PNG-encoded masks, with reading and decoding of the next batches on threads while the model
  predicts, and each full-size mask encoded and dropped as soon as it is made.

The output's columns are defined once, in :data:`OUTPUT_COLUMNS`: the inference UDF's Spark schema,
the pandas frame the UDF and the MLflow model return (:func:`results_frame`) and the MLflow model's
signature are derived from it.
"""

from __future__ import annotations

import struct
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
import pandas as pd

from petseg.data.decode import CLASSES, DEFAULT_MAX_IMAGE_PIXELS, decode_for_model, resize_mask
from petseg.errors import RejectedInput
from petseg.io.fs import read_file
from petseg.model.artifact import LoadedModel

#: Arrow batches read and decoded ahead of the one the model predicts. One keeps the model busy when
#: decoding a batch takes no longer than predicting it; each holds a batch of model-size images
#: (256 x 128 x 128 x 3 bytes = 12 MB).
PREFETCH_BATCHES = 1
#: The reasons a row can fail with (the ``<reason>`` of its ``error``): counted per streaming micro-batch.
ERROR_REASONS = ("file_unreadable", "image_empty", "image_undecodable", "image_too_large", "size_invalid",
                 "mask_unencodable")


@dataclass(frozen=True)
class Segmentation:
    mask: np.ndarray | None  # (H, W) labels at the original resolution
    mask_model: np.ndarray | None  # (S, S) labels at the model's resolution
    fractions: tuple[float, ...] | None
    error: str | None

    @classmethod
    def rejected(cls, exc: RejectedInput) -> "Segmentation":
        """No mask; the error column reads ``<reason>: <detail>``."""
        return cls(None, None, None, str(exc))


@dataclass(frozen=True, kw_only=True)
class EncodedSegmentation:
    """One row of the inference output: PNG masks, the mask's size and class fractions, or an error.

    Its fields are the :attr:`OutputColumn.field` of :data:`OUTPUT_COLUMNS`, in their order; keyword-only,
    so that a field added to the contract cannot shift the values of the others.
    """

    mask_png: bytes | None
    mask_model_png: bytes | None
    height: int | None
    width: int | None
    fractions: tuple[float, ...] | None
    error: str | None

    @classmethod
    def rejected(cls, exc: RejectedInput) -> "EncodedSegmentation":
        """No mask: every field null but ``error``, which reads ``<reason>: <detail>``."""
        return cls(**{**dict.fromkeys(f.name for f in fields(cls)), "error": str(exc)})


@dataclass(frozen=True, kw_only=True)
class OutputColumn:
    """One column of the inference output, as the Spark schema, pandas and the MLflow signature spell it.

    Attributes
    ----------
    name
        The column's name.
    type
        Its type, by MLflow's name for it (``binary``, ``integer``, ``double``, ``string``), from which
        the Spark type (:data:`petseg.infer.job.SPARK_TYPES`) and the pandas dtype
        (:data:`PANDAS_DTYPES`) follow.
    meaning
        What it holds.
    field
        The :class:`EncodedSegmentation` field its values come from.
    index
        For a column per class, the class's position in that field's tuple; None for a scalar field.
    nullable
        Whether a row may hold null.
    """

    name: str
    type: str
    meaning: str
    field: str
    index: int | None = None
    nullable: bool = True

    def values(self, results: Sequence[EncodedSegmentation]) -> list[object]:
        """This column's value in each of ``results``: null where its field is (a rejected row's fractions)."""
        values = [getattr(r, self.field) for r in results]
        if self.index is None:
            return values
        return [None if v is None else v[self.index] for v in values]


#: The column a row's failure goes to: ``<reason>: <detail>``, null for a segmented row.
ERROR_COLUMN = "error"

#: The inference output's columns, in order: the contract the inference job's output, the UDF's
#: struct and the MLflow model's frame share. Add a column here (and its field to
#: :class:`EncodedSegmentation`); the Spark schema, the pandas frame and the MLflow signature follow.
#: Every column is nullable: a bad row has only its error, a good one no error.
OUTPUT_COLUMNS: tuple[OutputColumn, ...] = (
    OutputColumn(name="mask_png", type="binary", field="mask_png",
                 meaning="the labels as an 8-bit PNG at the image's original size (or the row's height, width)"),
    OutputColumn(name="mask_model_png", type="binary", field="mask_model_png",
                 meaning="the labels as an 8-bit PNG at the model's resolution, when asked for"),
    OutputColumn(name="height", type="integer", field="height", meaning="the mask's height"),
    OutputColumn(name="width", type="integer", field="width", meaning="the mask's width"),
    *(OutputColumn(name=f"fraction_{name}", type="double", field="fractions", index=k,
                   meaning=f"the share of the mask's pixels labelled {name}")
      for k, name in enumerate(CLASSES)),
    OutputColumn(name=ERROR_COLUMN, type="string", field="error",
                 meaning="null, or why the row has no mask: ``<reason>: <detail>``"),
)

#: pandas dtypes for the types pandas would infer wrong from the values: integers with a null among
#: them would become float64 (a height of 375.0), not the integers the Spark schema and the MLflow
#: signature declare. The others keep what pandas infers, which Arrow converts to the declared types.
PANDAS_DTYPES: dict[str, str] = {"integer": "Int32"}


@dataclass(frozen=True)
class ImageRow:
    """One row to segment: encoded bytes (or a file URL to read them from), and the size to return
    the mask at where the bytes are not the original image (a petseg dataset's resized images)."""

    data: bytes | str | None
    size: tuple[int, int] | None = None


def image_rows(data: Iterable, heights: Iterable, widths: Iterable) -> list[ImageRow]:
    """Rows from columns of data and of the (nullable: None, NaN, pandas' NA) size to return masks at,
    as the inference UDF and the MLflow model receive them."""
    return [ImageRow(value, None if pd.isna(h) or pd.isna(w) else (int(h), int(w)))
            for value, h, w in zip(data, heights, widths)]


def results_frame(results: Sequence[EncodedSegmentation]) -> pd.DataFrame:
    """Rows of the inference output as pandas, with the columns of :data:`OUTPUT_COLUMNS` in their order:
    the inference UDF's and the MLflow model's output.

    Parameters
    ----------
    results
        The rows, as :func:`segment_stream` yields them.

    Returns
    -------
    pandas.DataFrame
        One row per result; integer columns as pandas' nullable ``Int32``.
    """
    columns: dict[str, object] = {}
    for column in OUTPUT_COLUMNS:
        values = column.values(results)
        dtype = PANDAS_DTYPES.get(column.type)
        columns[column.name] = values if dtype is None else pd.array(values, dtype=dtype)
    return pd.DataFrame(columns)


#: libpng's default limit on a PNG's width and height (``png_set_user_limits``): OpenCV will not write
#: past it, and most readers refuse such a file, so a larger mask is left to OpenCV to refuse.
PNG_SIDE_LIMIT = 1_000_000
#: The 8-bit greyscale PNG header after the size: bit depth 8, colour type 0 (grey), deflate,
#: filter method 0, no interlace.
_PNG_GREY8 = bytes([8, 0, 0, 0, 0])
#: Bytes of filtered rows compressed at a time: the filtered copy stays ~1 MB whatever the mask's size.
_PNG_BLOCK_BYTES = 1 << 20


def encode_mask(mask: np.ndarray, *, what: str = "mask") -> bytes:
    """``mask`` (uint8 labels) as an 8-bit greyscale PNG.

    Written here, not by ``cv2.imencode``: every row Up-filtered (each byte minus the one above it,
    by numpy) and deflated by zlib at level 1 with the RLE strategy, which suits label masks (long
    runs of a few values). Measured on 500x375 masks (the nearly free model's, synthetic trimaps,
    trimaps through 128x128), interleaved 15-40 times: 0.44-0.48 ms and 1.0-2.0 KB a mask (1.3 KB for
    trimaps), against 0.57-0.63 ms and 2.7-2.8 KB for OpenCV's defaults (level 1, Sub filter, RLE),
    -0.14 to -0.15 ms on a quiet and on a loaded machine; OpenCV's other strategies saved nothing, an
    explicit level cost twice as much, Pillow at level 1 more still. Both decode to the same pixels.

    Raises
    ------
    RejectedInput
        ``mask_unencodable``, for a mask libpng cannot write (a side over its 1,000,000-pixel limit),
        so that its row reports it rather than passing with no mask.
    """
    if mask.dtype == np.uint8 and mask.ndim == 2 and 0 < min(mask.shape) and max(mask.shape) <= PNG_SIDE_LIMIT:
        return _grey8_png(mask)
    try:  # what the writer above does not take: OpenCV's own error for it
        ok, buf = cv2.imencode(".png", mask)
    except cv2.error as exc:  # OpenCV asserts on libpng's failure rather than returning ok=False
        ok, buf = False, str(exc).strip().splitlines()[-1]
    if not ok:
        raise RejectedInput(
            "mask_unencodable", f"the {mask.shape[1]}x{mask.shape[0]} {what} could not be encoded as PNG ({buf})"
        )
    return buf.tobytes()


def _grey8_png(mask: np.ndarray) -> bytes:
    """A 2-D uint8 array as an 8-bit greyscale PNG: Up-filtered rows, deflated at level 1 with Z_RLE."""
    height, width = mask.shape
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    idat = []
    step = max(1, _PNG_BLOCK_BYTES // (width + 1))
    for top in range(0, height, step):
        rows = mask[top:top + step]
        filtered = np.empty((len(rows), width + 1), np.uint8)
        filtered[:, 0] = 2  # the Up filter type, before each row
        if top:
            np.subtract(rows, mask[top - 1:top - 1 + len(rows)], out=filtered[:, 1:])  # modulo 256, as PNG's
        else:
            filtered[0, 1:] = rows[0]  # above the first row are zeros
            np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
        idat.append(deflate.compress(filtered))
    idat.append(deflate.flush())
    return b"".join((
        b"\x89PNG\r\n\x1a\n",
        _png_chunk(b"IHDR", struct.pack(">II", width, height) + _PNG_GREY8),
        _png_chunk(b"IDAT", b"".join(idat)),
        _png_chunk(b"IEND", b""),
    ))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def class_fractions(mask: np.ndarray, n_classes: int) -> tuple[float, ...]:
    """The share of ``mask``'s pixels in each class. One vectorised comparison per class is ~15x
    faster than ``np.bincount`` on a 500x375 mask (0.04 against 0.6 ms), which counts element by element."""
    total = max(1, mask.size)
    return tuple(np.count_nonzero(mask == k) / total for k in range(n_classes))


def _output_size(height: int, width: int) -> tuple[int, int]:
    if height < 1 or width < 1:
        raise RejectedInput("size_invalid", f"the row's height={height} and width={width} must be positive")
    return int(height), int(width)


def _prepare(row: ImageRow, *, size: int, read_files: bool, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The model-size image and the size its mask goes back to; RejectedInput for a bad row."""
    data = read_file(row.data) if read_files and row.data is not None else row.data
    image, shape = decode_for_model(data, size=size, max_pixels=max_pixels)
    return image, (_output_size(*row.size) if row.size is not None else shape)


def segment_images(
    loaded: LoadedModel,
    encoded: Sequence[bytes | None],
    *,
    batch_size: int,
    sizes: Sequence[tuple[int, int] | None] | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[Segmentation]:
    """Segment encoded images; a bad one gets an error instead of a mask, and the rest go on.

    Parameters
    ----------
    encoded
        Image files' bytes (any format Pillow reads) or raw arrays as petseg's raw codec stores them.
    sizes
        (height, width) to return each mask at, where the bytes are not the original image (a
        dataset's resized images keep their original size in columns); None: the decoded size.
    max_pixels
        Images over this many pixels get an ``image_too_large`` error, refused from their header.
    """
    n_classes = len(loaded.classes)
    results: list[Segmentation | None] = [None] * len(encoded)
    ready, shapes, index = [], [], []
    for i, data in enumerate(encoded):
        row = ImageRow(data, None if sizes is None else sizes[i])
        try:
            image, shape = _prepare(row, size=loaded.image_size, read_files=False, max_pixels=max_pixels)
        except RejectedInput as exc:
            results[i] = Segmentation.rejected(exc)
            continue
        ready.append(image)
        shapes.append(shape)
        index.append(i)
    if ready:
        labels = loaded.predict_labels(np.stack(ready), batch_size=batch_size)
        for i, shape, mask_model in zip(index, shapes, labels):
            mask = resize_mask(mask_model, shape)
            results[i] = Segmentation(mask, mask_model, class_fractions(mask, n_classes), None)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def _finish(mask_model: np.ndarray, shape: tuple[int, int], *, n_classes: int, model_resolution: bool) -> EncodedSegmentation:
    """Upsample, count and encode one mask; the full-size array is dropped on return."""
    mask = resize_mask(mask_model, shape)
    try:
        return EncodedSegmentation(
            mask_png=encode_mask(mask),
            mask_model_png=encode_mask(mask_model, what="model-resolution mask") if model_resolution else None,
            height=mask.shape[0],
            width=mask.shape[1],
            fractions=class_fractions(mask, n_classes),
            error=None,
        )
    except RejectedInput as exc:
        return EncodedSegmentation.rejected(exc)


def _prepare_rows(rows: Sequence[ImageRow], **kwargs) -> list[tuple[np.ndarray, tuple[int, int]] | RejectedInput]:
    """:func:`_prepare` for each row, a bad row's rejection in its place."""
    prepared: list[tuple[np.ndarray, tuple[int, int]] | RejectedInput] = []
    for row in rows:
        try:
            prepared.append(_prepare(row, **kwargs))
        except RejectedInput as exc:
            prepared.append(exc)
    return prepared


def _finish_masks(masks: np.ndarray, shapes: Sequence[tuple[int, int]], **kwargs) -> list[EncodedSegmentation]:
    """:func:`_finish` for each mask."""
    return [_finish(mask_model, shape, **kwargs) for mask_model, shape in zip(masks, shapes)]


def _share(rows: int, threads: int) -> int:
    """Rows in each of the pool's work items for ``rows`` rows: one item per thread, not per row, as
    per-row items cost ~0.13 ms a photo in locks and hand-offs on one thread (500x375 photos, 30
    interleaved runs), yet every thread gets a share."""
    return max(1, -(-rows // max(1, threads)))


def segment_stream(
    loaded: LoadedModel,
    batches: Iterable[Sequence[ImageRow]],
    *,
    batch_size: int,
    read_files: bool = False,
    model_resolution: bool = False,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    threads: int = 1,
) -> Iterator[list[EncodedSegmentation]]:
    """Segment batches of rows, yielding each batch's results in order, as PNG-encoded masks.

    Reading and decoding run on ``threads`` threads, :data:`PREFETCH_BATCHES` batch ahead of the
    model, so that the model does not wait on storage or the decoder (on a GPU, the CPU work and the
    model overlap entirely); mask upsampling and PNG encoding run there too. Pillow's decoders,
    OpenCV and TensorFlow release the GIL, so the threads overlap for real.

    Parameters
    ----------
    batches
        Rows to segment; a batch is an Arrow batch of the UDF.
    read_files
        ``ImageRow.data`` holds file URLs to read (:func:`petseg.io.fs.read_file`) rather than bytes.
    threads
        Threads for reading, decoding and encoding (the task's cores, ``spark.task.cpus``).
    """
    size, n_classes = loaded.image_size, len(loaded.classes)
    source = iter(batches)
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="petseg-segment") as pool:
        window: deque[list[Future]] = deque()

        def fill() -> None:
            while len(window) < PREFETCH_BATCHES:
                batch = next(source, None)
                if batch is None:
                    return
                step = min(batch_size, _share(len(batch), threads))
                window.append([
                    pool.submit(_prepare_rows, batch[first:first + step], size=size, read_files=read_files,
                                max_pixels=max_pixels)
                    for first in range(0, len(batch), step)
                ])

        try:
            fill()
            while window:
                prepared = window.popleft()
                fill()  # the next batch reads and decodes while this one is predicted
                results: list[EncodedSegmentation | None] = []
                ready, shapes, index = [], [], []
                for future in prepared:
                    for item in future.result():
                        if isinstance(item, RejectedInput):
                            results.append(EncodedSegmentation.rejected(item))
                            continue
                        index.append(len(results))
                        results.append(None)
                        ready.append(item[0])
                        shapes.append(item[1])
                # Chunked here, not only in predict_labels, so each chunk's masks encode on the pool
                # while the next chunk is predicted.
                finishing = []
                for first in range(0, len(ready), batch_size):
                    labels = loaded.predict_labels(np.stack(ready[first:first + batch_size]), batch_size=batch_size)
                    step = _share(len(labels), threads)
                    for at in range(0, len(labels), step):
                        finishing.append((index[first + at:first + at + step], pool.submit(
                            _finish_masks, labels[at:at + step], shapes[first + at:first + at + step],
                            n_classes=n_classes, model_resolution=model_resolution,
                        )))
                del ready
                for rows, future in finishing:
                    for i, result in zip(rows, future.result()):
                        results[i] = result
                yield results  # type: ignore[misc]
        finally:
            for futures in window:  # the consumer stopped early (a limit, a failed task): drop queued work
                for future in futures:
                    future.cancel()
