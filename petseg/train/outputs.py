"""What the chief leaves in a run's output folder besides the model: metadata, history, plots."""

from __future__ import annotations

import json
import platform
import uuid
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Any

from petseg.data.decode import CLASSES
from petseg.plots import curves_png, predictions_png

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
        # Which model an inference output came from: every run gets its own id.
        "run_id": uuid.uuid4().hex,
        # The MLflow run that holds this model's params, metrics and artifacts (null: not tracked).
        "mlflow_run_id": spec.get("mlflow_run_id"),
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
    paths["curves"].write_bytes(curves_png(history))
    if train_cfg["preview_images"]:
        # Predict with the exported model, loaded outside the strategy: the live model's predict would
        # run collective ops that the other workers, already finished, can no longer join. This also
        # proves the export loads.
        paths["predictions"].write_bytes(
            _preview(run_dir=output_dir, dataset_url=data["dataset"], count=train_cfg["preview_images"])
        )
    else:
        del paths["predictions"]
    return {"outputs": {k: str(v) for k, v in paths.items()}, "model_dir": str(output_dir / "model"),
            "final_metrics": final}


def _version(package: str) -> str | None:
    try:
        return pkg_metadata.version(package)
    except pkg_metadata.PackageNotFoundError:
        return None


def _preview(*, run_dir: Path, dataset_url: str, count: int) -> bytes:
    """The predictions grid for the first ``count`` test images, made with the exported model."""
    import numpy as np

    from petseg.data.reader import open_split
    from petseg.infer.segment import load_model, predict_labels

    with open_split(dataset_url, split="test", fields=("id", "image", "mask"), workers_count=1) as reader:
        rows = [row for _, row in zip(range(count), reader)]
    images = np.stack([r.image for r in rows])
    predicted = predict_labels(load_model(str(run_dir)), images, batch_size=count)
    return predictions_png([r.id for r in rows], images, np.stack([r.mask for r in rows]), predicted)
