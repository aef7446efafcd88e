"""Pixels from files: decoding, validating and resizing pet images and trimaps.

These are the only pixel operations petseg performs on raw files: ingest, and later inference,
call them so that training and serving see pixels prepared the same way.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from petseg.errors import RejectedInput

#: Class names in label order. Oxford-IIIT trimaps store 1 = pet, 2 = background, 3 = border;
#: petseg stores label = trimap - 1, as the reference notebook does.
CLASSES: tuple[str, ...] = ("pet", "background", "border")
TRIMAP_VALUES = frozenset({1, 2, 3})


@dataclass(frozen=True)
class Example:
    """One prepared example: model-resolution pixels plus the original size."""

    image: np.ndarray  # uint8 (size, size, 3), RGB
    mask: np.ndarray  # uint8 (size, size), labels 0..len(CLASSES)-1
    height: int
    width: int


#: The default of ``data.max_image_pixels``: the largest image (width x height) any stage decodes. It
#: admits 48- and 61-megapixel camera photos; a PNG decodes in full at ~6 bytes a pixel at its peak
#: (measured: 274 MB for 48 MP from a 148 KB file), ~380 MB here, in each Python worker, one per core.
#: JPEGs decode at reduced scale and cost far less. Pillow's own guard refuses anything over
#: twice its ``Image.MAX_IMAGE_PIXELS`` (179 MP) in any case.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000

#: How ``np.save`` output starts: petseg's raw codec (Petastorm's NdarrayCodec) stores images so.
NPY_MAGIC = b"\x93NUMPY"


def _open(data: bytes | None, what: str, *, max_pixels: int) -> Image.Image:
    """The image behind ``data``, its header read but no pixels decoded yet, checked against ``max_pixels``."""
    if data is None or len(data) == 0:
        raise RejectedInput(f"{what}_empty", f"the {what} file is empty (0 bytes)")
    if bytes(data[:6]) == NPY_MAGIC:
        img = _open_array(data, what)
    else:
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            # A plain Exception, not an OSError: Pillow's own guard, from the header, at twice its limit.
            raise RejectedInput(
                f"{what}_too_large", f"{exc}; over data.max_image_pixels={max_pixels} too: shrink the {what}"
            ) from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise RejectedInput(f"{what}_undecodable", f"the {what} bytes are not a known image format: {exc}")
    width, height = img.size  # from the header: a decompression bomb is refused before it is inflated
    if width * height > max_pixels:
        raise RejectedInput(
            f"{what}_too_large",
            f"the {what} is {width}x{height} = {width * height} pixels, over data.max_image_pixels={max_pixels}; "
            f"shrink the {what}, or raise data.max_image_pixels if the executors have the memory",
        )
    return img


def _open_array(data: bytes, what: str) -> Image.Image:
    """A uint8 (H, W) or (H, W, 3) array saved with ``np.save``, as an image, so that a dataset written
    with the raw codec goes through the same conversions as an encoded file."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise RejectedInput(f"{what}_undecodable", f"the {what} bytes are a truncated or corrupt .npy array: {exc}")
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)) or arr.size == 0:
        raise RejectedInput(
            f"{what}_undecodable", f"the {what} array has dtype {arr.dtype} and shape {arr.shape}; expected uint8 (H, W, 3)"
        )
    return Image.fromarray(arr)


def _to_rgb(img: Image.Image, *, min_side: int | None) -> np.ndarray:
    try:
        if min_side is not None and img.format == "JPEG":
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale in the DCT domain (a box filter), keeping both
            # sides >= min_side: several times faster for a 128-pixel model, and the caller still
            # resizes to the exact size with a smooth filter.
            img.draft("RGB", (min_side, min_side))
        if img.mode != "RGB":
            # RGBA/LA: drop alpha; P/L/CMYK/I;16: convert. GIFs decode their first frame.
            img = img.convert("RGB")
        arr = np.asarray(img)
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt payload behind a valid header
        raise RejectedInput("image_undecodable", f"the image could not be decoded: {exc}")
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise RejectedInput("image_undecodable", f"decoded image has shape {arr.shape}, expected (H, W, 3)")
    return arr


def decode_rgb(
    data: bytes | None, *, min_side: int | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Decode image bytes by their content (not their file name) into an RGB uint8 array.

    The Oxford-IIIT release has ``.jpg`` files that are really GIF or PNG, and grayscale, RGBA and
    CMYK images; Pillow sniffs the format and ``convert("RGB")`` normalises all of them.

    Parameters
    ----------
    data
        The encoded file.
    min_side
        When given, a JPEG may be decoded at a reduced scale that keeps both sides at least this long.
    max_pixels
        Refuse larger images (width x height, read from the header) before decoding them.

    Raises
    ------
    RejectedInput
        ``image_empty``, ``image_undecodable`` or ``image_too_large``.
    """
    return _to_rgb(_open(data, "image", max_pixels=max_pixels), min_side=min_side)


def decode_for_model(
    data: bytes | None, *, size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode by content and resize to ``size`` x ``size`` as ingest does; also return (height, width).

    The original size comes from the header, so a reduced-scale JPEG decode does not change it.
    Images over ``max_pixels`` are refused (``image_too_large``) before decoding.
    """
    img = _open(data, "image", max_pixels=max_pixels)
    width, height = img.size
    return resize_image(_to_rgb(img, min_side=size), size), (height, width)


def decode_trimap(data: bytes | None, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an Oxford-IIIT trimap PNG into a (H, W) uint8 array of its stored values.

    Raises
    ------
    RejectedInput
        ``mask_empty``, ``mask_undecodable``, ``mask_too_large`` or ``mask_not_single_channel``.
    """
    img = _open(data, "mask", max_pixels=max_pixels)
    try:
        arr = np.asarray(img)  # L and P modes give the stored values (P: the palette indices)
    except (OSError, ValueError, SyntaxError) as exc:
        raise RejectedInput("mask_undecodable", f"the mask could not be decoded: {exc}")
    if arr.ndim == 3:
        # An RGB(A) trimap is usable only if it is gray, i.e. every colour channel holds the label.
        if not (arr[..., :3] == arr[..., :1]).all():
            raise RejectedInput(
                "mask_not_single_channel",
                f"the mask has {arr.shape[2]} channels with different values; save trimaps as 8-bit grayscale",
            )
        arr = arr[..., 0]
    if arr.dtype != np.uint8 and arr.size and (arr.min() < 0 or arr.max() > 255):
        # Checked before the cast to uint8, which would wrap 258 round to a valid-looking 2.
        raise RejectedInput(
            "mask_values_out_of_range",
            f"the mask is {arr.dtype} and holds values from {arr.min()} to {arr.max()}; Oxford-IIIT trimaps use "
            "only 1 (pet), 2 (background), 3 (border)",
        )
    return np.ascontiguousarray(arr, dtype=np.uint8)


def decode_label_mask(data: bytes | None, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """A stored label mask (petseg's raw codec: ``np.save`` of uint8 (H, W)) or a label PNG, as (H, W).

    Raises
    ------
    RejectedInput
        ``mask_empty``, ``mask_undecodable`` or ``mask_too_large``.
    """
    try:
        arr = np.asarray(_open(data, "mask", max_pixels=max_pixels))
    except (OSError, ValueError, SyntaxError) as exc:  # a truncated payload behind a valid header
        raise RejectedInput("mask_undecodable", f"the mask could not be decoded: {exc}")
    if arr.ndim != 2:
        raise RejectedInput("mask_undecodable", f"a label mask must be 2-D (H, W); got shape {arr.shape}")
    return arr


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an RGB image to ``size`` x ``size`` with a smooth filter.

    Area averaging when shrinking (no aliasing), bilinear when enlarging.
    """
    h, w = image.shape[:2]
    interpolation = cv2.INTER_AREA if (h >= size and w >= size) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a label mask with NEAREST, the only filter that does not invent labels between classes.

    ``size`` is a square side or a ``(height, width)`` pair.
    """
    height, width = (size, size) if isinstance(size, int) else size
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def prepare_example(
    image_bytes: bytes | None, mask_bytes: bytes | None, *, size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> Example:
    """Turn an encoded image and its Oxford-IIIT trimap into a model-resolution :class:`Example`.

    Raises
    ------
    RejectedInput
        With a reason code when the pair cannot be used: empty, undecodable or too large (over
        ``max_pixels``) image or mask, mask size different from the image, or mask values outside 1..3.
    """
    img = _open(image_bytes, "image", max_pixels=max_pixels)
    mask = decode_trimap(mask_bytes, max_pixels=max_pixels)
    width, height = img.size  # from the header: the original size, before any reduced-scale decode
    if (height, width) != mask.shape:
        raise RejectedInput(
            "size_mismatch",
            f"image is {width}x{height} but its mask is {mask.shape[1]}x{mask.shape[0]} (width x height)",
        )
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))  # a histogram: no sort, unlike np.unique
    bad = sorted(set(present.tolist()) - TRIMAP_VALUES)
    if bad:
        raise RejectedInput(
            "mask_values_out_of_range",
            f"mask holds values {bad}; Oxford-IIIT trimaps use only 1 (pet), 2 (background), 3 (border)",
        )
    return Example(
        image=resize_image(_to_rgb(img, min_side=size), size),
        mask=resize_mask(mask - 1, size),
        height=int(height),
        width=int(width),
    )
