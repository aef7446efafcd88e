"""The training objective: loss, metrics and optimizer for sparse integer masks and logits.

Why not plain cross-entropy: the border class is a thin band (a few percent of the pixels), so
pixel-averaged cross-entropy is dominated by pet and background and a model can score well while
never predicting a border pixel. The soft multi-class Dice term averages over classes, so the
border counts as much as the other two.

The Keras classes are defined on first use (TensorFlow is imported only inside functions) and
registered for serialization under the package name "petseg"; :func:`custom_objects` returns them
for ``tf.keras.models.load_model``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

from petseg.model.unet import keras_module

#: Added to the numerator and denominator of each Dice ratio: a class absent from an image and not
#: predicted there scores 1 instead of 0/0.
DICE_SMOOTH = 1.0


@functools.lru_cache(maxsize=None)
def _classes() -> dict[str, type]:
    import tensorflow as tf

    keras = keras_module()

    @keras.utils.register_keras_serializable(package="petseg")
    class SegmentationLoss(keras.losses.Loss):
        """Sparse softmax cross-entropy on logits plus ``dice_weight`` x (1 - mean soft Dice).

        Returns one value per example, so the Keras reduction (and the global-batch scaling of
        ``tf.distribute`` strategies in ``model.fit``) applies as for built-in losses.
        """

        def __init__(
            self,
            n_classes: int = 3,
            dice_weight: float = 1.0,
            class_weights: Sequence[float] | None = None,
            name: str = "segmentation_loss",
            **kwargs: Any,
        ) -> None:
            super().__init__(name=name, **kwargs)
            self.n_classes = int(n_classes)
            self.dice_weight = float(dice_weight)
            self.class_weights = None if class_weights is None else [float(w) for w in class_weights]

        def call(self, y_true: Any, y_pred: Any) -> Any:
            # Logits may be float16/bfloat16 under a mixed policy; softmax and log need float32.
            logits = tf.cast(y_pred, tf.float32)
            labels = tf.cast(y_true, tf.int32)
            if labels.shape.rank == logits.shape.rank:  # (N, H, W, 1) masks
                labels = tf.squeeze(labels, axis=-1)
            spatial = list(range(1, logits.shape.rank - 1))
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
            if self.class_weights is None:
                loss = tf.reduce_mean(ce, axis=spatial)
            else:
                w = tf.gather(tf.constant(self.class_weights, tf.float32), labels)
                # Normalised per example, so weights change the balance between classes, not the scale.
                loss = tf.reduce_sum(w * ce, axis=spatial) / tf.maximum(tf.reduce_sum(w, axis=spatial), 1e-6)
            if self.dice_weight:
                probs = tf.nn.softmax(logits, axis=-1)
                onehot = tf.one_hot(labels, self.n_classes, dtype=tf.float32)
                intersection = tf.reduce_sum(probs * onehot, axis=spatial)
                total = tf.reduce_sum(probs + onehot, axis=spatial)
                dice = (2.0 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)  # (N, n_classes)
                loss = loss + self.dice_weight * (1.0 - tf.reduce_mean(dice, axis=-1))
            return loss

        def get_config(self) -> dict[str, Any]:
            config = super().get_config()
            config.update(n_classes=self.n_classes, dice_weight=self.dice_weight, class_weights=self.class_weights)
            return config

    @keras.utils.register_keras_serializable(package="petseg")
    class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
        """Linear warm-up from ``learning_rate / warmup_steps`` to ``learning_rate``, then cosine decay.

        The decay reaches ``final_fraction * learning_rate`` at ``total_steps`` and stays there.
        """

        def __init__(
            self, learning_rate: float, warmup_steps: int, total_steps: int, final_fraction: float = 0.0
        ) -> None:
            super().__init__()
            self.learning_rate = float(learning_rate)
            self.warmup_steps = int(warmup_steps)
            self.total_steps = int(total_steps)
            self.final_fraction = float(final_fraction)

        def __call__(self, step: Any) -> Any:
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
            return {
                "learning_rate": self.learning_rate,
                "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps,
                "final_fraction": self.final_fraction,
            }

    def per_pixel(sample_weight: Any, y_true: Any) -> Any:
        # Validation weighs whole images (shape (N,); padding images weigh 0). Keras's IoU wants a
        # weight per pixel, and accuracy would broadcast an (N,) weight along the width axis.
        if sample_weight is None:
            return None
        weight = tf.reshape(tf.cast(sample_weight, tf.float32), [-1] + [1] * (y_true.shape.rank - 1))
        return tf.broadcast_to(weight, tf.shape(y_true))

    @keras.utils.register_keras_serializable(package="petseg")
    class PixelAccuracy(keras.metrics.SparseCategoricalAccuracy):
        """Pixel accuracy from logits; a weight per image counts for each of its pixels."""

        def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
            return super().update_state(y_true, y_pred, sample_weight=per_pixel(sample_weight, y_true))

    @keras.utils.register_keras_serializable(package="petseg")
    class PixelIoU(keras.metrics.IoU):
        """IoU over ``target_class_ids`` from logits; a weight per image counts for each of its pixels."""

        def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
            return super().update_state(y_true, y_pred, sample_weight=per_pixel(sample_weight, y_true))

    return {"SegmentationLoss": SegmentationLoss, "WarmupCosineDecay": WarmupCosineDecay,
            "PixelAccuracy": PixelAccuracy, "PixelIoU": PixelIoU}


def custom_objects() -> dict[str, type]:
    """Return petseg's Keras classes by name, for ``tf.keras.models.load_model(custom_objects=...)``."""
    classes = _classes()
    return {**classes, **{f"petseg>{name}": cls for name, cls in classes.items()}}


def segmentation_loss(
    *, n_classes: int = 3, dice_weight: float = 1.0, class_weights: Sequence[float] | None = None
) -> Callable[[Any, Any], Any]:
    """Return the loss for ``model.compile``: cross-entropy from logits plus weighted soft Dice.

    Parameters
    ----------
    n_classes
        Number of classes (logit channels).
    dice_weight
        Weight of ``1 - mean over classes of the soft Dice``; 0 gives plain cross-entropy.
    class_weights
        Optional per-class weights of the cross-entropy term (length ``n_classes``).

    Returns
    -------
    tf.keras.losses.Loss
        Called as ``loss(y_true, y_pred_logits)`` with integer masks ``(N, H, W)`` or
        ``(N, H, W, 1)`` and logits ``(N, H, W, n_classes)``.

    Raises
    ------
    ValueError
        On ``n_classes < 2``, a negative ``dice_weight`` or ``class_weights`` of the wrong length or
        with negative values.
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes={n_classes!r} is not allowed; use an integer >= 2")
    if not dice_weight >= 0:
        raise ValueError(f"dice_weight={dice_weight!r} is not allowed; use a number >= 0 (0 = cross-entropy only)")
    if class_weights is not None:
        if len(class_weights) != n_classes or any(not w >= 0 for w in class_weights):
            raise ValueError(
                f"class_weights={list(class_weights)!r} is not allowed; give {n_classes} non-negative numbers, "
                f"one per class, or None"
            )
    return _classes()["SegmentationLoss"](n_classes=n_classes, dice_weight=dice_weight, class_weights=class_weights)


def segmentation_metrics(
    n_classes: int = 3, class_names: Sequence[str] = ("pet", "background", "border")
) -> list[Any]:
    """Return metrics computed from logits: pixel accuracy, mean IoU and one IoU per class.

    Parameters
    ----------
    n_classes
        Number of classes.
    class_names
        One name per class; the per-class metrics are named ``iou_<name>``.

    Returns
    -------
    list of tf.keras.metrics.Metric
        ``pixel_accuracy``, ``mean_iou``, then ``iou_<name>`` for every class. IoU metrics take the
        argmax of the logits (``sparse_y_pred=False``) and accumulate a confusion matrix over the
        epoch, so they are exact dataset IoUs rather than means of batch IoUs. A sample weight of
        shape ``(N,)`` weighs each image's pixels (validation gives padding images weight 0).

    Raises
    ------
    ValueError
        When ``class_names`` does not have ``n_classes`` entries.
    """
    if len(class_names) != n_classes:
        raise ValueError(
            f"class_names={tuple(class_names)!r} has {len(class_names)} names for n_classes={n_classes}; "
            f"give one name per class"
        )
    classes = _classes()
    iou = functools.partial(classes["PixelIoU"], num_classes=n_classes, sparse_y_pred=False)
    metrics: list[Any] = [
        classes["PixelAccuracy"](name="pixel_accuracy"),
        iou(target_class_ids=list(range(n_classes)), name="mean_iou"),
    ]
    metrics += [iou(target_class_ids=[k], name=f"iou_{name}") for k, name in enumerate(class_names)]
    return metrics


def make_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int) -> Any:
    """Return Adam with a linear warm-up then cosine decay to 0 at ``total_steps``.

    Create it inside ``strategy.scope()`` when training with a ``tf.distribute`` strategy.

    Parameters
    ----------
    learning_rate
        Peak learning rate, reached at the end of the warm-up.
    warmup_steps
        Optimizer steps of linear warm-up (0 for none).
    total_steps
        Total optimizer steps of the run (epochs x steps per epoch).

    Raises
    ------
    ValueError
        On a non-positive rate, ``total_steps < 1`` or ``warmup_steps`` outside ``[0, total_steps]``.
    """
    if not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate!r} is not allowed; use a positive number such as 1e-3")
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r} is not allowed; use epochs x steps per epoch (>= 1)")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps!r} is not allowed; use 0..total_steps={total_steps} "
            f"(e.g. about one epoch of steps)"
        )
    keras = keras_module()
    schedule = _classes()["WarmupCosineDecay"](
        learning_rate=learning_rate, warmup_steps=warmup_steps, total_steps=total_steps
    )
    return keras.optimizers.Adam(learning_rate=schedule)
