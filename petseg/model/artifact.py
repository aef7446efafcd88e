"""The model artifact: what training leaves in a run folder, and how every other stage opens it.

A run folder holds ``model/`` (a tf-keras SavedModel that returns logits) and ``petseg-model.json``,
which says how to prepare pixels for it (image size, preprocessing), what its labels mean, and which
run it is. Training's chief writes it (:func:`write_metadata`); inference, evaluation and the
training preview resolve and load it (:func:`resolve`, :func:`load`). Nothing outside this module
knows the file's name or its fields. A model can also be named by an MLflow URI
(``models:/name@alias``, ``runs:/id/model``): :mod:`petseg.model.registry` pins and fetches it, and
the run folder inside it is opened as any other.

TensorFlow is imported only by :func:`load`: resolving a model on the driver stays light.
"""

from __future__ import annotations

import gc
import hashlib
import json
import platform
import threading
import uuid
from dataclasses import dataclass
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from petseg import env
from petseg.data.decode import CLASSES
from petseg.errors import InputError
from petseg.io import urls
from petseg.model import registry
from petseg.model.registry import MlflowModel

METADATA_FILE = "petseg-model.json"
FORMAT = "petseg-model/1"
#: The folder of the SavedModel inside a run folder.
MODEL_FOLDER = "model"
#: Packages whose versions a model records: what it takes to load it, and to retrain it.
_VERSIONED = ("petseg", "tensorflow", "tf_keras", "petastorm", "pyspark", "pyarrow", "numpy")


@dataclass(frozen=True)
class ModelArtifact:
    """A resolved run: where its model is, and the metadata that says how to use it."""

    #: The exact model: the folder as given, or the pinned MLflow URI (``models:/pets/3`` for ``@champion``).
    uri: str
    run_dir: Path
    model_dir: Path
    metadata: Mapping[str, Any]
    #: What tasks pass to :func:`load`: the path, or the pinned :class:`MlflowModel`.
    source: "str | MlflowModel" = ""

    @property
    def image_size(self) -> int:
        return int(self.metadata["image_size"])

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])

    @property
    def preprocessing(self) -> str:
        return str(self.metadata["preprocessing"])

    @property
    def version(self) -> str:
        """The run id training wrote, or (for runs older than run ids) a digest of the metadata."""
        if self.metadata.get("run_id"):
            return str(self.metadata["run_id"])
        digest = hashlib.sha1(json.dumps(dict(self.metadata), sort_keys=True).encode()).hexdigest()
        return "sha1-" + digest[:16]

    @property
    def mlflow_run_id(self) -> str | None:
        """The MLflow run that holds this model's params, metrics and artifacts (None: not tracked)."""
        return self.metadata.get("mlflow_run_id")


def write_metadata(
    run_dir: Path,
    *,
    image_size: int,
    preprocessing: str,
    classes: Sequence[str] = CLASSES,
    run_id: str | None = None,
    mlflow_run_id: str | None = None,
    model: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    training: Mapping[str, Any] | None = None,
    final_metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``petseg-model.json`` beside the exported ``model/`` folder; return its path.

    Parameters
    ----------
    run_dir
        The run folder (training's ``train.output_dir``), holding ``model/``.
    image_size, preprocessing, classes
        How to prepare pixels for the model, and what its labels mean.
    run_id
        This run's id, which inference writes beside every mask; None gives a new one.
    model, dataset, training, final_metrics
        The model config, the dataset URL, the training config and row counts, and the last
        epoch's metrics: a record of how the model was made.
    """
    model = dict(model or {})
    meta = {
        "format": FORMAT,
        # Which model an inference output came from: every run gets its own id.
        "run_id": run_id or uuid.uuid4().hex,
        "mlflow_run_id": mlflow_run_id,
        "model_path": MODEL_FOLDER,
        "image_size": int(image_size),
        "classes": list(classes),
        "preprocessing": preprocessing,
        "n_depth": model.get("n_depth"),
        "encoder_weights": model.get("encoder_weights"),
        "dataset": dataset,
        "training": dict(training or {}),
        "final_metrics": dict(final_metrics or {}),
        "versions": versions(),
    }
    path = Path(run_dir) / METADATA_FILE
    path.write_text(json.dumps(meta, indent=2))
    return path


def versions() -> dict[str, str | None]:
    """Python's version and each of :data:`_VERSIONED`'s (None where it is not installed): the stack
    a model was trained on, or a benchmark ran on."""
    return {"python": platform.python_version(), **{p: _version(p) for p in _VERSIONED}}


def _version(package: str) -> str | None:
    try:
        return pkg_metadata.version(package)
    except pkg_metadata.PackageNotFoundError:
        return None


def resolve(
    source: "str | MlflowModel", *, tracking_uri: str | None = None, registry_uri: str | None = None
) -> ModelArtifact:
    """The run a source names: its output folder or the ``model/`` folder in it, or an MLflow model.

    Parameters
    ----------
    source
        A local path or ``file://`` URL; an MLflow URI (``models:/name/version``, ``models:/name@alias``,
        ``runs:/id/model``), which is pinned here (:func:`petseg.model.registry.pin`); or an
        :class:`MlflowModel` pinned before, which is fetched once per node.
    tracking_uri, registry_uri
        The MLflow servers for an MLflow URI; None: MLflow's defaults.

    Raises
    ------
    InputError
        When the path is not local, does not exist, or holds no petseg metadata; when an MLflow URI
        names no model, or a model petseg did not log.
    """
    if isinstance(source, str) and urls.is_mlflow_uri(source):
        source = registry.pin(source, tracking_uri=tracking_uri, registry_uri=registry_uri)
    if isinstance(source, MlflowModel):
        run_dir = registry.run_folder(registry.fetch(source), uri=source.uri)
        found = _open_run(run_dir, uri=source.uri)
        if found is None:
            raise InputError(f"{source.uri} holds no {METADATA_FILE} where its MLmodel says; re-log it with `petseg train`")
        return ModelArtifact(uri=source.uri, run_dir=found.run_dir, model_dir=found.model_dir,
                             metadata=found.metadata, source=source)
    uri = str(source)
    if not urls.is_local(uri):
        raise InputError(
            f"model {uri!r} is not a local path; TensorFlow loads models from files, so put the run on "
            "storage every executor mounts (NFS, /dbfs/..., /Volumes/...) and pass that path, or name it in "
            "MLflow (models:/<name>/<version>, models:/<name>@<alias>, runs:/<run id>/model)"
        )
    path = urls.local_path(uri)
    for run_dir in (path, path.parent):
        found = _open_run(run_dir, uri=uri)
        if found is not None:
            return found
    if not path.exists():
        raise InputError(f"model {uri!r} does not exist; pass a training run's train.output_dir")
    raise InputError(
        f"{uri!r} is not a petseg model: no {METADATA_FILE} in it or its parent; pass a training run's train.output_dir"
    )


def _open_run(run_dir: Path, *, uri: str) -> ModelArtifact | None:
    """The run in ``run_dir``, None when the folder holds no metadata."""
    meta_file = run_dir / METADATA_FILE
    if not meta_file.is_file():
        return None
    metadata = json.loads(meta_file.read_text())
    model_dir = run_dir / metadata.get("model_path", MODEL_FOLDER)
    if not model_dir.exists():
        raise InputError(f"{meta_file} names the model folder {model_dir}, which does not exist; re-run training")
    return ModelArtifact(uri=uri, run_dir=run_dir, model_dir=model_dir, metadata=metadata, source=uri)


@dataclass(frozen=True)
class LoadedModel:
    """A resolved run with its model loaded, ready to predict."""

    artifact: ModelArtifact
    model: Any
    #: The model as one graph for any batch size (see :func:`_logits_function`).
    logits: Any

    @property
    def image_size(self) -> int:
        return self.artifact.image_size

    @property
    def classes(self) -> list[str]:
        return self.artifact.classes

    def predict_labels(self, images: np.ndarray, *, batch_size: int) -> np.ndarray:
        """Argmax labels (N, S, S) for uint8 (N, S, S, 3) images, ``batch_size`` at a time."""
        from petseg.model.preprocessing import preprocess

        out = []
        for start in range(0, len(images), batch_size):
            batch = np.asarray(preprocess(images[start:start + batch_size], self.artifact.preprocessing), np.float32)
            out.append(np.argmax(np.asarray(self.logits(batch)), axis=-1).astype(np.uint8))
        return np.concatenate(out) if out else np.zeros((0, self.image_size, self.image_size), np.uint8)


#: (exact uri, version) -> the loaded model. Keyed by version, not only by URI: a notebook's Python workers
#: live for hours, and a run retrained into the same folder must be loaded anew, never served as the old.
_CACHE: dict[tuple[str, str], LoadedModel] = {}
_LOCK = threading.Lock()


def load(
    source: "str | MlflowModel", *, threads: int | None = None, version: str | None = None, freeze: bool = False
) -> LoadedModel:
    """Load a run's model once per process and version (Spark reuses Python workers: once per worker).

    Parameters
    ----------
    source
        What :attr:`ModelArtifact.source` holds: a run folder, or an MLflow model the driver pinned.
    threads
        Caps TensorFlow's thread pools, so that each Spark task's TensorFlow uses the cores the task
        was given (``spark.task.cpus``) instead of every core on the node.
    version
        The version the caller expects (what the driver labels rows with); None takes what is there.

    Raises
    ------
    InputError
        When the folder now holds another version than ``version``: the run was replaced while a job
        used it, and its rows would carry the wrong label.
    freeze
        After loading, leave this process's objects out of later garbage collections
        (:func:`_freeze_objects`): for Spark's Python workers, which keep the model as long as they live.
    """
    artifact = resolve(source)  # a small JSON read: cheap beside a task, and it sees a retrained run
    uri = artifact.uri
    if version is not None and artifact.version != version:
        raise InputError(
            f"model {uri!r} is now version {artifact.version}, not {version} as when the job started: it was "
            "retrained while the job ran; re-run the job to use the new model"
        )
    key = (uri, artifact.version)
    with _LOCK:
        if key not in _CACHE:
            from petseg.model.losses import custom_objects
            from petseg.model.unet import keras_module

            with env.quiet_tensorflow_start_up():  # on an executor its stderr is the job's console
                keras = keras_module()
                if threads:
                    _limit_threads(threads)
                # The SavedModel names the metrics it was compiled with (petseg's own classes): without
                # them Keras warns on every load that it cannot restore them, though nothing needs them.
                model = keras.models.load_model(str(artifact.model_dir), compile=False, custom_objects=custom_objects())
            for stale in [k for k in _CACHE if k[0] == uri]:
                del _CACHE[stale]  # an older version of this run: nothing will ask for it again
            _CACHE[key] = LoadedModel(artifact, model, _logits_function(model, artifact.image_size))
            if freeze:
                _freeze_objects()
        return _CACHE[key]


def _freeze_objects() -> None:
    """Collect garbage, then move every object to Python's permanent generation (``gc.freeze``).

    A Python worker that imported TensorFlow and loaded a model tracks millions of objects, which
    every full collection walks: ~0.2 CPU-s each, two per worker in a 4,000-photo run on 2 cores
    (0.8 of the workers' ~11 CPU-s, measured with ``gc.callbacks``). Frozen, they are left out of
    later collections, which walk only what the batches allocate (2 ms each). What an earlier call
    froze is unfrozen first, so that this collection frees the version of a model just dropped from
    the cache, which reference cycles would otherwise keep for the worker's life.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _logits_function(model: Any, image_size: int) -> Any:
    """The model as a graph traced once for every batch size.

    ``predict_on_batch`` traces again for each new batch shape, and every partition ends in a
    smaller batch: seconds per trace for the 5-level U-Net, per Python worker.
    """
    import tensorflow as tf

    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32)
    return tf.function(lambda images: model(images, training=False), input_signature=[spec])


def _limit_threads(threads: int) -> None:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # TensorFlow already ran something in this process (e.g. a local test); its pools stay
