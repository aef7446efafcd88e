"""The evaluation job: how well a trained model segments a labelled split of an ingested dataset.

Each task returns one confusion matrix, summed across executors; pixel accuracy and IoUs follow from it.
A row that cannot be used (an image over ``data.max_image_pixels``, undecodable bytes) is counted by
reason and left out of the matrix, as inference gives it an error row.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StringType, StructField, StructType

from petseg.config import EvaluateConfig, MlflowConfig
from petseg.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from petseg.data.schema import SPLIT
from petseg.env import prepare_task_environment
from petseg.errors import InputError, RejectedInput
from petseg.io.fs import storage_for
from petseg.io.publish import atomic_output, check_replaceable, verify
from petseg.model import artifact
from petseg.session import check_gpu_task_slots, task_cpus

if TYPE_CHECKING:
    from petseg.model.registry import MlflowModel

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.png"


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) pixel counts, rows the true class, columns the predicted one."""
    flat = true.astype(np.int64).ravel() * n_classes + predicted.astype(np.int64).ravel()
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


@dataclass(frozen=True)
class Metrics:
    classes: list[str]
    confusion: list[list[int]]
    pixel_accuracy: float
    iou: dict[str, float | None]  # None for a class absent from both truth and prediction
    mean_iou: float

    @classmethod
    def from_confusion(cls, confusion: np.ndarray, classes: list[str]) -> "Metrics":
        confusion = np.asarray(confusion, dtype=np.int64)
        hits = np.diag(confusion)
        union = confusion.sum(axis=0) + confusion.sum(axis=1) - hits
        iou = {name: (float(hits[k] / union[k]) if union[k] else None) for k, name in enumerate(classes)}
        present = [v for v in iou.values() if v is not None]
        return cls(
            classes=list(classes),
            confusion=confusion.tolist(),
            pixel_accuracy=float(hits.sum() / max(1, confusion.sum())),
            iou=iou,
            mean_iou=float(np.mean(present)) if present else 0.0,
        )


@dataclass(frozen=True)
class EvaluationReport:
    model_uri: str
    model_version: str
    dataset: str
    split: str
    images: int
    pixels: int
    metrics: Metrics
    output: str
    seconds: float
    failed: dict[str, int] = field(default_factory=dict)  # reason -> rows left out of the metrics

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def format(self) -> str:
        m = self.metrics
        lines = [
            f"evaluate: {self.images} {self.split} images, {self.pixels} pixels",
            *[f"  failed  {reason:<28} {n:>8}" for reason, n in sorted(self.failed.items())],
            f"  model:   {self.model_uri} (version {self.model_version})",
            f"  {'class':<16} {'IoU':>7}",
        ]
        lines += [f"  {name:<16} {'n/a' if v is None else f'{v:.3f}':>7}" for name, v in m.iou.items()]
        lines += [f"  {'mean IoU':<16} {m.mean_iou:>7.3f}", f"  {'pixel accuracy':<16} {m.pixel_accuracy:>7.3f}"]
        lines.append("  confusion (rows true, columns predicted): " + json.dumps(m.confusion))
        lines.append(f"  output:  {self.output}")
        return "\n".join(lines)


def _confusion_columns(n_classes: int) -> list[str]:
    return [f"c{t}{p}" for t in range(n_classes) for p in range(n_classes)]


def _confusion_per_partition(
    model: "str | MlflowModel", *, version: str, batch_size: int, n_classes: int, threads: int, max_image_pixels: int
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """Per task: one row (reason null) with the images measured and their confusion matrix, and one
    row per reason with the rows that could not be used."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from petseg.data.decode import decode_for_model, decode_label_mask, resize_mask

        prepare_task_environment()  # before the load imports TensorFlow
        loaded = artifact.load(model, threads=threads, version=version, freeze=True)
        total, images, failed = np.zeros((n_classes, n_classes), np.int64), 0, Counter()
        for batch in batches:
            pixels, masks = [], []
            for image, mask in zip(batch["image"], batch["mask"]):
                try:
                    decoded = decode_for_model(image, size=loaded.image_size, max_pixels=max_image_pixels)[0]
                    labels = decode_label_mask(mask, max_pixels=max_image_pixels)
                    if labels.size and labels.max() >= n_classes:
                        raise RejectedInput("mask_values_out_of_range",
                                            f"the mask holds label {labels.max()}; the model has {n_classes} classes")
                except RejectedInput as exc:
                    failed[exc.reason] += 1
                    continue
                pixels.append(decoded)
                masks.append(labels)
            if not pixels:
                continue
            for mask, labels in zip(masks, loaded.predict_labels(np.stack(pixels), batch_size=batch_size)):
                # Measured at the dataset's resolution, where its masks were made.
                labels = labels if labels.shape == mask.shape else resize_mask(labels, mask.shape)
                total += confusion_matrix(mask, labels, n_classes)
            images += len(pixels)
        zeros = [0] * (n_classes * n_classes)
        rows = [[None, images, *total.ravel().tolist()]] + [[reason, n, *zeros] for reason, n in failed.items()]
        yield pd.DataFrame(rows, columns=["reason", "images", *_confusion_columns(n_classes)])

    return run


def run_evaluate(
    spark: SparkSession,
    *,
    evaluate: EvaluateConfig,
    tracking: MlflowConfig | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> EvaluationReport:
    """Measure ``evaluate.model`` on the ``evaluate.split`` of an ingested dataset.

    Each task predicts its rows and returns one confusion matrix; Spark sums them (a partial sum per
    executor, then one on the driver). The report is written to ``<output>/metrics.json`` with, if
    ``evaluate.preview_images`` > 0, a predictions grid in ``<output>/predictions.png``. Rows that
    cannot be used (an image or mask over ``max_image_pixels``, undecodable bytes) are counted per
    reason in ``failed`` and left out of the metrics. ``evaluate.model`` may name an MLflow model
    (``models:/...``, ``runs:/...``) on the servers ``tracking`` names; the report gives the exact one.

    Raises
    ------
    InputError
        When the model is missing or not a petseg model, the dataset or split is missing or empty, or
        no row of the split could be used.
    """
    start = time.perf_counter()
    model = artifact.resolve(str(evaluate.model), tracking_uri=tracking.tracking_uri if tracking else None,
                             registry_uri=tracking.registry_uri if tracking else None)
    check_gpu_task_slots(spark.conf)  # each task's model on its own GPU, as in inference
    classes = model.classes
    dataset, split = str(evaluate.dataset), evaluate.split
    storage = storage_for(spark)
    check_replaceable(storage, str(evaluate.output), kind="evaluation", key="evaluate.output")
    if not storage.exists(f"{dataset.rstrip('/')}/{SPLIT}={split}"):
        raise InputError(
            f"evaluate.dataset={dataset!r} has no {SPLIT}={split} folder; point it at a dataset written by "
            "`petseg ingest` (or set evaluate.split)"
        )
    verify(dataset, kind="dataset", key="evaluate.dataset")  # whole, and one run's files only
    rows = spark.read.parquet(dataset).where(F.col(SPLIT) == split).select("id", "image", "mask")
    threads = task_cpus(spark)
    columns = _confusion_columns(len(classes))
    schema = StructType([StructField("reason", StringType(), True)]
                        + [StructField(name, LongType(), False) for name in ["images", *columns]])
    per_partition = rows.mapInPandas(
        _confusion_per_partition(model.source, version=model.version, batch_size=evaluate.batch_size,
                                 n_classes=len(classes), threads=threads, max_image_pixels=max_image_pixels),
        schema,
    )
    sums = {r["reason"]: r for r in per_partition.groupBy("reason").agg(
        *[F.sum(c).alias(c) for c in ["images", *columns]]).collect()}
    failed = {reason: int(r["images"]) for reason, r in sums.items() if reason is not None}
    images = int(sums[None]["images"]) if None in sums else 0
    if not images:
        if failed:
            raise InputError(
                f"no row of the {split} split of {dataset} could be evaluated (failed: {failed}); "
                "see the reasons in the `petseg infer` error column of these rows, and re-ingest or raise the limit"
            )
        raise InputError(f"the {split} split of {dataset} has no rows; re-run ingest or choose another evaluate.split")
    confusion = np.array([int(sums[None][c]) for c in columns], np.int64).reshape(len(classes), len(classes))
    report = EvaluationReport(
        model_uri=model.uri,
        model_version=model.version,
        dataset=dataset,
        split=split,
        images=images,
        pixels=int(confusion.sum()),
        metrics=Metrics.from_confusion(confusion, classes),
        output=str(evaluate.output),
        seconds=round(time.perf_counter() - start, 2),
        failed=failed,
    )
    preview = _preview(rows, evaluate, model=model, max_image_pixels=max_image_pixels) \
        if evaluate.preview_images else None
    with atomic_output(storage, str(evaluate.output), kind="evaluation", key="evaluate.output") as staged:
        storage.write_bytes(f"{staged.url}/{METRICS_FILE}", report.to_json().encode())
        if preview is not None:
            storage.write_bytes(f"{staged.url}/{PREDICTIONS_FILE}", preview)
        staged.rows = {"images": images, **failed}
    log.info("evaluate wrote %s", evaluate.output)
    return report


def _preview(
    rows: DataFrame, evaluate: EvaluateConfig, *, model: artifact.ModelArtifact, max_image_pixels: int
) -> bytes | None:
    """The predictions grid for the usable rows among the first ``preview_images``, predicted on the
    driver (None when none is usable)."""
    from petseg.data.decode import decode_for_model, decode_label_mask
    from petseg.plots import predictions_png

    loaded = artifact.load(model.source, version=model.version)
    sample, images, masks = [], [], []
    for r in rows.orderBy("id").limit(evaluate.preview_images).collect():
        try:
            image = decode_for_model(r["image"], size=loaded.image_size, max_pixels=max_image_pixels)[0]
            mask = decode_label_mask(r["mask"], max_pixels=max_image_pixels)
        except RejectedInput:
            continue  # counted in the report already
        sample, images, masks = sample + [r], images + [image], masks + [mask]
    if not sample:
        return None
    images, masks = np.stack(images), np.stack(masks)
    predicted = loaded.predict_labels(images, batch_size=evaluate.batch_size)
    return predictions_png([r["id"] for r in sample], images, masks, predicted)
