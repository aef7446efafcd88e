"""Segmenting images with an exported petseg model: loading it once per process, and one batch at a time.

The Spark UDF of the inference job calls :func:`segment_images` on each Arrow batch; the same
decoding (:mod:`petseg.images`) and preprocessing (:mod:`petseg.model.preprocessing`) as training,
driven by the model's metadata JSON.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from petseg.data.decode import decode_for_model, resize_mask
from petseg.errors import InputError, RejectedInput
from petseg.train.outputs import METADATA_FILE


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    metadata: dict[str, Any]
    uri: str
    #: The model as one graph for any batch size (see :func:`logits_function`).
    logits: Any

    @property
    def image_size(self) -> int:
        return int(self.metadata["image_size"])

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])


def model_version(metadata: dict[str, Any]) -> str:
    """The run id training wrote, or (for runs older than run ids) a digest of the metadata."""
    if metadata.get("run_id"):
        return str(metadata["run_id"])
    return "sha1-" + hashlib.sha1(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:16]


def resolve_model(uri: str) -> tuple[Path, dict[str, Any]]:
    """The model folder and metadata of a training run (its output dir, or the model folder in it).

    Raises
    ------
    InputError
        When the path does not exist or holds no petseg metadata.
    """
    if "://" in uri and not uri.startswith("file://"):
        raise InputError(
            f"model {uri!r} is not a local path; TensorFlow loads models from files, so put the run on "
            "storage every executor mounts (NFS, /dbfs/..., /Volumes/...) and pass that path"
        )
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    for run_dir in (path, path.parent):
        meta_file = run_dir / METADATA_FILE
        if meta_file.is_file():
            metadata = json.loads(meta_file.read_text())
            model_dir = run_dir / metadata.get("model_path", "model")
            if not model_dir.exists():
                raise InputError(f"{meta_file} names the model folder {model_dir}, which does not exist; re-run training")
            return model_dir, metadata
    if not path.exists():
        raise InputError(f"model {uri!r} does not exist; pass a training run's train.output_dir")
    raise InputError(
        f"{uri!r} is not a petseg model: no {METADATA_FILE} in it or its parent; pass a training run's train.output_dir"
    )


_CACHE: dict[str, LoadedModel] = {}
_LOCK = threading.Lock()


def load_model(uri: str, *, threads: int | None = None) -> LoadedModel:
    """Load a run's model once per process (Spark reuses Python workers, so once per worker).

    ``threads`` caps TensorFlow's thread pools, so that each Spark task's TensorFlow uses the cores
    the task was given (``spark.task.cpus``) instead of every core on the node.
    """
    with _LOCK:
        if uri not in _CACHE:
            model_dir, metadata = resolve_model(uri)
            from petseg.model import keras_module

            keras = keras_module()
            if threads:
                _limit_threads(threads)
            model = keras.models.load_model(str(model_dir), compile=False)
            _CACHE[uri] = LoadedModel(model, metadata, uri, logits_function(model, int(metadata["image_size"])))
        return _CACHE[uri]


def logits_function(model: Any, image_size: int) -> Any:
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


@dataclass(frozen=True)
class Segmentation:
    mask: np.ndarray | None  # (H, W) labels at the original resolution
    mask_model: np.ndarray | None  # (S, S) labels at the model's resolution
    fractions: tuple[float, ...] | None
    error: str | None

    @classmethod
    def rejected(cls, exc: RejectedInput) -> "Segmentation":
        """No mask; the error column reads ``<reason>: <detail>``."""
        return cls(None, None, None, str(exc))


def predict_labels(loaded: LoadedModel, images: np.ndarray, *, batch_size: int) -> np.ndarray:
    """Argmax labels for uint8 (N, S, S, 3) images, ``batch_size`` at a time."""
    from petseg.model.preprocessing import preprocess

    out = []
    for start in range(0, len(images), batch_size):
        batch = np.asarray(preprocess(images[start:start + batch_size], loaded.metadata["preprocessing"]), np.float32)
        out.append(np.argmax(np.asarray(loaded.logits(batch)), axis=-1).astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, loaded.image_size, loaded.image_size), np.uint8)


def _output_size(height: int, width: int) -> tuple[int, int]:
    if height < 1 or width < 1:
        raise RejectedInput("size_invalid", f"the row's height={height} and width={width} must be positive")
    return int(height), int(width)


def segment_images(
    loaded: LoadedModel,
    encoded: Sequence[bytes | None],
    *,
    batch_size: int,
    sizes: Sequence[tuple[int, int] | None] | None = None,
) -> list[Segmentation]:
    """Segment encoded images; a bad one gets an error instead of a mask, and the rest go on.

    Parameters
    ----------
    encoded
        Image files' bytes (any format Pillow reads) or raw arrays as petseg's raw codec stores them.
    sizes
        (height, width) to return each mask at, where the bytes are not the original image (a
        dataset's resized images keep their original size in columns); None: the decoded size.
    """
    size, n_classes = loaded.image_size, len(loaded.classes)
    results: list[Segmentation | None] = [None] * len(encoded)
    ready, shapes, index = [], [], []
    for i, data in enumerate(encoded):
        try:
            image, shape = decode_for_model(data, size=size)
            if sizes is not None and sizes[i] is not None:
                shape = _output_size(*sizes[i])
        except RejectedInput as exc:
            results[i] = Segmentation.rejected(exc)
            continue
        ready.append(image)
        shapes.append(shape)
        index.append(i)
    if ready:
        labels = predict_labels(loaded, np.stack(ready), batch_size=batch_size)
        for i, shape, mask_model in zip(index, shapes, labels):
            mask = resize_mask(mask_model, shape)
            counts = np.bincount(mask.ravel(), minlength=n_classes)[:n_classes]
            results[i] = Segmentation(mask, mask_model, tuple((counts / max(1, mask.size)).tolist()), None)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]
