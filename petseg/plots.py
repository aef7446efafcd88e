"""The PNGs petseg writes: training curves, grids of input, true mask and predicted mask, and mask overlays."""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np

from petseg.data.decode import CLASSES


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on executors, drivers or CI
    import matplotlib.pyplot as plt

    return plt


def curves_png(history: list[dict[str, Any]]) -> bytes:
    """Loss and pixel accuracy per epoch, training and validation (the reference notebook's plot)."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "loss", "Loss"), (axes[1], "pixel_accuracy", "Pixel accuracy")):
        ax.plot(epochs, [h.get(key) for h in history], "r-", label=f"training {key}")
        ax.plot(epochs, [h.get(f"val_{key}") for h in history], "bo", label=f"validation {key}")
        ax.set_title(f"Training and validation {title.lower()}")
        ax.set_xlabel("Epoch")
        ax.legend()
    fig.tight_layout()
    return _save(plt, fig, dpi=80)


def predictions_png(ids: Sequence[str], images: np.ndarray, masks: np.ndarray, predicted: np.ndarray) -> bytes:
    """One row per example: input image, true mask, predicted mask."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(ids), 3, figsize=(9, 3 * len(ids)), squeeze=False)
    for i, example_id in enumerate(ids):
        panels = ((images[i], f"Input image ({example_id})"), (masks[i], "True mask"), (predicted[i], "Predicted mask"))
        for ax, (img, title) in zip(axes[i], panels):
            ax.imshow(img, vmin=0, vmax=len(CLASSES) - 1) if img.ndim == 2 else ax.imshow(img)
            ax.set_title(title)
            ax.axis("off")
    fig.tight_layout()
    return _save(plt, fig, dpi=60)


#: Class colours of the overlay (pet, background, border): background left as it is.
OVERLAY_COLOURS = {0: (255, 140, 0), 2: (0, 200, 255)}


def overlay_png(titles: Sequence[str], images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> bytes:
    """A grid of RGB images, each with its label mask laid over it (pet orange, border cyan)."""
    plt = _pyplot()
    columns = min(3, len(titles))
    rows = -(-len(titles) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.6 * rows), squeeze=False)
    for ax, title, image, mask in zip(axes.ravel(), titles, images, masks):
        blended = image.astype(np.float32)
        for label, colour in OVERLAY_COLOURS.items():
            where = mask == label
            blended[where] = 0.55 * blended[where] + 0.45 * np.asarray(colour, np.float32)
        ax.imshow(blended.astype(np.uint8))
        ax.set_title(title if len(title) <= 40 else "..." + title[-37:], fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    return _save(plt, fig, dpi=70)


def _save(plt: Any, fig: Any, *, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
