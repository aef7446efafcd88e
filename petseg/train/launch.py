"""The driver side of training: checks, the progress server, and MirroredStrategyRunner."""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from pyspark.sql import SparkSession

from petseg import env
from petseg.config import Config, DataConfig, MlflowConfig, ModelConfig, TrainConfig, redact_secrets, to_dict
from petseg.data.reader import dataset_fingerprint, split_stats
from petseg.errors import InputError
from petseg.io import urls
from petseg.io.fs import Storage, storage_for
from petseg.io.publish import verify, writer_lock
from petseg.session import check_gpu_confs
from petseg.tracking import TrackedRun, flatten, tracked_run
from petseg.train import rundir
from petseg.train.progress import progress_server

if TYPE_CHECKING:
    from spark_tensorflow_distributor import MirroredStrategyRunner

    from petseg.model.pyfunc import LoggedModel

log = logging.getLogger(__name__)

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
    #: With MLflow on: the logged model (runs:/<run id>/model) and, if registered, models:/<name>/<version>.
    mlflow_model: str | None = None
    registered_model: str | None = None

    def format(self) -> str:
        m = self.final_metrics
        keys = ["val_pixel_accuracy", "val_mean_iou", "val_iou_pet", "val_iou_background", "val_iou_border"]
        shown = ", ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)
        lines = [f"train: {len(self.history)} epochs on {self.workers} worker(s); final {shown}",
                 f"  run: {self.note}", f"  model: {self.model_dir} (version {self.run_id})"]
        if self.mlflow_model:
            registered = f", registered as {self.registered_model}" if self.registered_model else ""
            lines.append(f"  mlflow: {self.mlflow_model}{registered}")
        lines.append(f"  outputs: {', '.join(self.outputs.values())}")
        return "\n".join(lines)


def dataset_stats(dataset_url: str) -> dict[str, tuple[int, int]]:
    """``split -> (rows, row groups)`` of the dataset training reads, or a :class:`TrainError` that says why not.

    "Run ingest first" only when there is no dataset there: a scheme whose package is missing, or
    storage that refuses access, says so instead.
    """
    ingest_first = "run `petseg ingest` first, or fix data.dataset"
    try:
        stats = split_stats(dataset_url)
    except FileNotFoundError:
        raise TrainError(f"there is no dataset at data.dataset={dataset_url!r}; {ingest_first}") from None
    except ImportError as exc:
        raise TrainError(f"cannot open data.dataset: {exc}") from None
    except (OSError, ValueError) as exc:
        raise TrainError(
            f"cannot read the dataset at data.dataset={dataset_url!r} ({exc}); check the URL and that this driver "
            "may read that storage"
        ) from None
    if not stats:
        raise TrainError(f"data.dataset={dataset_url!r} holds no split=train/ or split=test/ Parquet files; {ingest_first}")
    manifest = verify(dataset_url, kind="dataset", key="data.dataset")  # whole, and one run's files only
    counted = {split: rows for split, (rows, _) in stats.items()}
    if manifest.get("rows") and counted != manifest["rows"]:
        raise TrainError(
            f"the dataset at data.dataset={dataset_url!r} holds {counted} rows per split where its manifest lists "
            f"{manifest['rows']}; re-run ingest into it"
        )
    missing = [s for s in ("train", "test") if stats.get(s, (0, 0))[0] == 0]
    if missing:
        raise TrainError(f"the dataset at {dataset_url} has no rows in split(s) {missing}; re-run ingest")
    return stats


def stored_image_size(dataset_url: str) -> int:
    """The side of the images a dataset stores, from its Unischema (read without petastorm, whichever
    stack wrote it)."""
    from petseg.data.unischema import stored_fields

    try:
        fields = {f.name: f for f in stored_fields(dataset_url)}
    except (OSError, ValueError) as exc:
        raise TrainError(f"data.dataset={dataset_url!r}: {exc}") from None
    if "image" not in fields or len(fields["image"].shape) != 3:
        raise TrainError(f"data.dataset={dataset_url!r} stores no image field of height x width x 3; re-run ingest into it")
    return int(fields["image"].shape[0])


def _image_size(*, data: DataConfig, model: ModelConfig) -> int:
    """The dataset's image size, which training takes; a data.image_size the user set must agree with it."""
    stored = stored_image_size(data.dataset)
    asked = data.image_size
    if asked is not None and asked != stored:
        raise TrainError(
            f"data.image_size={asked} but the dataset at {data.dataset} stores {stored}x{stored} images; leave "
            f"data.image_size unset (null: training takes the dataset's size) or re-ingest with data.image_size={asked}"
        )
    from petseg.model.unet import validate_unet_args  # no TensorFlow import

    try:
        validate_unet_args(image_size=stored, n_depth=model.n_depth, encoder_weights=model.encoder_weights)
    except ValueError as exc:
        raise TrainError(f"the dataset at {data.dataset} stores {stored}x{stored} images: {exc}") from None
    return stored


def check_encoder_weights(*, model: ModelConfig) -> None:
    """Fetch ImageNet weights on the driver, once, before any worker starts: where they cannot be
    downloaded, every barrier task would fail the same way, retried, its message lost among theirs."""
    if model.encoder_weights.strip().lower() != "imagenet":
        return  # a .h5 path was checked with the config; none needs nothing
    from petseg.model.unet import fetch_imagenet_weights

    try:
        with env.quiet_tensorflow_start_up():  # the driver's first TensorFlow import, on its console
            fetch_imagenet_weights()
    except RuntimeError as exc:
        raise TrainError(str(exc)) from None


@dataclass(frozen=True)
class TrainingSections:
    """The config sections training reads: what the workers' job file carries and what makes a run's identity."""

    data: DataConfig
    model: ModelConfig
    train: TrainConfig


def training_spec(cfg: Config | TrainingSections, *, stats: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """What every worker receives (written to its job file): plain data, credentials' values redacted.

    Parameters
    ----------
    cfg
        The sections to ship, each as a plain dict under its name; the workers type their data, model
        and train sections again (:func:`petseg.train.loop.job_sections`).
    stats
        ``split -> (rows, row groups)`` of the dataset, as :func:`dataset_stats` gives it.
    """
    return {"config": redact_secrets(to_dict(cfg)), "train_rows": stats["train"][0], "test_rows": stats["test"][0]}


def run_train(
    spark: SparkSession,
    *,
    data: DataConfig,
    model: ModelConfig,
    train: TrainConfig,
    tracking: MlflowConfig | None = None,
) -> TrainResult:
    """Train the U-Net on the ingested dataset with MirroredStrategyRunner and return the history.

    Parameters
    ----------
    spark
        The session whose executors run the workers (or whose driver, with train.local_mode).
    data, model, train
        The validated sections training reads (``data.dataset``, ``data.image_size``, the model and its recipe).
    tracking
        The ``mlflow`` section: with it enabled, the run's params, history, outputs and model are logged
        (and the model registered if named); None or disabled logs nothing.

    Raises
    ------
    TrainError
        Before any training when the dataset is missing or unreadable, stores another image size than a
        data.image_size set, a split has fewer row groups than workers, GPU training lacks Spark's GPU
        confs, or ImageNet weights cannot be fetched on the driver.
    InputError
        When ``train.output_dir`` holds something other than a petseg run, which publishing would replace.
    TrainStopped
        After ``train.stop_after_epoch``; the unfinished run waits in its working folder.
    """
    from spark_tensorflow_distributor import MirroredStrategyRunner

    stats, sections = _preflight(spark, data=data, model=model, train=train)
    # The runner refuses more than one CPU slot in local mode (one process on the driver); GPUs count.
    num_slots = 1 if (train.local_mode and not train.use_gpu) else train.num_slots
    runner = MirroredStrategyRunner(num_slots=num_slots, local_mode=train.local_mode, use_gpu=train.use_gpu,
                                    use_custom_strategy=True)
    workers = 1 if train.local_mode else runner.get_num_tasks()
    _check_workers(stats, workers=workers, batch_size=train.batch_size)
    storage = storage_for(spark)
    # One run at a time in train.output_dir: two would share its working folder and backup.
    with writer_lock(storage, train.output_dir, key="train.output_dir"):
        identity = rundir.identity(data=sections.data, model=sections.model, train=sections.train,
                                   dataset_fingerprint=dataset_fingerprint(sections.data.dataset))
        run = rundir.open_run(storage, output_dir=train.output_dir, identity=identity)
        log.info("%s", run.note)
        spec = {**training_spec(sections, stats=stats), "work_dir": run.work_dir, "run_id": run.run_id}
        log.info("training on %d worker(s): %d train / %d test rows, global batch %d",
                 workers, stats["train"][0], stats["test"][0], train.batch_size)
        params = {**flatten({name: to_dict(getattr(sections, name)) for name in ("data", "model", "train")}),
                  "workers": workers}
        # tracked_run redacts credentials' values by key, as training_spec does for the workers' job file.
        with tracked_run(tracking, name="petseg-train", params=params, tags={"petseg.job": "train"}) as tracked:
            if tracked is not None:
                spec["mlflow_run_id"] = tracked.run_id  # the chief writes it into the model's metadata
            result, records = _run_workers(spark, runner, spec=spec, restarts=train.max_restarts)
            if "stopped_after_epoch" in result:
                raise TrainStopped(
                    f"stopped after epoch {result['stopped_after_epoch']} as configured (train.stop_after_epoch); run "
                    f"{run.run_id} waits in {run.work_dir}: re-run without train.stop_after_epoch to resume it"
                )
            result = _publish(storage, run, result=result)
            logged = None
            if tracked is not None and tracking is not None:  # tracked_run gives a run only for an enabled section
                logged = _log_to_mlflow(tracked, run=run, result=result,
                                        registered_model_name=tracking.registered_model_name)
        return TrainResult(workers=workers, history=result["history"], model_dir=result["model_dir"],
                           outputs=result["outputs"], final_metrics=result["final_metrics"], progress=records,
                           run_id=run.run_id, note=run.note, mlflow_model=logged and logged.uri,
                           registered_model=logged and logged.registered_uri)


def _preflight(spark: SparkSession, *, data: DataConfig, model: ModelConfig,
               train: TrainConfig) -> tuple[dict[str, tuple[int, int]], TrainingSections]:
    """What the driver checks before it starts a runner: the dataset, its image size, GPU confs, ImageNet weights.

    Returns
    -------
    tuple
        The dataset's ``split -> (rows, row groups)``, and the sections training runs with:
        ``data.image_size`` the dataset's.

    Raises
    ------
    TrainError
        As :func:`run_train` says.
    """
    stats = dataset_stats(data.dataset)
    data = dataclasses.replace(data, image_size=_image_size(data=data, model=model))
    if train.use_gpu and not train.local_mode:
        check_gpu_confs(spark)
    check_encoder_weights(model=model)
    return stats, TrainingSections(data=data, model=model, train=train)


def _check_workers(stats: dict[str, tuple[int, int]], *, workers: int, batch_size: int) -> None:
    """Refuse a split with fewer row groups than workers, or a global batch that does not divide over them."""
    for split, (rows, groups) in stats.items():
        if groups < workers:
            raise TrainError(
                f"split {split!r} has {groups} row group(s) but training uses {workers} workers; Petastorm shards by "
                f"row group, so re-run ingest with data.min_row_groups_per_split>={workers} or use train.num_slots<={groups}"
            )
    if batch_size % workers:
        raise TrainError(f"train.batch_size={batch_size} does not divide over {workers} workers; use a multiple of {workers}")


def _run_workers(spark: SparkSession, runner: MirroredStrategyRunner, *, spec: dict[str, Any],
                 restarts: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run :func:`~petseg.train.task.train_task` on every worker, restarted up to ``restarts`` times.

    Returns
    -------
    tuple
        The chief's result, and the progress records the workers sent the driver while they ran.
    """
    from petseg.train.task import train_task

    # Executors reach the driver at spark.driver.host; its sockets listen on spark.driver.bindAddress.
    conf = spark.sparkContext.getConf()
    host = conf.get("spark.driver.host", "127.0.0.1")
    with progress_server(host=host, bind=conf.get("spark.driver.bindAddress", host)) as (address, records):
        result = _run_with_restarts(lambda: runner.run(train_task, spec=spec, progress_address=address),
                                    restarts=restarts)
    return result, list(records)


def _publish(storage: Storage, run: rundir.RunFolder, *, result: dict[str, Any]) -> dict[str, Any]:
    """Publish the finished run over train.output_dir; ``result`` with its paths where they now are."""
    rundir.publish(storage, run)
    return {**result, "model_dir": run.published(result["model_dir"]),
            "outputs": {k: run.published(v) for k, v in result["outputs"].items()}}


def _log_to_mlflow(tracked: TrackedRun, *, run: rundir.RunFolder, result: dict[str, Any],
                   registered_model_name: str | None) -> LoggedModel:
    """Log the published run to its MLflow run: the history, the model (registered if named), the outputs."""
    from petseg.model.pyfunc import log_model

    tracked.log_history(result["history"])
    logged = log_model(urls.local_path(run.output_dir), run_id=tracked.run_id,
                       registered_model_name=registered_model_name)
    for path in result["outputs"].values():
        tracked.log_artifacts(path)
    return logged


def _run_with_restarts(run: Callable[[], dict[str, Any]], *, restarts: int) -> dict[str, Any]:
    """Call ``run`` (the runner), again after a failure up to ``restarts`` times; each resumes from the backup.

    These are the only retries a run gets. Spark never retries the runner's barrier stage, whatever
    ``spark.task.maxFailures``: it is a ResultStage (a ``collect``), and a failed barrier ResultStage
    aborts the job ("Could not recover from a failed barrier ResultStage", DAGScheduler's
    handleTaskCompletion, in Spark 3.5 and 4.0).
    """
    for attempt in range(restarts + 1):
        try:
            return run()
        except Exception as exc:  # a failed barrier stage reaches the driver as a Py4JJavaError
            if attempt == restarts:
                log.error("training failed: %s, with no restart left (train.max_restarts=%d). The run's working "
                          "folder keeps the last epoch's backup: re-run the job to resume it, or set "
                          "train.max_restarts=N to have the driver restart it N times",
                          _failure_reason(exc), restarts)
                raise
            log.warning("training failed: %s. Spark does not retry a failed barrier stage; restart %d of %d "
                        "resumes from the last epoch's backup", _failure_reason(exc), attempt + 1, restarts)
    raise AssertionError("unreachable")


def _failure_reason(exc: BaseException) -> str:
    """The worker's own line out of a failed barrier stage's Java trace, else the error's first line."""
    text = str(exc)
    found = re.search(r"training worker \d+ of \d+ failed \(exit code -?\d+\)", text)
    return found.group(0) if found else (text.strip().splitlines() or [type(exc).__name__])[0][:300]
