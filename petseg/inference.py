"""Segmenting images with an exported petseg model: loading it once per process, and one batch at a time.

The Spark UDF of the inference job calls :func:`segment_images` on each Arrow batch; the same
decoding (:mod:`petseg.images`) and preprocessing (:mod:`petseg.model.preprocessing`) as training,
driven by the model's metadata JSON.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from petseg.images import RejectedInput, decode_for_model, resize_mask
from petseg.sources import InputError
from petseg.train.outputs import METADATA_FILE


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    metadata: dict[str, Any]
    uri: str

    @property
    def image_size(self) -> int:
        return int(self.metadata["image_size"])

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])


def resolve_model(uri: str) -> tuple[Path, dict[str, Any]]:
    """The model folder and metadata of a training run (its output dir, or the model folder in it).

    Raises
    ------
    InputError
        When the path does not exist or holds no petseg metadata.
    """
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


def load_model(uri: str) -> LoadedModel:
    """Load a run's model once per process (Spark reuses Python workers, so once per worker)."""
    with _LOCK:
        if uri not in _CACHE:
            model_dir, metadata = resolve_model(uri)
            from petseg.model import keras_module

            keras = keras_module()
            _CACHE[uri] = LoadedModel(keras.models.load_model(str(model_dir), compile=False), metadata, uri)
        return _CACHE[uri]


@dataclass(frozen=True)
class Segmentation:
    mask: np.ndarray | None  # (H, W) labels at the original resolution
    mask_model: np.ndarray | None  # (S, S) labels at the model's resolution
    fractions: tuple[float, ...] | None
    error: str | None


def predict_labels(loaded: LoadedModel, images: np.ndarray, *, batch_size: int) -> np.ndarray:
    """Argmax labels for uint8 (N, S, S, 3) images, ``batch_size`` at a time."""
    from petseg.model.preprocessing import preprocess

    out = []
    for start in range(0, len(images), batch_size):
        logits = loaded.model(preprocess(images[start:start + batch_size], loaded.metadata["preprocessing"]), training=False)
        out.append(np.argmax(np.asarray(logits), axis=-1).astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, loaded.image_size, loaded.image_size), np.uint8)


def segment_images(loaded: LoadedModel, encoded: Sequence[bytes | None], *, batch_size: int) -> list[Segmentation]:
    """Segment encoded images; a bad one gets an error instead of a mask, and the rest go on."""
    size, n_classes = loaded.image_size, len(loaded.classes)
    results: list[Segmentation | None] = [None] * len(encoded)
    ready, shapes, index = [], [], []
    for i, data in enumerate(encoded):
        try:
            image, shape = decode_for_model(data, size=size)
        except RejectedInput as exc:
            results[i] = Segmentation(None, None, None, f"{exc.reason}: {exc.detail}")
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
