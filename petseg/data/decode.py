"""Pixels from files: decoding, validating and resizing pet images and trimaps.

These are the only pixel operations petseg performs on raw files: ingest, and later inference,
call them so that training and serving see pixels prepared the same way.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

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

#: Formats decoded lazily, after :func:`_open`, so that a reduced-scale decode (``draft``) can still be
#: chosen. Everything else decodes in full whatever the model size, so :func:`_open` decodes it at once.
_DRAFTABLE_FORMATS = frozenset({"JPEG"})

#: EXIF Orientation -> the transposition that shows the stored pixels as viewers do; the table of
#: ``PIL.ImageOps.exif_transpose``, applied here to the pixels only (no metadata to rewrite).
_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
#: The transpositions that swap width and height: a photo taken with the phone held upright.
_SWAPS_SIDES = frozenset({Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                          Image.Transpose.ROTATE_90})

#: Pillow's modes for one channel of more than 8 bits: 16-bit PNG and TIFF greys ("I;16*"), and "I"
#: (32-bit), in which Pillow also holds such samples (older Pillows opened 16-bit PNGs so).
_WIDE_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


@dataclass(frozen=True)
class _Opened:
    """An image whose header is read and checked, and its size as viewers show it."""

    image: Image.Image  # pixels not decoded yet for a JPEG, decoded for anything else
    transpose: Image.Transpose | None  # what the EXIF orientation asks for; None when nothing
    height: int  # after ``transpose``
    width: int


def _out_of_memory(what: str, *, width: int, height: int) -> RejectedInput:
    """The rejection for a ``width`` x ``height`` image or mask whose decoding raised MemoryError."""
    return RejectedInput(
        f"{what}_too_large",
        f"decoding the {width}x{height} {what} ran out of memory; lower data.max_image_pixels below "
        f"{width * height} to refuse such {what}s before decoding, or give the executors more memory",
    )


def _open(data: bytes | None, what: str, *, max_pixels: int) -> _Opened:
    """The image behind ``data``, checked against ``max_pixels`` from its header, with its orientation.

    Raises
    ------
    RejectedInput
        ``<what>_empty``, ``<what>_undecodable`` or ``<what>_too_large``.
    """
    if data is None or len(data) == 0:
        raise RejectedInput(f"{what}_empty", f"the {what} file is empty (0 bytes)")
    if bytes(data[:6]) == NPY_MAGIC:
        img = _open_array(data, what, max_pixels=max_pixels)
    else:
        try:
            img = Image.open(io.BytesIO(data))
        except MemoryError:
            raise RejectedInput(
                f"{what}_too_large",
                f"reading the header of the {len(data)}-byte {what} ran out of memory; check that the file is an "
                f"image, or give the executors more memory",
            ) from None
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
    try:
        if img.format not in _DRAFTABLE_FORMATS:
            # Decoded in full anyway; decoding now also reads metadata stored after the pixels (a PNG's
            # eXIf chunk may follow its IDAT), so that the orientation below is complete.
            img.load()
        transpose = _orientation(img)
    except MemoryError:
        raise _out_of_memory(what, width=width, height=height) from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt payload behind a valid header
        raise RejectedInput(f"{what}_undecodable", f"the {what} could not be decoded: {exc}")
    if transpose in _SWAPS_SIDES:
        width, height = height, width
    return _Opened(img, transpose, height=height, width=width)


def _orientation(img: Image.Image) -> Image.Transpose | None:
    """The transposition ``img``'s EXIF (or XMP) orientation asks for, as ``ImageOps.exif_transpose`` reads it."""
    try:
        return _ORIENTATION_TRANSPOSE.get(img.getexif().get(ExifTags.Base.Orientation, 1))
    except MemoryError:
        raise  # the caller's to report, with the image's size
    except Exception:
        # Malformed EXIF raises whatever its parser hits (struct, key, type, value errors). Viewers show
        # such a photo as stored, and so does petseg: its pixels are fine.
        return None


def _open_array(data: bytes, what: str, *, max_pixels: int) -> Image.Image:
    """A uint8 (H, W) or (H, W, 3) array saved with ``np.save``, as an image, so that a dataset written
    with the raw codec goes through the same conversions as an encoded file.

    The header is checked before anything is allocated: ``np.load`` allocates the shape the header
    claims, which is anything its writer chose (130 bytes can claim 3 TB).
    """
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran_order, dtype = read_header(f)
    except (ValueError, OSError, EOFError) as exc:
        raise RejectedInput(f"{what}_undecodable", f"the {what} bytes are a truncated or corrupt .npy array: {exc}")
    shape = tuple(shape)
    if dtype != np.uint8 or not (len(shape) == 2 or (len(shape) == 3 and shape[2] == 3)) or min(shape) < 1:
        raise RejectedInput(
            f"{what}_undecodable",
            f"the {what} array has dtype {dtype} and shape {shape}; expected uint8 (H, W) or (H, W, 3): re-save it so",
        )
    pixels = shape[0] * shape[1]
    if pixels > max_pixels:
        raise RejectedInput(
            f"{what}_too_large",
            f"the {what} .npy header claims shape {shape} = {pixels} pixels, over data.max_image_pixels={max_pixels}; "
            f"shrink the {what}, or raise data.max_image_pixels if the executors have the memory",
        )
    needed, present = math.prod(shape), len(data) - f.tell()
    if present < needed:
        raise RejectedInput(
            f"{what}_undecodable",
            f"the {what} .npy header claims shape {shape} = {needed} bytes, but only {present} follow it: the file "
            f"is truncated; write the {what} again",
        )
    # A view of ``data``, not a copy: the conversions below copy what they need.
    arr = np.frombuffer(data, np.uint8, count=needed, offset=f.tell())
    arr = arr.reshape(shape, order="F" if fortran_order else "C")
    try:
        return Image.fromarray(arr)
    except MemoryError:
        raise _out_of_memory(what, width=shape[1], height=shape[0]) from None


def _narrow_to_8_bits(img: Image.Image) -> Image.Image:
    """A 16-bit grey image as 8-bit "L", keeping each sample's top 8 bits (libpng's ``strip_16``, and
    what Pillow does with 16-bit RGB): ``convert("RGB")`` would clip every sample over 255 to white."""
    samples = np.asarray(img)
    return Image.fromarray((np.clip(samples, 0, 65535) >> 8).astype(np.uint8))


def _to_rgb(opened: _Opened, *, min_side: int | None) -> np.ndarray:
    img = opened.image
    try:
        if min_side is not None and img.format in _DRAFTABLE_FORMATS:
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale in the DCT domain (a box filter), keeping both
            # sides >= min_side: several times faster for a 128-pixel model, and the caller still
            # resizes to the exact size with a smooth filter. A square target needs no turning first.
            img.draft("RGB", (min_side, min_side))
        if img.mode in _WIDE_GRAY_MODES:
            img = _narrow_to_8_bits(img)
        if opened.transpose is not None:
            img = img.transpose(opened.transpose)
        if img.mode != "RGB":
            # RGBA/LA: drop alpha; P/L/CMYK: convert. GIFs decode their first frame.
            img = img.convert("RGB")
        arr = np.asarray(img)
    except MemoryError:
        raise _out_of_memory("image", width=opened.width, height=opened.height) from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt payload behind a valid header
        raise RejectedInput("image_undecodable", f"the image could not be decoded: {exc}")
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise RejectedInput("image_undecodable", f"decoded image has shape {arr.shape}, expected (H, W, 3)")
    return arr


def _mask_values(opened: _Opened) -> np.ndarray:
    """A mask's stored values, as shown (its own EXIF orientation applied), never rescaled: a mask
    holds labels, so a 16-bit mask's 1, 2, 3 stay 1, 2, 3 (L and P modes: the values, or palette indices)."""
    img = opened.image
    try:
        if opened.transpose is not None:
            img = img.transpose(opened.transpose)
        return np.asarray(img)
    except MemoryError:
        raise _out_of_memory("mask", width=opened.width, height=opened.height) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise RejectedInput("mask_undecodable", f"the mask could not be decoded: {exc}")


def _as_uint8(arr: np.ndarray, *, allowed: str) -> np.ndarray:
    """``arr`` as uint8, refusing values a cast would wrap (258 round to a valid-looking 2)."""
    if arr.dtype != np.uint8 and arr.size and (arr.min() < 0 or arr.max() > 255):
        raise RejectedInput(
            "mask_values_out_of_range",
            f"the mask is {arr.dtype} and holds values from {arr.min()} to {arr.max()}; {allowed}",
        )
    return np.ascontiguousarray(arr, dtype=np.uint8)


def decode_rgb(
    data: bytes | None, *, min_side: int | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Decode image bytes by their content (not their file name) into an RGB uint8 array, as shown.

    The Oxford-IIIT release has ``.jpg`` files that are really GIF or PNG, and grayscale, RGBA and
    CMYK images; Pillow sniffs the format and ``convert("RGB")`` normalises all of them. 16-bit
    greys keep their top 8 bits, and an EXIF orientation is applied, so the pixels are the photo as
    viewers show it (a phone photo tagged "rotate 90" comes out upright).

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
        ``image_empty``, ``image_undecodable`` or ``image_too_large`` (also when decoding runs out of memory).
    """
    return _to_rgb(_open(data, "image", max_pixels=max_pixels), min_side=min_side)


def decode_for_model(
    data: bytes | None, *, size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode by content and resize to ``size`` x ``size`` as ingest does; also return (height, width).

    The original size comes from the header, so a reduced-scale JPEG decode does not change it; it is
    the size as shown, after the EXIF orientation (height and width swap for a photo taken sideways).
    Images over ``max_pixels`` are refused (``image_too_large``) before decoding.
    """
    opened = _open(data, "image", max_pixels=max_pixels)
    return resize_image(_to_rgb(opened, min_side=size), size), (opened.height, opened.width)


def decode_trimap(data: bytes | None, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an Oxford-IIIT trimap PNG into a (H, W) uint8 array of its stored values.

    A 16-bit trimap keeps its values (they are labels, not intensities); an EXIF orientation, if the
    file has one, is applied as it is to photos.

    Raises
    ------
    RejectedInput
        ``mask_empty``, ``mask_undecodable``, ``mask_too_large``, ``mask_not_single_channel`` or
        ``mask_values_out_of_range`` (a value a uint8 cannot hold).
    """
    arr = _mask_values(_open(data, "mask", max_pixels=max_pixels))
    if arr.ndim == 3:
        # An RGB(A) trimap is usable only if it is gray, i.e. every colour channel holds the label.
        if not (arr[..., :3] == arr[..., :1]).all():
            raise RejectedInput(
                "mask_not_single_channel",
                f"the mask has {arr.shape[2]} channels with different values; save trimaps as 8-bit grayscale",
            )
        arr = arr[..., 0]
    return _as_uint8(arr, allowed="Oxford-IIIT trimaps use only 1 (pet), 2 (background), 3 (border)")


def decode_label_mask(data: bytes | None, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """A stored label mask (petseg's raw codec: ``np.save`` of uint8 (H, W)) or a label PNG, as (H, W) uint8.

    A 16-bit label PNG keeps its values; an EXIF orientation, if the file has one, is applied.

    Raises
    ------
    RejectedInput
        ``mask_empty``, ``mask_undecodable``, ``mask_too_large`` or ``mask_values_out_of_range`` (a
        value a uint8 cannot hold).
    """
    arr = _mask_values(_open(data, "mask", max_pixels=max_pixels))
    if arr.ndim != 2:
        raise RejectedInput("mask_undecodable", f"a label mask must be 2-D (H, W); got shape {arr.shape}")
    return _as_uint8(arr, allowed=f"label masks hold 0..{len(CLASSES) - 1} ({', '.join(CLASSES)})")


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

    Both are taken as shown, after their EXIF orientations: a sideways-tagged photo's trimap must have
    the photo's upright size, as an annotator looking at the photo drew it.

    Raises
    ------
    RejectedInput
        With a reason code when the pair cannot be used: empty, undecodable or too large (over
        ``max_pixels``) image or mask, mask size different from the image, or mask values outside 1..3.
    """
    opened = _open(image_bytes, "image", max_pixels=max_pixels)
    mask = decode_trimap(mask_bytes, max_pixels=max_pixels)
    # From the header and the orientation: the size as shown, before any reduced-scale decode.
    height, width = opened.height, opened.width
    if (height, width) != mask.shape:
        raise RejectedInput(
            "size_mismatch",
            f"image is {width}x{height} but its mask is {mask.shape[1]}x{mask.shape[0]} (width x height, as shown "
            "after EXIF orientation); give the image its own trimap",
        )
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))  # a histogram: no sort, unlike np.unique
    bad = sorted(set(present.tolist()) - TRIMAP_VALUES)
    if bad:
        raise RejectedInput(
            "mask_values_out_of_range",
            f"mask holds values {bad}; Oxford-IIIT trimaps use only 1 (pet), 2 (background), 3 (border)",
        )
    return Example(
        image=resize_image(_to_rgb(opened, min_side=size), size),
        mask=resize_mask(mask - 1, size),
        height=int(height),
        width=int(width),
    )
