"""Segmenting a batch of encoded images with a loaded model: decode, predict, masks back at each image's size.

The inference UDF calls :func:`segment_images` on each Arrow batch, with the same decoding
(:mod:`petseg.data.decode`) and preprocessing (:mod:`petseg.model.preprocessing`) as training,
driven by the model's artifact (:mod:`petseg.model.artifact`). A bad image gets an error, not a
mask, and the batch goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from petseg.data.decode import DEFAULT_MAX_IMAGE_PIXELS, decode_for_model, resize_mask
from petseg.errors import RejectedInput
from petseg.model.artifact import LoadedModel


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


def _output_size(height: int, width: int) -> tuple[int, int]:
    if height < 1 or width < 1:
        raise RejectedInput("size_invalid", f"the row's height={height} and width={width} must be positive")
    return int(height), int(width)


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
    size, n_classes = loaded.image_size, len(loaded.classes)
    results: list[Segmentation | None] = [None] * len(encoded)
    ready, shapes, index = [], [], []
    for i, data in enumerate(encoded):
        try:
            image, shape = decode_for_model(data, size=size, max_pixels=max_pixels)
            if sizes is not None and sizes[i] is not None:
                shape = _output_size(*sizes[i])
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
            counts = np.bincount(mask.ravel(), minlength=n_classes)[:n_classes]
            results[i] = Segmentation(mask, mask_model, tuple((counts / max(1, mask.size)).tolist()), None)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]
