"""Random augmentation of a training example: one geometric draw for image and mask, colour for the image only.

Real pet photos vary in framing, scale, pose and light far more than a hundred or a few thousand
training photos show; a from-scratch encoder memorises what it is shown (measured on real photos:
training accuracy ahead of validation within a few epochs). Each transform keeps the mask true to
the image: the geometric ones (flip, zoom into a random square) move both with one draw, the mask
resampled by nearest neighbour so it keeps exact class ids; colour changes only the image.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import tensorflow as tf


def augment(
    image: "tf.Tensor",
    mask: "tf.Tensor",
    *,
    flip: bool = True,
    max_zoom: float = 1.0,
    colour: float = 0.0,
    seed: int | None = None,
) -> tuple["tf.Tensor", "tf.Tensor"]:
    """Augment one ``(H, W, 3)`` uint8 image and its ``(H, W)`` mask; return float32 0..255 and the mask's dtype.

    Parameters
    ----------
    image, mask
        One example, as the dataset stores it.
    flip
        Flip left-right, both together, with probability 1/2 (the TF tutorial's only augmentation;
        the defaults are that alone).
    max_zoom
        Zoom into a random square of side ``H / z`` for ``z`` uniform in ``[1, max_zoom]``, resized
        back to ``H x W``: the pet at up to ``max_zoom`` times its size, partly cut off. 1 is none.
    colour
        Strength in ``[0, 1]`` of random brightness (up to +-0.25 x colour of the range), contrast and
        saturation (factors in ``1 +- 0.5 x colour``) and hue (up to +-0.05 x colour of the circle). 0 is none.
    seed
        Op-level seed of the first random op (each further op uses the next integer), so a worker's
        stream of augmentations repeats with the global seed.
    """
    import tensorflow as tf

    seeds: Iterator[int | None] = itertools.count(seed) if seed is not None else itertools.repeat(None)
    x = tf.cast(image, tf.float32)
    y = mask
    if flip:
        flipped = tf.random.uniform((), seed=next(seeds)) > 0.5
        # Width is axis 1 of both an (H, W, 3) image and an (H, W) mask.
        x, y = tf.cond(flipped, lambda: (tf.reverse(x, [1]), tf.reverse(y, [1])), lambda: (x, y))
    if max_zoom > 1.0:
        x, y = _zoom(x, y, max_zoom=max_zoom, seeds=seeds)
    if colour > 0.0:
        x = _colour(x, strength=colour, seeds=seeds)
    return x, y


def _zoom(x: "tf.Tensor", y: "tf.Tensor", *, max_zoom: float, seeds: Iterator[int | None]) -> tuple["tf.Tensor", "tf.Tensor"]:
    import tensorflow as tf

    side = 1.0 / tf.random.uniform((), 1.0, max_zoom, seed=next(seeds))  # of the image, normalised
    top = tf.random.uniform((), 0.0, 1.0, seed=next(seeds)) * (1.0 - side)
    left = tf.random.uniform((), 0.0, 1.0, seed=next(seeds)) * (1.0 - side)
    boxes = tf.stack([top, left, top + side, left + side])[None]
    size = tf.shape(x)[:2]
    # crop_and_resize samples the box's corners onto the output's corners: one sampling grid, so
    # image and mask stay aligned; nearest keeps the mask's class ids exact.
    x = tf.image.crop_and_resize(x[None], boxes, [0], size, method="bilinear")[0]
    y_float = tf.cast(y, tf.float32)[None, ..., None]
    y = tf.cast(tf.image.crop_and_resize(y_float, boxes, [0], size, method="nearest")[0, ..., 0], y.dtype)
    return x, y


def _colour(x: "tf.Tensor", *, strength: float, seeds: Iterator[int | None]) -> "tf.Tensor":
    import tensorflow as tf

    x = x / 255.0
    x = tf.image.random_brightness(x, 0.25 * strength, seed=next(seeds))
    x = tf.image.random_contrast(x, 1.0 - 0.5 * strength, 1.0 + 0.5 * strength, seed=next(seeds))
    x = tf.image.random_saturation(x, 1.0 - 0.5 * strength, 1.0 + 0.5 * strength, seed=next(seeds))
    x = tf.image.random_hue(x, 0.05 * strength, seed=next(seeds))
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0
