"""The driver side of training: checks, the progress server, and MirroredStrategyRunner."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from pyspark.sql import SparkSession

from petseg.config import Config, to_dict
from petseg.data.reader import dataset_fingerprint, split_stats
from petseg.errors import InputError
from petseg.io.fs import Storage
from petseg.tracking import flatten, tracked_run
from petseg.train import rundir
from petseg.train.progress import progress_server

log = logging.getLogger(__name__)

#: Spark confs GPU training needs on a cluster (the runner schedules one barrier task per GPU group).
GPU_CONFS = ("spark.executor.resource.gpu.amount", "spark.task.resource.gpu.amount")


class TrainError(InputError):
    """Training cannot start as configured; the message says what to change."""


class TrainStopped(TrainError):
    """The run stopped after ``train.stop_after_epoch``, as configured; a re-run without it resumes."""


@dataclass(frozen=True)
class TrainResult:
    workers: int
    history: list[dict[str, Any]]
    model_dir: str
    outputs: dict[str, str]
    final_metrics: dict[str, Any]
    progress: list[dict[str, Any]] = field(default_factory=list)
    run_id: str = ""
    note: str = ""  # how the run began: new, resumed, or after discarding another's unfinished work

    def format(self) -> str:
        m = self.final_metrics
        keys = ["val_pixel_accuracy", "val_mean_iou", "val_iou_pet", "val_iou_background", "val_iou_border"]
        shown = ", ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)
        return (f"train: {len(self.history)} epochs on {self.workers} worker(s); final {shown}\n"
                f"  run: {self.note}\n  model: {self.model_dir} (version {self.run_id})\n"
                f"  outputs: {', '.join(self.outputs.values())}")


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
    InputError
        When ``train.output_dir`` holds something other than a petseg run, which publishing would replace.
    TrainStopped
        After ``train.stop_after_epoch``; the unfinished run waits in its working folder.
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
    run = rundir.open_run(output_dir=t.output_dir,
                          identity=rundir.identity(cfg, dataset_fingerprint=dataset_fingerprint(cfg.data.dataset)))
    log.info("%s", run.note)
    spec = {"config": to_dict(cfg), "train_rows": stats["train"][0], "test_rows": stats["test"][0],
            "work_dir": run.work_dir, "run_id": run.run_id}
    host = spark.sparkContext.getConf().get("spark.driver.host", "127.0.0.1")
    log.info("training on %d worker(s): %d train / %d test rows, global batch %d",
             workers, stats["train"][0], stats["test"][0], t.batch_size)
    from petseg.train.task import train_task

    sections = {name: to_dict(getattr(cfg, name)) for name in ("data", "model", "train")}
    with tracked_run(cfg.mlflow, name="petseg-train", params={**flatten(sections), "workers": workers},
                     tags={"petseg.job": "train"}) as tracked:
        if tracked is not None:
            spec["mlflow_run_id"] = tracked.run_id  # the chief writes it into the model's metadata
        with progress_server(host=host) as (address, records):
            result = _run_with_restarts(lambda: runner.run(train_task, spec=spec, progress_address=address),
                                        restarts=t.max_restarts)
        if "stopped_after_epoch" in result:
            raise TrainStopped(
                f"stopped after epoch {result['stopped_after_epoch']} as configured (train.stop_after_epoch); run "
                f"{run.run_id} waits in {run.work_dir}: re-run without train.stop_after_epoch to resume it"
            )
        rundir.publish(Storage(spark), run)
        result = {**result, "model_dir": run.published(result["model_dir"]),
                  "outputs": {k: run.published(v) for k, v in result["outputs"].items()}}
        if tracked is not None:
            tracked.log_history(result["history"])
            tracked.log_artifacts(result["model_dir"], artifact_path="model")
            for path in result["outputs"].values():
                tracked.log_artifacts(path)
    return TrainResult(workers=workers, history=result["history"], model_dir=result["model_dir"],
                       outputs=result["outputs"], final_metrics=result["final_metrics"], progress=list(records),
                       run_id=run.run_id, note=run.note)


def _run_with_restarts(run: Callable[[], dict[str, Any]], *, restarts: int) -> dict[str, Any]:
    """Call ``run`` (the runner), again after a failure up to ``restarts`` times; each resumes from the backup."""
    for attempt in range(restarts + 1):
        try:
            return run()
        except Exception as exc:  # a failed barrier stage reaches the driver as a Py4JJavaError
            if attempt == restarts:
                raise
            log.warning("training failed (%s); restart %d of %d resumes from the last epoch's backup",
                        _failure_reason(exc), attempt + 1, restarts)
    raise AssertionError("unreachable")


def _failure_reason(exc: BaseException) -> str:
    """The worker's own line out of a failed barrier stage's Java trace, else the error's first line."""
    text = str(exc)
    found = re.search(r"training worker \d+ of \d+ exited with code -?\d+", text)
    return found.group(0) if found else (text.strip().splitlines() or [type(exc).__name__])[0][:300]
