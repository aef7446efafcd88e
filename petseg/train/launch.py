"""The driver side of training: checks, the progress server, and MirroredStrategyRunner."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import SparkSession

from petseg.config import Config, to_dict
from petseg.data.reader import split_stats
from petseg.errors import InputError
from petseg.tracking import flatten, tracked_run
from petseg.train.progress import progress_server

log = logging.getLogger(__name__)

#: Spark confs GPU training needs on a cluster (the runner schedules one barrier task per GPU group).
GPU_CONFS = ("spark.executor.resource.gpu.amount", "spark.task.resource.gpu.amount")


class TrainError(InputError):
    """Training cannot start as configured; the message says what to change."""


@dataclass(frozen=True)
class TrainResult:
    workers: int
    history: list[dict[str, Any]]
    model_dir: str
    outputs: dict[str, str]
    final_metrics: dict[str, Any]
    progress: list[dict[str, Any]] = field(default_factory=list)

    def format(self) -> str:
        m = self.final_metrics
        keys = ["val_pixel_accuracy", "val_mean_iou", "val_iou_pet", "val_iou_background", "val_iou_border"]
        shown = ", ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)
        return (f"train: {len(self.history)} epochs on {self.workers} worker(s); final {shown}\n"
                f"  model: {self.model_dir}\n  outputs: {', '.join(self.outputs.values())}")


def check_gpu_confs(spark: SparkSession) -> None:
    """Raise naming the missing Spark confs when GPU training is asked for on executors."""
    conf = spark.sparkContext.getConf()
    missing = [key for key in GPU_CONFS if not conf.contains(key)]
    master = conf.get("spark.master", "")
    if master.startswith(("spark://", "local-cluster")) and not (
        conf.contains("spark.executor.resource.gpu.discoveryScript") or conf.contains("spark.worker.resource.gpu.discoveryScript")
    ):
        missing.append("spark.executor.resource.gpu.discoveryScript (e.g. conf/gpu/get_gpus_resources.sh)")
    if missing:
        raise TrainError(
            "train.use_gpu=true needs Spark's GPU scheduling, but these confs are not set: " + ", ".join(missing)
            + ". Set them at spark-submit (see README, 'GPUs'), or set train.use_gpu=false"
        )


def run_train(spark: SparkSession, *, cfg: Config) -> TrainResult:
    """Train the U-Net on the ingested dataset with MirroredStrategyRunner and return the history.

    Parameters
    ----------
    spark
        The session whose executors run the workers (or whose driver, with train.local_mode).
    cfg
        A validated config; uses its data, model and train sections.

    Raises
    ------
    TrainError
        Before any training when the dataset is missing, a split has fewer row groups than workers,
        or GPU training lacks Spark's GPU confs.
    """
    from spark_tensorflow_distributor import MirroredStrategyRunner

    t = cfg.train
    try:
        stats = split_stats(cfg.data.dataset)
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot read the dataset at data.dataset={cfg.data.dataset!r} ({exc}); run `petseg ingest` first") from None
    missing = [s for s in ("train", "test") if stats.get(s, (0, 0))[0] == 0]
    if missing:
        raise TrainError(f"the dataset at {cfg.data.dataset} has no rows in split(s) {missing}; re-run ingest")
    if t.use_gpu and not t.local_mode:
        check_gpu_confs(spark)
    # The runner refuses more than one CPU slot in local mode (one process on the driver); GPUs count.
    num_slots = 1 if (t.local_mode and not t.use_gpu) else t.num_slots
    runner = MirroredStrategyRunner(num_slots=num_slots, local_mode=t.local_mode, use_gpu=t.use_gpu,
                                    use_custom_strategy=True)
    workers = 1 if t.local_mode else runner.get_num_tasks()
    for split, (rows, groups) in stats.items():
        if groups < workers:
            raise TrainError(
                f"split {split!r} has {groups} row group(s) but training uses {workers} workers; Petastorm shards by "
                f"row group, so re-run ingest with data.min_row_groups_per_split>={workers} or use train.num_slots<={groups}"
            )
    if t.batch_size % workers:
        raise TrainError(f"train.batch_size={t.batch_size} does not divide over {workers} workers; use a multiple of {workers}")
    spec = {"config": to_dict(cfg), "train_rows": stats["train"][0], "test_rows": stats["test"][0]}
    # Executors reach the driver at spark.driver.host; its sockets listen on spark.driver.bindAddress.
    conf = spark.sparkContext.getConf()
    host = conf.get("spark.driver.host", "127.0.0.1")
    log.info("training on %d worker(s): %d train / %d test rows, global batch %d",
             workers, stats["train"][0], stats["test"][0], t.batch_size)
    from petseg.train.task import train_task

    sections = {name: to_dict(getattr(cfg, name)) for name in ("data", "model", "train")}
    with tracked_run(cfg.mlflow, name="petseg-train", params={**flatten(sections), "workers": workers},
                     tags={"petseg.job": "train"}) as tracked:
        if tracked is not None:
            spec["mlflow_run_id"] = tracked.run_id  # the chief writes it into the model's metadata
        with progress_server(host=host, bind=conf.get("spark.driver.bindAddress", host)) as (address, records):
            result = runner.run(train_task, spec=spec, progress_address=address)
        if tracked is not None:
            tracked.log_history(result["history"])
            tracked.log_artifacts(result["model_dir"], artifact_path="model")
            for path in result["outputs"].values():
                tracked.log_artifacts(path)
    return TrainResult(workers=workers, history=result["history"], model_dir=result["model_dir"],
                       outputs=result["outputs"], final_metrics=result["final_metrics"], progress=list(records))
