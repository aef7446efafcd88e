"""petseg's Keras classes: the segmentation loss, the learning-rate schedule and two metrics.

This module imports TensorFlow at its top, so only code that already runs TensorFlow imports it:
:mod:`petseg.model.losses` does so inside its functions, and ``import petseg.model`` (which the
inference and ingest code needs) stays free of TensorFlow. Set ``TF_USE_LEGACY_KERAS=1`` before
importing it: the classes subclass tf-keras (Keras 2) bases, and importing it under Keras 3 raises.

Each class is registered for serialization as ``petseg>{class name}``. Saved models and optimizer
configs record that name, so the class names and the package name must not change; they are also
what :func:`petseg.model.losses.custom_objects` returns.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import tensorflow as tf

from petseg.model.unet import keras_module

#: tf.keras after the check that it is tf-keras: the bases below must be Keras 2's.
keras = keras_module()

#: The package half of every registered name (``petseg>SegmentationLoss``).
PACKAGE = "petseg"

#: Added to the numerator and denominator of each Dice ratio: a class absent from an image and not
#: predicted there scores 1 instead of 0/0.
DICE_SMOOTH = 1.0


@keras.utils.register_keras_serializable(package=PACKAGE)
class SegmentationLoss(keras.losses.Loss):
    """Sparse softmax cross-entropy on logits plus ``dice_weight`` x (1 - mean soft Dice).

    Returns one value per example, so the Keras reduction (and the global-batch scaling of
    ``tf.distribute`` strategies in ``model.fit``) applies as for built-in losses.

    Parameters
    ----------
    n_classes
        Number of classes (logit channels).
    dice_weight
        Weight of the Dice term; 0 gives plain cross-entropy.
    class_weights
        Optional per-class weights of the cross-entropy term; None weighs every pixel alike.
    name
        The loss's name in Keras logs.
    **kwargs
        Passed to ``tf.keras.losses.Loss`` (``reduction``, as a saved config holds it).
    """

    def __init__(
        self,
        n_classes: int = 3,
        dice_weight: float = 1.0,
        class_weights: Sequence[float] | None = None,
        name: str = "segmentation_loss",
        **kwargs: Any,
    ) -> None:
        # Positional and keyword as Keras's from_config calls it: cls(**config).
        super().__init__(name=name, **kwargs)
        self.n_classes = int(n_classes)
        self.dice_weight = float(dice_weight)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]

    def call(self, y_true: Any, y_pred: Any) -> Any:
        """One loss value per example, from integer masks and logits."""
        # Logits may be float16/bfloat16 under a mixed policy; softmax and log need float32.
        logits = tf.cast(y_pred, tf.float32)
        labels = tf.cast(y_true, tf.int32)
        if labels.shape.rank == logits.shape.rank:  # (N, H, W, 1) masks
            labels = tf.squeeze(labels, axis=-1)
        spatial = list(range(1, logits.shape.rank - 1))
        loss = self._cross_entropy(labels=labels, logits=logits, spatial=spatial)
        if self.dice_weight:
            loss = loss + self.dice_weight * (1.0 - self._mean_soft_dice(labels=labels, logits=logits, spatial=spatial))
        return loss

    def _cross_entropy(self, *, labels: Any, logits: Any, spatial: list[int]) -> Any:
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        if self.class_weights is None:
            return tf.reduce_mean(ce, axis=spatial)
        w = tf.gather(tf.constant(self.class_weights, tf.float32), labels)
        # Normalised per example, so weights change the balance between classes, not the scale.
        return tf.reduce_sum(w * ce, axis=spatial) / tf.maximum(tf.reduce_sum(w, axis=spatial), 1e-6)

    def _mean_soft_dice(self, *, labels: Any, logits: Any, spatial: list[int]) -> Any:
        probs = tf.nn.softmax(logits, axis=-1)
        onehot = tf.one_hot(labels, self.n_classes, dtype=tf.float32)
        intersection = tf.reduce_sum(probs * onehot, axis=spatial)
        total = tf.reduce_sum(probs + onehot, axis=spatial)
        dice = (2.0 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)  # (N, n_classes)
        return tf.reduce_mean(dice, axis=-1)

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments, for ``from_config`` and saved models."""
        config = super().get_config()
        config.update(n_classes=self.n_classes, dice_weight=self.dice_weight, class_weights=self.class_weights)
        return config


@keras.utils.register_keras_serializable(package=PACKAGE)
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from ``learning_rate / warmup_steps`` to ``learning_rate``, then cosine decay.

    The decay reaches ``final_fraction * learning_rate`` at ``total_steps`` and stays there.

    Parameters
    ----------
    learning_rate
        Peak learning rate, reached at the end of the warm-up.
    warmup_steps
        Optimizer steps of linear warm-up (0 for none).
    total_steps
        The step where the decay ends.
    final_fraction
        The fraction of ``learning_rate`` kept from ``total_steps`` on.
    """

    def __init__(
        self, learning_rate: float, warmup_steps: int, total_steps: int, final_fraction: float = 0.0
    ) -> None:
        # Positional and keyword as Keras's from_config calls it: cls(**config).
        super().__init__()
        self.learning_rate = float(learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.final_fraction = float(final_fraction)

    def __call__(self, step: Any) -> Any:
        """The learning rate at optimizer step ``step`` (a tensor: the schedule runs in the graph)."""
        step = tf.cast(step, tf.float32)
        peak = tf.constant(self.learning_rate, tf.float32)
        # step + 1: the first update already moves the weights, an lr of exactly 0 would waste it.
        warm = peak * tf.minimum(1.0, (step + 1.0) / float(max(self.warmup_steps, 1)))
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        progress = tf.clip_by_value((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
        decayed = peak * (self.final_fraction + (1.0 - self.final_fraction) * cosine)
        return tf.where(step < self.warmup_steps, warm, decayed)

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments, for ``from_config`` and saved optimizer configs."""
        return {
            "learning_rate": self.learning_rate,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "final_fraction": self.final_fraction,
        }


def _per_pixel(sample_weight: Any, y_true: Any) -> Any:
    """``sample_weight`` given per image, broadcast to every pixel of ``y_true``; None stays None."""
    # Validation weighs whole images (shape (N,); padding images weigh 0). Keras's IoU wants a
    # weight per pixel, and accuracy would broadcast an (N,) weight along the width axis.
    if sample_weight is None:
        return None
    weight = tf.reshape(tf.cast(sample_weight, tf.float32), [-1] + [1] * (y_true.shape.rank - 1))
    return tf.broadcast_to(weight, tf.shape(y_true))


@keras.utils.register_keras_serializable(package=PACKAGE)
class PixelAccuracy(keras.metrics.SparseCategoricalAccuracy):
    """Pixel accuracy from logits; a weight per image counts for each of its pixels."""

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        """Accumulate a batch, its per-image ``sample_weight`` spread over each image's pixels."""
        return super().update_state(y_true, y_pred, sample_weight=_per_pixel(sample_weight, y_true))


@keras.utils.register_keras_serializable(package=PACKAGE)
class PixelIoU(keras.metrics.IoU):
    """IoU over ``target_class_ids`` from logits; a weight per image counts for each of its pixels."""

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        """Accumulate a batch, its per-image ``sample_weight`` spread over each image's pixels."""
        return super().update_state(y_true, y_pred, sample_weight=_per_pixel(sample_weight, y_true))


#: Every class above by its class name: the names saved models and configs refer to them by.
KERAS_CLASSES: dict[str, type] = {
    cls.__name__: cls for cls in (SegmentationLoss, WarmupCosineDecay, PixelAccuracy, PixelIoU)
}
