"""The training objective: loss, metrics and optimizer for sparse integer masks and logits.

Why not plain cross-entropy: the border class is a thin band (a few percent of the pixels), so
pixel-averaged cross-entropy is dominated by pet and background and a model can score well while
never predicting a border pixel. The soft multi-class Dice term averages over classes, so the
border counts as much as the other two.

The Keras classes live in :mod:`petseg.model.keras_parts`, which imports TensorFlow at its top;
this module imports it only inside functions, so that importing it (and :mod:`petseg.model`) does
not import TensorFlow. They are registered for serialization under the package name "petseg";
:func:`custom_objects` returns them for ``tf.keras.models.load_model``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

from petseg.model.unet import keras_module


def _keras_classes() -> dict[str, type]:
    """petseg's Keras classes by class name; TensorFlow is imported here, on first use."""
    from petseg.model import keras_parts

    return keras_parts.KERAS_CLASSES


def custom_objects() -> dict[str, type]:
    """Return petseg's Keras classes by name, for ``tf.keras.models.load_model(custom_objects=...)``."""
    classes = _keras_classes()
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
    return _keras_classes()["SegmentationLoss"](n_classes=n_classes, dice_weight=dice_weight, class_weights=class_weights)


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
    classes = _keras_classes()
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
    schedule = _keras_classes()["WarmupCosineDecay"](
        learning_rate=learning_rate, warmup_steps=warmup_steps, total_steps=total_steps
    )
    return keras.optimizers.Adam(learning_rate=schedule)
