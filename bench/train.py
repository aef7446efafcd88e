"""Training throughput: the runner with one worker, plain model.fit, and the dataset readers alone. Prints JSON.

All three use the same ingested synthetic dataset. The runner and the plain fit train the same model
with the same batch and image size, each in one TensorFlow process; the runner's figure is its
second epoch (the first includes start-up), and the plain fit's is its second epoch too.

    python bench/train.py [--count 512] [key=value ...]      (defaults: conf/local.yaml, the demo's model)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from petseg import config, env
from petseg.model.artifact import versions

PLAIN_FIT = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from petseg.model import build_unet, keras_module, make_optimizer, preprocess, preprocessing_for
    from petseg.model import segmentation_loss, segmentation_metrics
    from petseg.data.reader import open_split_arrays
    from petseg.train.augment import augment
    import tensorflow as tf

    spec = json.loads(sys.argv[1])
    keras_module()
    with open_split_arrays(spec["dataset"], split="train") as reader:
        groups = list(reader)
    images = np.concatenate([i for i, _ in groups]); masks = np.concatenate([m for _, m in groups]).astype("int32")
    prep = preprocessing_for(spec["encoder_weights"])
    # The same per-example work as the runner's pipeline: its augmentation, then preprocessing.
    ds = (tf.data.Dataset.from_tensor_slices((images, masks)).cache().shuffle(1000).repeat()
          .map(lambda i, m: augment(i, m, **spec["augment"]), num_parallel_calls=tf.data.AUTOTUNE)
          .map(lambda i, m: (preprocess(i, prep), m)).batch(spec["batch"], drop_remainder=True)
          .prefetch(tf.data.AUTOTUNE))
    steps = len(images) // spec["batch"]
    model = build_unet(image_size=spec["size"], n_depth=spec["n_depth"], encoder_weights=spec["encoder_weights"],
                       width=spec["width"], batch_norm_momentum=spec["batch_norm_momentum"])
    model.compile(optimizer=make_optimizer(learning_rate=1e-3, warmup_steps=steps, total_steps=2 * steps),
                  loss=segmentation_loss(), metrics=segmentation_metrics())
    times = []
    class Timer(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None): self.t = time.perf_counter()
        def on_epoch_end(self, epoch, logs=None): times.append(time.perf_counter() - self.t)
    model.fit(ds, epochs=2, steps_per_epoch=steps, callbacks=[Timer()], verbose=0)
    print("RESULT " + json.dumps({"images_per_s": steps * spec["batch"] / times[-1]}))
    """
)


def reader_rate(dataset: str, *, batch: int) -> dict[str, float]:
    """Images/s of training's reader into batched tf.data and, where petastorm runs, of petastorm's row reader.

    Training reads with petseg's ArrayReader (whole row groups, decoded column-wise); petastorm's
    make_reader, which open_split wraps, is the reference, alone and stacked into the same tf.data,
    on the stacks where petastorm runs (pyarrow < 15). One reader each, after a warm-up pass, so
    TensorFlow's import and tracing are not timed; each counts its rows against the split's.
    """
    import importlib.util

    import pyarrow
    import tensorflow as tf  # noqa: F401 - imported before timing

    from petseg.data.reader import make_tf_dataset, open_split, open_split_arrays

    with open_split_arrays(dataset, split="train") as reader:
        for _ in make_tf_dataset(reader).batch(batch).take(2):
            pass
    with open_split_arrays(dataset, split="train") as reader:
        start, m = time.perf_counter(), 0
        for images, _ in make_tf_dataset(reader).batch(batch):
            m += int(images.shape[0])
        tf_rate = m / (time.perf_counter() - start)
        expected = reader.rows_per_epoch
    if m != expected:
        raise SystemExit(f"reader bench: read {m} of {expected} train rows")
    rates = {"reader_tf_data_images_per_s": round(tf_rate, 1)}
    if int(pyarrow.__version__.split(".")[0]) >= 15 or importlib.util.find_spec("petastorm") is None:
        return rates
    with open_split(dataset, split="train", fields=("image", "mask"), workers_count=1) as reader:
        start = time.perf_counter()
        n = sum(1 for _ in reader)
        python_rate = n / (time.perf_counter() - start)
    with open_split(dataset, split="train", fields=("image", "mask"), workers_count=1) as reader:
        start, k = time.perf_counter(), 0
        for images, _ in make_tf_dataset(reader).batch(batch):
            k += int(images.shape[0])
        rows_tf_rate = k / (time.perf_counter() - start)
    if {n, k} != {expected}:
        raise SystemExit(f"reader bench: petastorm read {n} and {k} of {expected} train rows")
    return {**rates, "petastorm_rows_python_images_per_s": round(python_rate, 1),
            "petastorm_rows_tf_data_images_per_s": round(rows_tf_rate, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=512, help="synthetic pets to train on (80%% train)")
    parser.add_argument("--reader-count", type=int, default=2500, help="128x128 pets for the reader figures")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    env.prepare_process_environment(master="local[2]")  # TF_USE_LEGACY_KERAS before any TensorFlow import

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.parse_job_arguments(
            [f"data.dataset={Path(tmp) / 'pets'}", f"train.output_dir={Path(tmp) / 'run'}",
             f"data.synthetic_count={args.count}", "spark.master=local[2]", "train.num_slots=1", "train.epochs=2",
             "train.preview_images=0", *args.overrides],
            local=True, job="demo",
        )
        from petseg.ingest.convert import run_ingest
        from petseg.session import get_or_create
        from petseg.train import run_train

        spark = get_or_create(**config.to_dict(cfg.spark))
        spark.sparkContext.setLogLevel("ERROR")
        run_ingest(spark, data=cfg.data)
        # The reader is measured at the recipe's 128x128 (2,000 train rows), whatever the model trains on.
        reader_cfg = config.parse_job_arguments(
            [f"data.dataset={Path(tmp) / 'pets128'}", "data.image_size=128", f"data.synthetic_count={args.reader_count}",
             "spark.master=local[2]"], local=True)
        run_ingest(spark, data=reader_cfg.data)
        result = run_train(spark, data=cfg.data, model=cfg.model, train=cfg.train,
                           tracking=cfg.mlflow)
        last = result.history[-1]
        runner_rate = _epoch_rate(result, cfg)
        spark.stop()

        # The runner's model and augmentation, as the config resolved them, so the ratio compares like with like.
        spec = {"dataset": cfg.data.dataset, "size": cfg.data.image_size, "n_depth": cfg.model.n_depth,
                "encoder_weights": cfg.model.encoder_weights, "width": cfg.model.width,
                "batch_norm_momentum": cfg.model.batch_norm_momentum, "augment": config.to_dict(cfg.train.augment),
                "batch": cfg.train.batch_size}
        done = subprocess.run([sys.executable, "-c", PLAIN_FIT, json.dumps(spec)], capture_output=True, text=True,
                              env=env.training_process_environment())
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        plain_rate = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))[7:])["images_per_s"]
        rates = reader_rate(reader_cfg.data.dataset, batch=cfg.train.batch_size)

    print(json.dumps({
        "bench": "train",
        "image_size": cfg.data.image_size, "n_depth": cfg.model.n_depth, "global_batch": cfg.train.batch_size,
        "encoder_weights": cfg.model.encoder_weights, "width": cfg.model.width,
        "augment": config.to_dict(cfg.train.augment), "cpu_cores": os.cpu_count(),
        "runner_1_worker_images_per_s": round(runner_rate, 1),
        "plain_fit_images_per_s": round(plain_rate, 1),
        "ratio_runner_to_plain": round(runner_rate / plain_rate, 2),
        "reader_image_size": 128, **rates,
        "goal_ratio": 0.9, "goal_reader_tf_data_images_per_s": 4000,
        "last_epoch": last,
        "stack": versions(),
    }))


def _epoch_rate(result, cfg) -> float:
    """Images/s of the runner's last epoch: steps x global batch over its training time (validation excluded)."""
    from petseg.data.reader import split_stats

    train_rows = split_stats(cfg.data.dataset)["train"][0]
    steps = max(1, train_rows // cfg.train.batch_size)
    return steps * cfg.train.batch_size / result.history[-1]["train_seconds"]


if __name__ == "__main__":
    main()
