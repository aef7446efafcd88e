"""The MLflow model training logs: a pyfunc that segments encoded images as ``petseg infer`` does.

It carries the run folder's SavedModel and ``petseg-model.json`` as artifacts and petseg's own
package as code, so that ``mlflow.pyfunc.load_model`` (a notebook, Model Serving, a batch job) decodes,
preprocesses and upsamples exactly as the inference UDF: the same :mod:`petseg.model.segment`
pipeline, without Spark. Inference and evaluation by MLflow URI do not load the pyfunc; they open the
run folder inside it (:mod:`petseg.model.registry`).

This module imports MLflow: import it only when MLflow is on.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

import petseg
from petseg.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from petseg.env import prepare_task_environment
from petseg.errors import InputError
from petseg.model import artifact
from petseg.model.registry import METADATA_ARTIFACT, MODEL_NAME, SAVED_MODEL_ARTIFACT

log = logging.getLogger(__name__)

#: The input column of encoded images (any format Pillow reads, or petseg's raw arrays).
IMAGE_COLUMN = "image"
#: Optional input columns: the size to return each mask at, as the inference job's ``height``/``width``.
SIZE_COLUMNS = ("height", "width")
#: Parameters ``predict`` takes, with their defaults: the inference job's own.
DEFAULT_PARAMS = {"batch_size": 32, "model_resolution": False, "max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS}


class PetsegModel(mlflow.pyfunc.PythonModel):
    """Encoded images in, masks out: the columns of :data:`petseg.model.segment.OUTPUT_COLUMNS` per row
    (``mask_png``, ``mask_model_png``, ``height``, ``width``, ``fraction_<class>``, ``error``), as the
    inference job writes them."""

    def load_context(self, context: Any) -> None:
        prepare_task_environment()  # tf-keras, before the load imports TensorFlow
        self._model = artifact.load(str(Path(context.artifacts[METADATA_ARTIFACT]).parent))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from petseg.model.segment import image_rows, results_frame, segment_stream

        options = {**DEFAULT_PARAMS, **(params or {})}
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({IMAGE_COLUMN: list(model_input)})
        if IMAGE_COLUMN not in frame.columns:
            raise InputError(
                f"the model's input has the columns {list(frame.columns)}; pass encoded images in a column "
                f"named {IMAGE_COLUMN!r} (and optionally {SIZE_COLUMNS[0]!r}, {SIZE_COLUMNS[1]!r} for the masks' size)"
            )
        heights, widths = (frame[c].tolist() if c in frame.columns else [None] * len(frame) for c in SIZE_COLUMNS)
        rows = image_rows(frame[IMAGE_COLUMN].tolist(), heights, widths)
        results = [result for batch in segment_stream(
            self._model, [rows], batch_size=int(options["batch_size"]),
            model_resolution=bool(options["model_resolution"]), max_pixels=int(options["max_image_pixels"]),
        ) for result in batch]
        return results_frame(results)


@dataclass(frozen=True)
class LoggedModel:
    """Where training logged its MLflow model, and the registered version when it registered one."""

    uri: str  # runs:/<run id>/model
    registered_name: str | None = None
    registered_version: str | None = None

    @property
    def registered_uri(self) -> str | None:
        """``models:/<name>/<version>``: what ``infer.model`` takes to use exactly this version."""
        return f"models:/{self.registered_name}/{self.registered_version}" if self.registered_version else None


def log_model(run_dir: Path, *, run_id: str, registered_model_name: str | None = None) -> LoggedModel:
    """Log the run folder's model as an MLflow pyfunc in the active MLflow run, registering it if named.

    Parameters
    ----------
    run_dir
        A published training run (its ``model/`` and ``petseg-model.json``).
    run_id
        The active MLflow run, for the ``runs:/`` URI.
    registered_model_name
        ``mlflow.registered_model_name``: a registry name, ``catalog.schema.model`` in Unity Catalog;
        None logs without registering.
    """
    found = artifact.resolve(str(run_dir))
    info = mlflow.pyfunc.log_model(
        **{_name_argument(): MODEL_NAME},
        python_model=PetsegModel(),
        artifacts={METADATA_ARTIFACT: str(found.run_dir / artifact.METADATA_FILE),
                   SAVED_MODEL_ARTIFACT: str(found.model_dir)},
        code_paths=[str(Path(petseg.__file__).parent)],
        pip_requirements=_requirements(),
        signature=_signature(),
        registered_model_name=registered_model_name,
    )
    version = getattr(info, "registered_model_version", None)
    logged = LoggedModel(f"runs:/{run_id}/{MODEL_NAME}", registered_model_name,
                         None if version is None else str(version))
    log.info("logged the model as %s%s", logged.uri,
             f", registered as {logged.registered_uri}" if logged.registered_uri else "")
    return logged


def _name_argument() -> str:
    # MLflow 3 names a logged model with `name`; MLflow 2 (Databricks Runtime 15.4 LTS ML has 2.x)
    # only takes `artifact_path`, which MLflow 3 deprecates.
    return "name" if "name" in inspect.signature(mlflow.pyfunc.log_model).parameters else "artifact_path"


def _signature() -> Any:
    """Binary images in (sizes optional), the inference job's columns out. Unity Catalog registers
    only models whose signature names both."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from petseg.model.segment import OUTPUT_COLUMNS

    inputs = Schema([ColSpec("binary", IMAGE_COLUMN), *[ColSpec("long", c, required=False) for c in SIZE_COLUMNS]])
    # The contract's type names are MLflow's own.
    outputs = Schema([ColSpec(c.type, c.name, required=not c.nullable) for c in OUTPUT_COLUMNS])
    params = ParamSchema([
        ParamSpec("batch_size", "long", DEFAULT_PARAMS["batch_size"]),
        ParamSpec("model_resolution", "boolean", DEFAULT_PARAMS["model_resolution"]),
        ParamSpec("max_image_pixels", "long", DEFAULT_PARAMS["max_image_pixels"]),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _requirements() -> list[str]:
    """petseg's own dependencies (not its extras), at the versions installed here: the code ships in
    the model (``code_paths``), and what it ran with is what a serving environment should install."""
    from packaging.requirements import Requirement

    pinned = []
    for text in pkg_metadata.requires("petseg") or []:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            pinned.append(f"{requirement.name}=={pkg_metadata.version(requirement.name)}")
        except pkg_metadata.PackageNotFoundError:
            pinned.append(str(requirement))
    return pinned
