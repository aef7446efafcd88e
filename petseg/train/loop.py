"""The training process of one worker: its data shard, the U-Net under MultiWorkerMirroredStrategy, fit, outputs.

It runs in a process of its own (see :mod:`petseg.train.task`), started with TF_CONFIG set by the
runner, and reads everything else from a JSON job file. Only the chief (worker 0) writes final
outputs; the others save to throwaway folders, as TensorFlow's multi-worker guide requires.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from petseg.config.sections import DataConfig, ModelConfig, Precision, TrainConfig, from_dict, to_dict
from petseg.errors import ConfigError
from petseg.io import urls

if TYPE_CHECKING:
    import tensorflow as tf

    from petseg.data.reader import RowGroup

log = logging.getLogger(__name__)

#: Prefix of lines the task forwards to the driver as progress.
PROGRESS_PREFIX = "petseg-progress "


class StoppedAfterEpoch(RuntimeError):
    """Raised by train.stop_after_epoch after the epoch's backup is written; the run resumes from it."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"stopped after epoch {epoch} as configured (train.stop_after_epoch)")
        self.epoch = epoch


def local_path(url: str) -> Path:
    """A file:// URL (or plain path) as a local path TensorFlow's file APIs can open."""
    if not urls.is_local(url):
        raise ValueError(
            f"train.output_dir={url!r}: training writes through the local file system; use a local path, "
            "a shared mount (NFS, /dbfs, /Volumes) or file:// URL"
        )
    return urls.local_path(url)


def progress(message: str, **fields: Any) -> None:
    """Print a progress line; the task forwards it to the driver's console while training runs."""
    print(PROGRESS_PREFIX + json.dumps({"message": message, **fields}), flush=True)


def main(job_file: str) -> None:
    """Entry point of the training process: run :func:`train` on a job file, write its result next to it."""
    import warnings

    warnings.filterwarnings("ignore", message="Tensorflow will convert all unicode strings", category=UnicodeWarning)
    spec = json.loads(Path(job_file).read_text())
    try:
        result = train(spec)
    except StoppedAfterEpoch as stop:
        # A clean exit, not a failure: a failure would have the driver restart the run
        # (train.max_restarts), and the restart would resume from the backup and train past the stop.
        result = {"rank": spec["rank"], "stopped_after_epoch": stop.epoch}
    Path(spec["result_file"]).write_text(json.dumps(result))


def job_sections(spec: Mapping[str, Any]) -> tuple[DataConfig, ModelConfig, TrainConfig]:
    """The job file's data, model and train sections, typed again as the driver validated them.

    Parameters
    ----------
    spec
        The job file's contents: ``config`` holds each section as :func:`petseg.config.sections.to_dict`
        wrote it on the driver (:func:`petseg.train.launch.training_spec`).

    Raises
    ------
    ConfigError
        When a section is missing, holds a key its class lacks, lacks one of its keys or holds a value of
        the wrong type: the job file was written by another petseg version than this executor's.
    """
    sections = spec.get("config")
    if not isinstance(sections, Mapping):
        raise ConfigError(f"the training job file's config is {sections!r}, not a mapping of sections; install the "
                          "same petseg version on the driver, which writes the job file, and on every executor")
    return (from_dict(DataConfig, sections.get("data"), key="data"),
            from_dict(ModelConfig, sections.get("model"), key="model"),
            from_dict(TrainConfig, sections.get("train"), key="train"))


def train(spec: dict[str, Any]) -> dict[str, Any]:
    """Train on this worker's shard; return the history and, on the chief, the output paths."""
    # First: a job file this petseg cannot read fails here, not after TensorFlow's start-up.
    data, model_cfg, train_cfg = job_sections(spec)
    import tensorflow as tf

    from petseg.model import keras_module, preprocessing_for

    keras_module()  # Keras 3 fails under MultiWorkerMirroredStrategy: insist on tf-keras
    # The run's working folder, chosen by the driver (petseg.train.rundir); published when the run ends.
    output_dir = local_path(spec["work_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)

    tf.keras.utils.set_random_seed(train_cfg.seed)
    if model_cfg.mixed_precision is not Precision.float32:
        tf.keras.mixed_precision.set_global_policy(model_cfg.mixed_precision.value)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    shard = _shard(spec, dataset=str(data.dataset), global_batch=train_cfg.batch_size)
    preprocessing = preprocessing_for(model_cfg.encoder_weights)
    from petseg.env import visible_gpus

    progress(f"worker {shard.rank + 1}/{shard.workers} reads {shard.train_rows} of {spec['train_rows']} train rows"
             f" (CUDA_VISIBLE_DEVICES={visible_gpus()!r}, {len(tf.config.list_physical_devices('GPU'))} GPUs visible)",
             rank=shard.rank, shard_rows=shard.train_rows, cuda_visible_devices=visible_gpus())

    with _datasets(strategy, shard=shard, dataset=str(data.dataset), train=train_cfg,
                   preprocessing=preprocessing) as (training_data, validation_data):
        unet = _compiled_model(strategy, data=data, model=model_cfg, train=train_cfg,
                               steps_per_epoch=shard.steps_per_epoch)
        history_file = output_dir / "history.jsonl"
        # BackupAndRestore: every worker restores from the chief's backup; the others write theirs to
        # temporary folders. A re-run, or a restart by train.max_restarts, resumes after the last epoch,
        # also when it failed after fit: the backup stays until the finished run is published.
        callbacks = _callbacks(chief=shard.chief, epochs=train_cfg.epochs, history_file=history_file,
                               stop_after_epoch=train_cfg.stop_after_epoch)
        start = time.perf_counter()
        unet.fit(
            training_data,
            epochs=train_cfg.epochs,
            steps_per_epoch=shard.steps_per_epoch,
            validation_data=validation_data,
            validation_steps=shard.validation_steps,
            callbacks=callbacks,
            verbose=0,
        )
        seconds = time.perf_counter() - start

    return _save_and_write_outputs(unet, shard=shard, output_dir=output_dir, spec=spec, data=data, model=model_cfg,
                                   train=train_cfg, history=_read_history(history_file),
                                   preprocessing=preprocessing, seconds=seconds)


@dataclass(frozen=True)
class _Shard:
    """This worker's part of the run: its rank, its batch, its steps and its rows."""

    rank: int
    workers: int
    global_batch: int
    steps_per_epoch: int
    validation_steps: int
    #: What each real validation row weighs (see make_validation_dataset).
    validation_weight: float
    #: This worker's train rows.
    train_rows: int
    #: The dataset's row groups, from its Parquet footers.
    row_groups: list[RowGroup]

    @property
    def chief(self) -> bool:
        return self.rank == 0

    @property
    def worker_batch(self) -> int:
        return self.global_batch // self.workers


def _shard(spec: Mapping[str, Any], *, dataset: str, global_batch: int) -> _Shard:
    """This worker's rank, batch, steps and rows, from the job file and the dataset's Parquet footers."""
    from petseg.data.reader import row_group_index, rows_per_shard

    rank, workers = spec["rank"], spec["workers"]
    worker_batch = global_batch // workers
    # The footers, read once here for the counts and both readers (at a million rows, thousands of files).
    row_groups = row_group_index(dataset)
    # Validation scores every test row once: as many steps as the largest shard needs, the others
    # padded with weight-0 images. Real rows weigh (slots / rows), so that Keras's mean loss over all
    # slots, padding included, is the mean over the real rows; ratios (accuracy, IoU) are unchanged.
    test_shards = rows_per_shard(dataset, split="test", shard_count=workers, row_groups=row_groups)
    validation_steps = max(1, -(-max(test_shards) // worker_batch))
    # From the Parquet footers: a count, not the shard's ids, which would take a pass over the shard
    # and megabytes to the driver at a million rows. The training reader checks it every epoch.
    train_rows = rows_per_shard(dataset, split="train", shard_count=workers, row_groups=row_groups)[rank]
    return _Shard(rank=rank, workers=workers, global_batch=global_batch,
                  steps_per_epoch=max(1, spec["train_rows"] // global_batch), validation_steps=validation_steps,
                  validation_weight=validation_steps * global_batch / spec["test_rows"], train_rows=train_rows,
                  row_groups=row_groups)


@contextlib.contextmanager
def _datasets(strategy: Any, *, shard: _Shard, dataset: str, train: TrainConfig,
              preprocessing: str) -> Iterator[tuple[Any, Any]]:
    """This worker's training and validation data, distributed by ``strategy``, while their readers are open."""
    import tensorflow as tf

    from petseg.data.reader import open_split_arrays
    from petseg.train.feed import make_dataset, make_validation_dataset

    seed = train.seed + shard.rank
    with open_split_arrays(dataset, split="train", shard=shard.rank, shard_count=shard.workers, num_epochs=None,
                           shuffle=True, seed=seed, row_groups=shard.row_groups) as train_reader, \
            open_split_arrays(dataset, split="test", shard=shard.rank, shard_count=shard.workers,
                              num_epochs=None, row_groups=shard.row_groups) as val_reader:

        def pipeline(make: Callable[[], tf.data.Dataset]) -> Any:
            def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
                # One input pipeline per worker, and it is this worker's shard of row groups.
                assert ctx.num_input_pipelines == shard.workers and ctx.input_pipeline_id == shard.rank, (
                    ctx.input_pipeline_id, shard.rank)
                assert ctx.get_per_replica_batch_size(shard.global_batch) == shard.worker_batch
                return make()

            return strategy.distribute_datasets_from_function(dataset_fn)

        training_data = pipeline(lambda: make_dataset(
            train_reader, batch_size=shard.worker_batch, preprocessing=preprocessing, training=True,
            shuffle_buffer=train.shuffle_buffer, seed=seed, augmentation=to_dict(train.augment)))
        validation_data = pipeline(lambda: make_validation_dataset(
            val_reader, batch_size=shard.worker_batch, preprocessing=preprocessing, steps=shard.validation_steps,
            weight=shard.validation_weight))
        yield training_data, validation_data


def _compiled_model(strategy: Any, *, data: DataConfig, model: ModelConfig, train: TrainConfig,
                    steps_per_epoch: int) -> Any:
    """The U-Net the config describes, built and compiled in ``strategy``'s scope."""
    from petseg.model import build_unet, make_optimizer, segmentation_loss, segmentation_metrics

    with strategy.scope():
        unet = build_unet(
            image_size=data.image_size,
            n_depth=model.n_depth,
            encoder_weights=model.encoder_weights,
            freeze_encoder=_tristate(model.freeze_encoder),
            encoder_batch_norm=_tristate(model.encoder_batch_norm),
            width=model.width,  # resolved by petseg.config
            batch_norm_momentum=model.batch_norm_momentum,
            seed=train.seed,
        )
        unet.compile(
            optimizer=make_optimizer(
                learning_rate=train.learning_rate,
                warmup_steps=int(train.warmup_epochs * steps_per_epoch),
                total_steps=train.epochs * steps_per_epoch,
            ),
            loss=segmentation_loss(dice_weight=model.dice_weight),
            # Weighted: validation feeds weight-0 padding images (see make_validation_dataset).
            weighted_metrics=segmentation_metrics(),
            jit_compile=model.jit_compile,
        )
    return unet


def _save_and_write_outputs(unet: Any, *, shard: _Shard, output_dir: Path, spec: Mapping[str, Any],
                            data: DataConfig, model: ModelConfig, train: TrainConfig,
                            history: list[dict[str, Any]], preprocessing: str, seconds: float) -> dict[str, Any]:
    """Save the trained ``unet`` and, on the chief, write the run's outputs; return this worker's result."""
    from petseg.model import artifact

    # Saving runs collective ops: every worker must save, the chief to the real place.
    model_dir = (output_dir / artifact.MODEL_FOLDER if shard.chief
                 else Path(tempfile.mkdtemp(prefix=f"petseg-worker{shard.rank}-")))
    unet.save(str(model_dir), include_optimizer=False)
    result: dict[str, Any] = {"rank": shard.rank, "workers": shard.workers, "history": history,
                              "fit_seconds": round(seconds, 2), "steps_per_epoch": shard.steps_per_epoch,
                              "global_batch": shard.global_batch}
    if not shard.chief:
        shutil.rmtree(model_dir, ignore_errors=True)
        return result

    from petseg.train.outputs import write_outputs

    result.update(write_outputs(output_dir=output_dir, spec=spec, data=data, model=model, train=train,
                                history=history, preprocessing=preprocessing))
    progress("training finished", model=str(model_dir), seconds=round(seconds, 1))
    return result


def _tristate(value: str) -> str | bool:
    return {"true": True, "false": False}.get(str(value).lower(), "auto")


def _read_history(path: Path) -> list[dict[str, Any]]:
    """This run's epoch records, one per epoch, in order."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _truncate_history(path: Path, *, epochs: int) -> None:
    """Keep the records of epochs 1..``epochs``, the ones a resumed run restored from its backup."""
    kept = [line for line in _read_history(path) if line["epoch"] <= epochs]
    path.write_text("".join(json.dumps(record) + "\n" for record in kept))


def _callbacks(*, chief: bool, epochs: int, history_file: Path, stop_after_epoch: int | None) -> list:
    """petseg's Keras callbacks (defined here so that TensorFlow is imported only in the training process)."""
    import tensorflow as tf

    class EpochReporter(tf.keras.callbacks.Callback):
        """The chief records each finished epoch to history.jsonl and sends it to the driver."""

        def __init__(self) -> None:
            super().__init__()
            self._started, self._train_seconds, self._first = 0.0, 0.0, True

        def on_test_begin(self, logs: dict | None = None) -> None:
            # fit runs validation through these callbacks: the training part of the epoch ends here.
            self._train_seconds = time.perf_counter() - self._started

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._started = time.perf_counter()
            if self._first and chief:
                # Keep the records of the epochs the backup holds, and only those: an epoch recorded
                # by a worker that died before its backup was written is trained, and recorded, again.
                _truncate_history(history_file, epochs=epoch)
                if epoch > 0:
                    progress(f"resuming from the backup at epoch {epoch + 1}", epoch=epoch + 1)
            self._first = False

        def on_train_end(self, logs: dict | None = None) -> None:
            if self._first and chief:
                # No epoch began: the backup holds the last one, and only saving the model was left
                # (an earlier attempt failed after fit). Keep only the epochs the backup holds.
                _truncate_history(history_file, epochs=epochs)
                progress(f"resuming from the backup: all {epochs} epochs are trained", epochs=epochs)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if not chief:
                return
            metrics = {k: round(float(v), 5) for k, v in (logs or {}).items() if k != "lr"}
            record = {"epoch": epoch + 1, "seconds": round(time.perf_counter() - self._started, 2),
                      "train_seconds": round(self._train_seconds, 2), **metrics}
            with history_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            progress(f"epoch {epoch + 1}/{epochs} {shown}", **record)

    class ShareMovingStatistics(tf.keras.callbacks.Callback):
        """Give every worker the same BatchNormalization statistics before each validation.

        Under MultiWorkerMirroredStrategy each replica keeps its own moving mean and variance (ON_READ
        variables, read as their mean across replicas). Each worker would validate with its own
        copy while the saved model holds the mean; this assigns the mean to every copy, so
        validation scores the model that is saved, and ``petseg evaluate`` finds the same figures.
        """

        def on_test_begin(self, logs: dict | None = None) -> None:
            for layer in self.model.submodules:
                if isinstance(layer, tf.keras.layers.BatchNormalization):
                    for statistic in (layer.moving_mean, layer.moving_variance):
                        statistic.assign(statistic.read_value())  # the read is a collective mean

    class StopAfterEpoch(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            if epoch >= stop_after_epoch:  # resumed from a backup at or past the stop: train nothing
                raise StoppedAfterEpoch(epoch)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if epoch + 1 == stop_after_epoch:
                raise StoppedAfterEpoch(epoch + 1)

    # Order matters: an epoch is recorded, then backed up, then StopAfterEpoch may end the run.
    callbacks = [ShareMovingStatistics(), EpochReporter(),
                 _backup_and_restore(backup_dir=history_file.parent / "backup")]
    if stop_after_epoch:
        callbacks.append(StopAfterEpoch())
    return callbacks


def _backup_and_restore(*, backup_dir: Path) -> Any:
    """tf-keras's ``BackupAndRestore`` callback, its backup kept when ``fit`` ends.

    Parameters
    ----------
    backup_dir
        The run's ``backup/`` folder, in its working folder.

    Returns
    -------
    tf.keras.callbacks.BackupAndRestore
        With ``delete_checkpoint=False``: by default its ``on_train_end`` deletes the chief's backup
        (``WorkerTrainingState.delete_backup``, tf_keras/src/callbacks.py in tf-keras 2.21) as ``fit``
        returns, before the model is saved and the outputs are written. An attempt that failed there,
        or lost a worker in the collective save, would leave the next one no backup, and it would train
        every epoch again; kept, the next attempt restores the last epoch and trains none.
        :func:`petseg.train.rundir.publish` deletes ``backup/`` once the run is finished.
    """
    import tensorflow as tf

    return tf.keras.callbacks.BackupAndRestore(backup_dir=str(backup_dir), delete_checkpoint=False)
