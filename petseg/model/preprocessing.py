"""Pixel preprocessing between the stored uint8 RGB images and the U-Net input.

One function, :func:`preprocess`, serves training (inside ``tf.data`` maps), evaluation and
inference (inside a Spark pandas UDF), so the three can never drift apart. The preprocessing is
chosen by the encoder weights (:func:`preprocessing_for`) because pretrained VGG16 kernels expect
the Caffe convention they were trained with.

Names
-----
``vgg16_caffe``
    ``tf.keras.applications.vgg16.preprocess_input`` semantics: RGB -> BGR, then subtract the
    ImageNet channel means (B 103.939, G 116.779, R 123.68); no scaling, values roughly in
    [-124, 152].
``unit_scale``
    ``x / 127.5 - 1``: zero-centred values in [-1, 1] for an encoder trained from scratch. This
    scaling (rather than ``x / 255 - 0.5``) gives unit-range inputs, which suits He-initialised
    convolutions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from petseg.model.unet import is_pretrained

if TYPE_CHECKING:  # pragma: no cover - typing only
    import tensorflow as tf

PREPROCESSING_NAMES: tuple[str, ...] = ("vgg16_caffe", "unit_scale")
#: ImageNet channel means in BGR order, as in ``tf.keras.applications.imagenet_utils`` (mode "caffe").
_IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)


def preprocessing_for(encoder_weights: str) -> str:
    """Return the preprocessing name matching ``encoder_weights``.

    Parameters
    ----------
    encoder_weights
        "imagenet", "none" or a path to a .h5 file (treated as pretrained VGG16 weights).

    Returns
    -------
    str
        "vgg16_caffe" for pretrained weights, "unit_scale" for "none".
    """
    return "vgg16_caffe" if is_pretrained(encoder_weights) else "unit_scale"


def preprocess(images: Any, name: str) -> "tf.Tensor":
    """Turn RGB images into model input with plain TensorFlow ops.

    Works eagerly (Spark UDF), in graph mode (``tf.data.Dataset.map``) and on any leading shape.

    Parameters
    ----------
    images
        ``(..., H, W, 3)`` RGB, uint8 in [0, 255] or float holding the same 0..255 values
        (numpy array or tensor).
    name
        One of :data:`PREPROCESSING_NAMES`, usually from :func:`preprocessing_for`.

    Returns
    -------
    tf.Tensor
        float32 of the same shape.

    Raises
    ------
    ValueError
        On an unknown ``name``.
    """
    if name not in PREPROCESSING_NAMES:
        raise ValueError(
            f"preprocessing {name!r} is unknown; use one of {list(PREPROCESSING_NAMES)} "
            f"(see petseg.model.preprocessing_for)"
        )
    import tensorflow as tf

    x = tf.cast(tf.convert_to_tensor(images), tf.float32)
    if name == "unit_scale":
        return x / 127.5 - 1.0
    return tf.reverse(x, axis=[-1]) - tf.constant(_IMAGENET_BGR_MEAN, tf.float32)
