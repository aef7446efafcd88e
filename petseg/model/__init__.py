"""The segmentation model: VGG16 U-Net, preprocessing, loss, metrics and optimizer.

Importing this package does not import TensorFlow; every function that needs it imports it when
called. Set ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is first imported: petseg uses tf-keras
(Keras 2) through ``tf.keras``.
"""

from petseg.model.losses import custom_objects, make_optimizer, segmentation_loss, segmentation_metrics
from petseg.model.preprocessing import PREPROCESSING_NAMES, preprocess, preprocessing_for
from petseg.model.unet import (
    ENCODER_SKIPS,
    build_unet,
    is_pretrained,
    keras_module,
    resolved_width,
    validate_unet_args,
)

__all__ = [
    "ENCODER_SKIPS",
    "PREPROCESSING_NAMES",
    "build_unet",
    "custom_objects",
    "is_pretrained",
    "keras_module",
    "make_optimizer",
    "preprocess",
    "preprocessing_for",
    "resolved_width",
    "segmentation_loss",
    "segmentation_metrics",
    "validate_unet_args",
]
