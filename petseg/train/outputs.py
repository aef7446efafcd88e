"""What the chief leaves in a run's output folder besides the model: metadata, history, plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from petseg.config.sections import DataConfig, ModelConfig, TrainConfig, to_dict
from petseg.model import artifact
from petseg.plots import curves_png, predictions_png


def write_outputs(*, output_dir: Path, spec: Mapping[str, Any], data: DataConfig, model: ModelConfig,
                  train: TrainConfig, history: list[dict[str, Any]], preprocessing: str) -> dict[str, Any]:
    """Write the model's metadata, history JSON, the curves PNG and a predictions grid PNG; return their paths.

    Parameters
    ----------
    output_dir
        The run's working folder, holding the exported ``model/``.
    spec
        The worker's job file: the run's ids, the worker count and the dataset's row counts.
    data, model, train
        The sections the run trained with; the metadata records the model and train sections as plain JSON.
    history
        The run's epoch records, in order.
    preprocessing
        The model's preprocessing, as inference must repeat it.
    """
    # The metadata's record of how the model was made: the sections as plain JSON, as the job file carried them.
    model_cfg, train_cfg = to_dict(model), to_dict(train)
    final = history[-1] if history else {}
    paths = {
        "metadata": artifact.write_metadata(
            output_dir,
            image_size=data.image_size,
            preprocessing=preprocessing,
            run_id=spec["run_id"],
            mlflow_run_id=spec.get("mlflow_run_id"),
            model=model_cfg,
            dataset=data.dataset,
            training={"model": model_cfg, "train": train_cfg, "workers": spec.get("workers"),
                      "train_rows": spec["train_rows"], "test_rows": spec["test_rows"]},
            final_metrics=final,
        ),
        "history": output_dir / "history.json",
        "curves": output_dir / "curves.png",
        "predictions": output_dir / "predictions.png",
    }
    paths["history"].write_text(json.dumps(history, indent=2))
    paths["curves"].write_bytes(curves_png(history))
    if train.preview_images:
        # Predict with the exported model, loaded outside the strategy: the live model's predict would
        # run collective ops that the other workers, already finished, can no longer join. This also
        # proves the export loads.
        paths["predictions"].write_bytes(
            _preview(run_dir=output_dir, dataset_url=str(data.dataset), count=train.preview_images)
        )
    else:
        del paths["predictions"]
    return {"outputs": {k: str(v) for k, v in paths.items()}, "model_dir": str(output_dir / artifact.MODEL_FOLDER),
            "final_metrics": final}


def _preview(*, run_dir: Path, dataset_url: str, count: int) -> bytes:
    """The predictions grid for the first ``count`` test images, made with the exported model."""
    from petseg.data.reader import first_rows

    ids, images, masks = first_rows(dataset_url, split="test", count=count)
    predicted = artifact.load(str(run_dir)).predict_labels(images, batch_size=count)
    return predictions_png(ids, images, masks, predicted)
