"""The training process of one worker: its data shard, the U-Net under MultiWorkerMirroredStrategy, fit, outputs.

It runs in a process of its own (see :mod:`petseg.train.task`), started with TF_CONFIG set by the
runner, and reads everything else from a JSON job file. Only the chief (worker 0) writes final
outputs; the others save to throwaway folders, as TensorFlow's multi-worker guide requires.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from petseg.io import urls

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


def train(spec: dict[str, Any]) -> dict[str, Any]:
    """Train on this worker's shard; return the history and, on the chief, the output paths."""
    import tensorflow as tf

    from petseg.data.reader import open_split_arrays, row_group_index, rows_per_shard
    from petseg.model import (
        artifact,
        build_unet,
        keras_module,
        make_optimizer,
        preprocessing_for,
        segmentation_loss,
        segmentation_metrics,
    )
    from petseg.train.feed import make_dataset, make_validation_dataset

    keras_module()  # Keras 3 fails under MultiWorkerMirroredStrategy: insist on tf-keras
    data, model_cfg, train_cfg = spec["config"]["data"], spec["config"]["model"], spec["config"]["train"]
    rank, workers = spec["rank"], spec["workers"]
    chief = rank == 0
    # The run's working folder, chosen by the driver (petseg.train.rundir); published when the run ends.
    output_dir = local_path(spec["work_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)

    tf.keras.utils.set_random_seed(train_cfg["seed"])
    if model_cfg["mixed_precision"] != "float32":
        tf.keras.mixed_precision.set_global_policy(model_cfg["mixed_precision"])
    strategy = tf.distribute.MultiWorkerMirroredStrategy()

    global_batch = train_cfg["batch_size"]
    worker_batch = global_batch // workers
    steps_per_epoch = max(1, spec["train_rows"] // global_batch)
    # The footers, read once here for the counts and both readers (at a million rows, thousands of files).
    row_groups = row_group_index(data["dataset"])
    # Validation scores every test row once: as many steps as the largest shard needs, the others
    # padded with weight-0 images. Real rows weigh (slots / rows), so that Keras's mean loss over all
    # slots, padding included, is the mean over the real rows; ratios (accuracy, IoU) are unchanged.
    test_shards = rows_per_shard(data["dataset"], split="test", shard_count=workers, row_groups=row_groups)
    validation_steps = max(1, -(-max(test_shards) // worker_batch))
    validation_weight = validation_steps * global_batch / spec["test_rows"]
    preprocessing = preprocessing_for(model_cfg["encoder_weights"])
    seed = train_cfg["seed"] + rank
    # From the Parquet footers: a count, not the shard's ids, which would take a pass over the shard
    # and megabytes to the driver at a million rows. The training reader checks it every epoch.
    shard_rows = rows_per_shard(data["dataset"], split="train", shard_count=workers, row_groups=row_groups)[rank]
    from petseg.env import visible_gpus

    progress(f"worker {rank + 1}/{workers} reads {shard_rows} of {spec['train_rows']} train rows"
             f" (CUDA_VISIBLE_DEVICES={visible_gpus()!r}, {len(tf.config.list_physical_devices('GPU'))} GPUs visible)",
             rank=rank, shard_rows=shard_rows, cuda_visible_devices=visible_gpus())

    with open_split_arrays(data["dataset"], split="train", shard=rank, shard_count=workers, num_epochs=None,
                           shuffle=True, seed=seed, row_groups=row_groups) as train_reader, \
            open_split_arrays(data["dataset"], split="test", shard=rank, shard_count=workers,
                              num_epochs=None, row_groups=row_groups) as val_reader:

        def pipeline(make):
            def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
                # One input pipeline per worker, and it is this worker's shard of row groups.
                assert ctx.num_input_pipelines == workers and ctx.input_pipeline_id == rank, (ctx.input_pipeline_id, rank)
                assert ctx.get_per_replica_batch_size(global_batch) == worker_batch
                return make()

            return strategy.distribute_datasets_from_function(dataset_fn)

        training_data = pipeline(lambda: make_dataset(
            train_reader, batch_size=worker_batch, preprocessing=preprocessing, training=True,
            shuffle_buffer=train_cfg["shuffle_buffer"], seed=seed, augmentation=train_cfg["augment"]))
        validation_data = pipeline(lambda: make_validation_dataset(
            val_reader, batch_size=worker_batch, preprocessing=preprocessing, steps=validation_steps,
            weight=validation_weight))

        with strategy.scope():
            model = build_unet(
                image_size=data["image_size"],
                n_depth=model_cfg["n_depth"],
                encoder_weights=model_cfg["encoder_weights"],
                freeze_encoder=_tristate(model_cfg["freeze_encoder"]),
                encoder_batch_norm=_tristate(model_cfg["encoder_batch_norm"]),
                width=model_cfg["width"],  # resolved by petseg.config
                batch_norm_momentum=model_cfg["batch_norm_momentum"],
                seed=train_cfg["seed"],
            )
            model.compile(
                optimizer=make_optimizer(
                    learning_rate=train_cfg["learning_rate"],
                    warmup_steps=int(train_cfg["warmup_epochs"] * steps_per_epoch),
                    total_steps=train_cfg["epochs"] * steps_per_epoch,
                ),
                loss=segmentation_loss(dice_weight=model_cfg["dice_weight"]),
                # Weighted: validation feeds weight-0 padding images (see make_validation_dataset).
                weighted_metrics=segmentation_metrics(),
                jit_compile=model_cfg["jit_compile"],
            )

        history_file = output_dir / "history.jsonl"
        # BackupAndRestore: every worker restores from the chief's backup; the others write theirs to
        # temporary folders. A re-run, or a restart by train.max_restarts, resumes after the last epoch,
        # also when it failed after fit: the backup stays until the finished run is published.
        callbacks = _callbacks(chief=chief, epochs=train_cfg["epochs"], history_file=history_file,
                               stop_after_epoch=train_cfg.get("stop_after_epoch"))
        start = time.perf_counter()
        model.fit(
            training_data,
            epochs=train_cfg["epochs"],
            steps_per_epoch=steps_per_epoch,
            validation_data=validation_data,
            validation_steps=validation_steps,
            callbacks=callbacks,
            verbose=0,
        )
        seconds = time.perf_counter() - start

    history = _read_history(history_file)
    # Saving runs collective ops: every worker must save, the chief to the real place.
    model_dir = output_dir / artifact.MODEL_FOLDER if chief else Path(tempfile.mkdtemp(prefix=f"petseg-worker{rank}-"))
    model.save(str(model_dir), include_optimizer=False)
    result: dict[str, Any] = {"rank": rank, "workers": workers, "history": history, "fit_seconds": round(seconds, 2),
                              "steps_per_epoch": steps_per_epoch, "global_batch": global_batch}
    if not chief:
        shutil.rmtree(model_dir, ignore_errors=True)
        return result

    from petseg.train.outputs import write_outputs

    result.update(write_outputs(output_dir=output_dir, spec=spec, history=history, preprocessing=preprocessing))
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
