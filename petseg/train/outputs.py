"""What the chief leaves in a run's output folder besides the model: metadata, history, plots."""

from __future__ import annotations

import json
import platform
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Any

from petseg.images import CLASSES

#: Written next to the exported model; inference reads it to prepare images the way training did.
METADATA_FILE = "petseg-model.json"
_VERSIONED = ("petseg", "tensorflow", "tf_keras", "petastorm", "pyspark", "numpy")


def write_outputs(*, output_dir: Path, spec: dict[str, Any], history: list[dict[str, Any]],
                  preprocessing: str) -> dict[str, Any]:
    """Write metadata JSON, history JSON, the curves PNG and a predictions grid PNG; return their paths."""
    data, model_cfg, train_cfg = spec["config"]["data"], spec["config"]["model"], spec["config"]["train"]
    final = history[-1] if history else {}
    meta = {
        "format": "petseg-model/1",
        "model_path": "model",
        "image_size": data["image_size"],
        "classes": list(CLASSES),
        "preprocessing": preprocessing,
        "n_depth": model_cfg["n_depth"],
        "encoder_weights": model_cfg["encoder_weights"],
        "dataset": data["dataset"],
        "training": {"model": model_cfg, "train": train_cfg, "workers": spec.get("workers"),
                     "train_rows": spec["train_rows"], "test_rows": spec["test_rows"]},
        "final_metrics": final,
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in _VERSIONED}},
    }
    paths = {
        "metadata": output_dir / METADATA_FILE,
        "history": output_dir / "history.json",
        "curves": output_dir / "curves.png",
        "predictions": output_dir / "predictions.png",
    }
    paths["metadata"].write_text(json.dumps(meta, indent=2))
    paths["history"].write_text(json.dumps(history, indent=2))
    plot_curves(history, paths["curves"])
    if train_cfg["preview_images"]:
        # Predict with the exported model, loaded outside the strategy: the live model's predict would
        # run collective ops that the other workers, already finished, can no longer join. This also
        # proves the export loads.
        import tensorflow as tf

        exported = tf.keras.models.load_model(str(output_dir / "model"), compile=False)
        plot_predictions(exported, dataset_url=data["dataset"], count=train_cfg["preview_images"],
                         preprocessing=preprocessing, path=paths["predictions"])
    else:
        del paths["predictions"]
    return {"outputs": {k: str(v) for k, v in paths.items()}, "model_dir": str(output_dir / "model"),
            "final_metrics": final}


def _version(package: str) -> str | None:
    try:
        return pkg_metadata.version(package)
    except pkg_metadata.PackageNotFoundError:
        return None


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and pixel accuracy per epoch, training and validation (the reference notebook's plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "loss", "Loss"), (axes[1], "pixel_accuracy", "Pixel accuracy")):
        ax.plot(epochs, [h.get(key) for h in history], "r-", label=f"training {key}")
        ax.plot(epochs, [h.get(f"val_{key}") for h in history], "bo", label=f"validation {key}")
        ax.set_title(f"Training and validation {title.lower()}")
        ax.set_xlabel("Epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_predictions(model: Any, *, dataset_url: str, count: int, preprocessing: str, path: Path) -> None:
    """A grid of input, true mask and predicted mask for the first ``count`` test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from petseg.model.preprocessing import preprocess
    from petseg.reader import open_split

    with open_split(dataset_url, split="test", fields=("id", "image", "mask"), workers_count=1) as reader:
        rows = [row for _, row in zip(range(count), reader)]
    images = np.stack([r.image for r in rows])
    predicted = np.argmax(model.predict(preprocess(images, preprocessing), verbose=0), axis=-1)
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for ax, img, title in zip(axes[i], (row.image, row.mask, predicted[i]), ("Input image", "True mask", "Predicted mask")):
            ax.imshow(img, vmin=0, vmax=len(CLASSES) - 1) if img.ndim == 2 else ax.imshow(img)
            ax.set_title(f"{title}" + (f" ({row.id})" if title == "Input image" else ""))
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)
