"""Inference throughput: the Spark job beside a plain model.predict, a bare loop and two peers. Prints JSON.

Every measurement runs on the same synthetic 500x375 JPEGs in a folder, one file in
:data:`BAD_EVERY` (at least one per folder) not an image, so that every pipeline takes its error path:

* recipe model: the job (list, read, decode, predict, encode the PNG masks, write Parquet) with the
  recipe's model (128x128, 5-level VGG16-BN U-Net, random weights: speed does not depend on them)
  beside a plain ``model.predict`` of the images already decoded and resized, in one process with
  TensorFlow's pools at 2 threads, the job's two tasks' worth.
* data path: the same job with a nearly free model (32x32, one level), so its rate is the cost of
  list + read + decode + resize + mask upsample + PNG encode + write, given per core; beside the same
  work, model included, in a bare loop in one process pinned to one core.
* peers, with both models: the same photos through the two pipelines a user would write instead,
  each with petseg's own per-photo functions (decode_for_model, preprocess, resize_mask,
  encode_mask, class_fractions) and the same SavedModel loaded with ``tf.keras.models.load_model``,
  so that they differ from the job in orchestration only. Each writes what the job writes per photo
  (a PNG mask at the photo's size, class fractions, or an error and a null mask) to Parquet; every
  pipeline must report the same segmented and failed rows and byte-identical masks, or the script
  fails.

  - ``predict_batch_udf``: as Spark's docs write it. ``spark.read.format("binaryFile")``, a pandas
    UDF decoding each photo to the model's size as a flat ``array<float>`` (zeros and an error for a
    bad file), ``pyspark.ml.functions.predict_batch_udf`` (``make_predict_fn`` loads the model once per
    Python worker and returns a ``model.predict``; labels come back as ``array<int>``;
    ``batch_size=--batch``), and a pandas UDF upsampling, counting and encoding each mask (a null mask
    and the error for a bad file), on the job's ``local[2]`` session with Spark's default confs.
  - Ray Data: ``ray.data.read_binary_files`` -> ``map_batches`` decoding -> ``map_batches`` with a
    callable class that loads the model once per actor (:data:`RAY_ACTORS` actor of
    :data:`RAY_ACTOR_CPUS` CPU) and calls it on each batch -> ``map_batches`` upsampling, counting and
    encoding -> ``write_parquet``, on a local Ray of 2 CPUs started and shut down in a process of its own.

Warm and cold: the job is timed warm (a first run of ``--batch`` rows loads the model in each
Python worker, which Spark then reuses) and cold (that first run). The ``predict_batch_udf`` peer is
timed warm the same way: a first run on :data:`WARM_PHOTOS` photos with the same UDFs, whose model
Spark's ``ModelCache`` keeps in each Python worker that ran it; a worker that had run only the
decode or encode UDF loads the model inside the timed run, counted as ``model_loads_in_timed_run``.
Ray Data starts a new actor pool for every execution, so each of its runs starts its actors and
loads the model in them (a new actor process also imports TensorFlow): its first small run warms
Ray itself (worker pool, imports in the task workers), a second small run measures what every
execution pays, and ``marginal_images_per_s`` leaves that out ((N - n) / (T - t)).

CPU per photo: the CPU seconds every process of the job used during its warm timed run (the
driver's Python, the JVM, the Python workers: :mod:`cpu`), with the data-path model at each of
``--cpu-counts`` photos, beside the bare loop's ``time.process_time`` per photo; the peers' totals
in the same way (Ray's raylet, GCS and workers descend from the process that called ``ray.init``).
The JVM's share is split by what its threads do (JIT compilers, garbage collector, task threads).
The job runs ``--cpu-repeats`` times in a row at each count, in the same session (a notebook's or
a long job's), and the bare loop as many times in its process: the first run's figures are the
headline, as they were before repeats; the later runs show how much of the JVM's share is its JIT
compilers warming up.

Photos: at most :data:`DISTINCT_PHOTOS` are rendered; larger folders repeat them as hard links.

    python bench/infer.py [--count 400] [--data-path-count 4000] [--batch 32] [--cpu-counts 4000 16000]
                          [--cpu-repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd  # the pandas UDFs' type hints name it, and pyspark resolves them at module level

import cpu
from petseg import config, env
from petseg.model.artifact import versions

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame

SIZE, N_DEPTH, CORES = 128, 5, 2
#: The nearly free model of the data-path measurement: its predict costs ~0.05 ms an image.
FREE_SIZE, FREE_DEPTH = 32, 1
#: One photo in this many is a file that is not an image (at least one per folder).
BAD_EVERY = 500
#: What the bad files hold: not empty, since Spark's binaryFile source skips empty files (SPARK-26161).
NOT_AN_IMAGE = b"this file is not an image: every pipeline must report it as a failed row\n"
#: Distinct photos rendered (~50 ms each); a larger folder repeats them as hard links, which decode
#: the same: 16,000 rendered photos would take 13 minutes.
DISTINCT_PHOTOS = 1000
#: Photos in the peers' first, warming runs: several of binaryFile's partitions (~31 photos each at
#: its 4 MB open cost and 128 MB splits), so that both cores' Python workers run every UDF.
WARM_PHOTOS = 128
#: The most warming runs of the predict_batch_udf peer: each task runs its three UDFs in three Python
#: workers, taken from Spark's idle pool in turn, so a worker may first run the predict UDF in a later
#: run; they are repeated until one loads the model nowhere new (or this many have run).
PREDICT_BATCH_UDF_WARM_RUNS = 4
#: Ray Data's model actors and the CPUs each reserves, out of ray.init's 2: one actor of one CPU (its
#: TensorFlow still uses both cores' threads), into which Ray fuses the decoding (same resources), the
#: other CPU running the read and the encode-and-write tasks. On 4,000 data-path photos (2026-12-06, a
#: loaded machine) it took 20 s, against 25-30 s for two actors of half a CPU or one of half a CPU,
#: with the tasks at one CPU or half; two actors of one CPU would leave the tasks none, and Ray Data stalls.
RAY_ACTORS, RAY_ACTOR_CPUS = 1, 1
#: Goals: the job against each peer (rate over rate), and its CPU per photo against the bare loop's.
GOAL_RATIO_TO_PREDICT_BATCH_UDF, GOAL_RATIO_TO_RAY_DATA, GOAL_CPU_RATIO_TO_LOOP = 1.2, 1.0, 1.3
#: The count at which the CPU goal applies.
CPU_GOAL_COUNT = 4000
#: Marks the line of a sub-process's stdout that carries its result (Ray's workers print there too).
RESULT = "RESULT "


@dataclass(frozen=True)
class Case:
    """One model's measurement: its run folder, its photos and the run that warms each pipeline."""

    name: str  # recipe_model or data_path
    run: Path
    photos: Path
    #: :data:`WARM_PHOTOS` of the photos, as hard links: the peers' first runs.
    warm: Path
    count: int
    bad: int


@dataclass(frozen=True)
class Timed:
    """A timed run: its wall seconds and the CPU seconds of each kind of process (see :mod:`cpu`)."""

    seconds: float
    cpu_s: dict[str, float]
    #: The JVM's CPU seconds by what its threads do (:func:`cpu.jvm_thread_seconds`); None: not measured.
    jvm_threads: dict[str, float] | None = None

    def cpu_ms_per_photo(self, photos: int) -> float:
        return round(1000 * sum(self.cpu_s.values()) / photos, 3)


def export_run(run: Path, *, image_size: int, n_depth: int) -> None:
    from petseg.model import artifact, build_unet

    model = build_unet(image_size=image_size, n_depth=n_depth, encoder_weights="none", encoder_batch_norm=True)
    model.save(str(run / artifact.MODEL_FOLDER), include_optimizer=False)
    artifact.write_metadata(run, image_size=image_size, preprocessing="unit_scale", run_id="bench")


def render_photos(folder: Path, count: int) -> list[Path]:
    """``count`` distinct synthetic pets as JPEGs in ``folder``."""
    from petseg.data import render

    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        image = render.synthetic_pet(i, seed=0, size=(500, 375)).image
        paths.append(folder / f"pet_{i:05d}.jpg")
        paths[-1].write_bytes(render.encode_jpeg(image))
    return paths


def bad_rows(count: int) -> list[int]:
    """The indices of the files that are not images: one in :data:`BAD_EVERY`, at least one, spread out."""
    n = max(1, count // BAD_EVERY)
    return [int((k + 0.5) * count / n) for k in range(n)]


def photo_folder(folder: Path, count: int, rendered: list[Path]) -> int:
    """``count`` photos in ``folder``, hard links to ``rendered`` in turn, and the bad files; returns how
    many are bad."""
    folder.mkdir(parents=True)
    bad = set(bad_rows(count))
    for i in range(count):
        target = folder / f"pet_{i:05d}.jpg"
        if i in bad:
            target.write_bytes(NOT_AN_IMAGE)
        else:
            os.link(rendered[i % len(rendered)], target)
    return len(bad)


def make_case(name: str, run: Path, photos: Path, count: int, rendered: list[Path]) -> Case:
    bad = photo_folder(photos, count, rendered)
    warm = photos.with_name(f"{photos.name}-warm")
    warm.mkdir()
    for path in sorted(photos.iterdir())[:WARM_PHOTOS]:
        os.link(path, warm / path.name)
    return Case(name, run, photos, warm, count, bad)


def plain_predict_rate(run: Path, photos: Path, *, batch: int) -> float:
    import tensorflow as tf

    from petseg.data.decode import decode_for_model
    from petseg.errors import RejectedInput
    from petseg.model import artifact
    from petseg.model.preprocessing import preprocess

    model = tf.keras.models.load_model(str(artifact.resolve(str(run)).model_dir), compile=False)
    images = []
    for path in sorted(photos.iterdir()):
        try:
            images.append(decode_for_model(path.read_bytes(), size=SIZE)[0])
        except RejectedInput:
            pass  # the bad files: nothing to predict
    images = np.stack(images)
    model.predict(preprocess(images[:batch], "unit_scale"), batch_size=batch, verbose=0)  # trace and warm up
    start = time.perf_counter()
    np.argmax(model.predict(preprocess(images, "unit_scale"), batch_size=batch, verbose=0), axis=-1)
    return len(images) / (time.perf_counter() - start)


def bare_loop(run: Path, photos: Path, out: Path, *, batch: int, repeats: int = 1) -> dict[str, Any]:
    """The job's per-image work in one process on one core: list, read, decode, predict, upsample,
    class fractions, PNG, one Parquet file; a bad file becomes a row with its error. Run in its own
    process (``--bare-loop``), ``repeats`` times. Returns the median run's rate and CPU seconds
    (``time.process_time``), and every run's CPU milliseconds per photo."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from petseg.model import artifact

    loaded = artifact.load(str(run), threads=1)
    size = loaded.image_size
    loaded.predict_labels(np.zeros((batch, size, size, 3), np.uint8), batch_size=batch)  # trace
    runs = sorted((_loop_once(loaded, photos, out, batch=batch) for _ in range(repeats)), key=lambda r: r["cpu_s"])
    return {**runs[len(runs) // 2],
            "cpu_ms_per_photo_runs": sorted(round(1000 * r["cpu_s"] / r["photos"], 3) for r in runs)}


def _loop_once(loaded: Any, photos: Path, out: Path, *, batch: int) -> dict[str, float]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from petseg.data.decode import decode_for_model, resize_mask
    from petseg.errors import RejectedInput
    from petseg.io.fs import list_files, read_file
    from petseg.model.segment import class_fractions, encode_mask

    size = loaded.image_size
    start, cpu_start = time.perf_counter(), time.process_time()
    files = sorted(list_files(str(photos)))
    rows: dict[str, list] = {"path": [], "mask_png": [], "fractions": [], "error": []}
    for first in range(0, len(files), batch):
        chunk, decoded = files[first:first + batch], []
        for path in chunk:
            try:
                decoded.append((path, *decode_for_model(read_file(path), size=size)))
            except RejectedInput as exc:
                rows["path"].append(path)
                rows["mask_png"].append(None)
                rows["fractions"].append(None)
                rows["error"].append(str(exc))
        if not decoded:
            continue
        labels = loaded.predict_labels(np.stack([image for _, image, _ in decoded]), batch_size=batch)
        for (path, _, shape), label in zip(decoded, labels):
            mask = resize_mask(label, shape)
            rows["path"].append(path)
            rows["mask_png"].append(encode_mask(mask))
            rows["fractions"].append(list(class_fractions(mask, len(loaded.classes))))
            rows["error"].append(None)
    pq.write_table(pa.table(rows), str(out))
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    return {"images_per_s": len(files) / seconds, "seconds": seconds, "cpu_s": cpu_s, "photos": len(files)}


def job_runs(case: Case, out: Path, *, batch: int, count: int | None = None, photos: Path | None = None,
             bad: int | None = None, repeats: int = 1) -> tuple[list[Timed], float]:
    """The job's ``repeats`` warm runs over the case's photos (or ``photos``, ``count`` of them, ``bad``
    not images), each timed with its processes' CPU, and its cold rate over one batch (the model loads)."""
    from petseg.infer.job import run_infer
    from petseg.session import get_or_create

    photos = photos or case.photos
    count = case.count if count is None else count
    bad = case.bad if bad is None else bad

    def job(*extra: str) -> tuple[float, dict[str, float], Any]:
        cfg = config.parse_job_arguments(
            [f"spark.master=local[{CORES}]", f"infer.model={case.run}", f"infer.input={photos}",
             f"infer.output={out}", f"infer.batch_size={batch}", *extra], job="infer")
        spark = get_or_create(**config.to_dict(cfg.spark))
        spark.sparkContext.setLogLevel("ERROR")
        before = cpu.snapshot()
        jvm = cpu.jvm_pid(before)
        threads = cpu.thread_ticks(jvm) if jvm else {}
        start = time.perf_counter()
        report = run_infer(spark, infer=cfg.infer)
        seconds = time.perf_counter() - start
        used = Timed(seconds, cpu.cpu_seconds(before, cpu.snapshot(), cpu.spark_kind),
                     cpu.jvm_thread_seconds(threads, cpu.thread_ticks(jvm)) if jvm else None)
        assert set(report.failed) <= {"image_undecodable"}, report.format()
        print(report.format(), file=sys.stderr)
        return used, report

    cold, report = job(f"infer.limit={batch}")  # loads the model in each Python worker
    assert report.rows == batch, report.format()
    runs = []
    for _ in range(repeats):
        timed, report = job()
        assert report.rows == count and report.failed == {"image_undecodable": bad}, report.format()
        runs.append(timed)
    return runs, batch / cold.seconds


def predict_batch_udf_pipeline(run: Path, *, batch: int, loads: Path) -> Callable[[Path], DataFrame]:
    """The peer a Spark user writes from Spark's docs: binaryFile -> decode UDF -> predict_batch_udf ->
    mask UDF, to be written to Parquet. Returns ``masks(photos)``, the frame; its UDFs are made once,
    so that a second run finds the model that ``make_predict_fn`` loaded in Spark's ModelCache of each
    Python worker. Each load appends the worker's pid to ``loads``."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import SparkSession
    from pyspark.sql.functions import pandas_udf
    from pyspark.sql.types import (ArrayType, BinaryType, DoubleType, FloatType, IntegerType, StringType, StructField,
                                   StructType)

    from petseg.data.decode import CLASSES
    from petseg.model import artifact

    model = artifact.resolve(str(run))
    model_dir, preprocessing, size = str(model.model_dir), model.preprocessing, model.image_size
    decoded_type = StructType([StructField("image", ArrayType(FloatType())), StructField("height", IntegerType()),
                               StructField("width", IntegerType()), StructField("error", StringType())])
    masks_type = StructType([StructField("mask_png", BinaryType()), StructField("height", IntegerType()),
                             StructField("width", IntegerType()),
                             *[StructField(f"fraction_{name}", DoubleType()) for name in CLASSES],
                             StructField("error", StringType())])

    @pandas_udf(decoded_type)  # type: ignore[call-overload]
    def decode(content: pd.Series) -> pd.DataFrame:
        from petseg.data.decode import decode_for_model
        from petseg.errors import RejectedInput

        images, heights, widths, errors = [], [], [], []
        for data in content:
            try:
                image, (height, width) = decode_for_model(data, size=size)
                error = None
            except RejectedInput as exc:  # zeros for the model, and the error for the last step
                image, height, width, error = np.zeros((size, size, 3), np.uint8), None, None, str(exc)
            images.append(image.reshape(-1).astype(np.float32))
            heights.append(height)
            widths.append(width)
            errors.append(error)
        return pd.DataFrame({"image": images, "height": pd.array(heights, dtype="Int32"),
                             "width": pd.array(widths, dtype="Int32"), "error": errors})

    def make_predict_fn() -> Callable[[np.ndarray], np.ndarray]:
        # load/init happens once per Python worker
        import tensorflow as tf

        from petseg.model.preprocessing import preprocess

        with loads.open("a") as log:
            log.write(f"{os.getpid()}\n")
        keras_model = tf.keras.models.load_model(model_dir, compile=False)

        def predict(inputs: np.ndarray) -> np.ndarray:
            # inputs.shape = [batch_size, size, size, 3], see input_tensor_shapes;
            # outputs.shape = [batch_size, size * size]: the labels, see return_type
            probabilities = keras_model.predict(preprocess(inputs, preprocessing), verbose=0)
            return np.argmax(probabilities, axis=-1).reshape(len(inputs), -1).astype(np.int32)

        return predict

    predict = predict_batch_udf(make_predict_fn, return_type=ArrayType(IntegerType()), batch_size=batch,
                                input_tensor_shapes=[[size, size, 3]])

    @pandas_udf(masks_type)  # type: ignore[call-overload]
    def finish(labels: pd.Series, height: pd.Series, width: pd.Series, error: pd.Series) -> pd.DataFrame:
        from petseg.data.decode import resize_mask
        from petseg.model.segment import class_fractions, encode_mask

        columns: dict[str, list] = {name: [] for name in masks_type.names}
        for label, h, w, err in zip(labels, height, width, error):
            if isinstance(err, str):  # a null mask and the error
                for name in masks_type.names:
                    columns[name].append(err if name == "error" else None)
                continue
            mask = resize_mask(np.asarray(label, np.uint8).reshape(size, size), (int(h), int(w)))
            for name, value in zip(masks_type.names, (encode_mask(mask), int(h), int(w),
                                                      *class_fractions(mask, len(CLASSES)), None)):
                columns[name].append(value)
        return pd.DataFrame({**columns, "height": pd.array(columns["height"], dtype="Int32"),
                             "width": pd.array(columns["width"], dtype="Int32")})

    def masks(photos: Path) -> DataFrame:
        images = SparkSession.builder.getOrCreate().read.format("binaryFile").load(str(photos))
        decoded = images.select("path", decode("content").alias("d"))
        labelled = decoded.select("path", "d.height", "d.width", "d.error", predict("d.image").alias("labels"))
        return labelled.select("path", finish("labels", "height", "width", "error").alias("m")).select("path", "m.*")

    return masks


def predict_batch_udf_runs(case: Case, out: Path, *, batch: int) -> tuple[Timed, dict[str, Any]]:
    """The ``predict_batch_udf`` peer's warm run, after runs on the warm photos until one loads the
    model in no new worker (:data:`PREDICT_BATCH_UDF_WARM_RUNS`), and what those runs did."""
    loads = out.with_name(f"{out.name}-model-loads.txt")
    loads.touch()
    masks = predict_batch_udf_pipeline(case.run, batch=batch, loads=loads)

    def write(photos: Path, out: Path) -> None:
        masks(photos).write.mode("overwrite").parquet(str(out))

    warm_runs, loaded, first = 0, 0, 0.0
    while warm_runs < PREDICT_BATCH_UDF_WARM_RUNS:
        start = time.perf_counter()
        write(case.warm, out.with_name(f"{out.name}-warm"))
        first = first or time.perf_counter() - start
        warm_runs += 1
        if len(loads.read_text().split()) == loaded:
            break  # no worker loaded the model: every worker that takes the predict UDF has it
        loaded = len(loads.read_text().split())
    before = cpu.snapshot()
    start = time.perf_counter()
    write(case.photos, out)
    seconds = time.perf_counter() - start
    used = cpu.cpu_seconds(before, cpu.snapshot(), cpu.spark_kind)
    return Timed(seconds, used), {"first_run_seconds": round(first, 2), "warm_runs": warm_runs,
                                  "model_loads_in_warm_runs": loaded,
                                  "model_loads_in_timed_run": len(loads.read_text().split()) - loaded}


def ray_decode(batch: dict[str, np.ndarray], *, size: int) -> dict[str, np.ndarray]:
    """Ray Data: photos to model-size images; zeros and an error for a bad file ("" for none: an all-None
    column of Ray's numpy batches comes back as floats)."""
    from petseg.data.decode import decode_for_model
    from petseg.errors import RejectedInput

    images, heights, widths, errors = [], [], [], []
    for data in batch["bytes"]:
        try:
            image, (height, width) = decode_for_model(data, size=size)
            error = ""
        except RejectedInput as exc:
            image, height, width, error = np.zeros((size, size, 3), np.uint8), 0, 0, str(exc)
        images.append(image)
        heights.append(height)
        widths.append(width)
        errors.append(error)
    return {"path": batch["path"], "image": np.stack(images), "height": np.array(heights, np.int32),
            "width": np.array(widths, np.int32), "error": np.array(errors, dtype=object)}


class RayPredictor:
    """Ray Data's stateful transform, as its offline-inference docs write one: the model loads once per actor."""

    def __init__(self, model_dir: str, preprocessing: str) -> None:
        import tensorflow as tf

        self.model = tf.keras.models.load_model(model_dir, compile=False)
        self.preprocessing = preprocessing

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from petseg.model.preprocessing import preprocess

        logits = self.model(preprocess(batch["image"], self.preprocessing), training=False)
        labels = np.argmax(np.asarray(logits), axis=-1).astype(np.uint8)
        return {**{k: v for k, v in batch.items() if k != "image"}, "labels": labels}


def ray_finish(batch: dict[str, np.ndarray], *, classes: list[str]) -> pa.Table:
    """Ray Data: masks upsampled, counted and encoded; a null mask and the error for a bad file. A table
    with its types given, since a block whose errors are all null would otherwise get a null-typed column."""
    import pyarrow as pa

    from petseg.data.decode import resize_mask
    from petseg.model.segment import class_fractions, encode_mask

    pngs, heights, widths, fractions = [], [], [], []
    for label, height, width, error in zip(batch["labels"], batch["height"], batch["width"], batch["error"]):
        if error:
            pngs.append(None)
            heights.append(None)
            widths.append(None)
            fractions.append([None] * len(classes))
            continue
        mask = resize_mask(label, (int(height), int(width)))
        pngs.append(encode_mask(mask))
        heights.append(int(height))
        widths.append(int(width))
        fractions.append(class_fractions(mask, len(classes)))
    return pa.table({
        "path": pa.array(batch["path"], pa.string()), "mask_png": pa.array(pngs, pa.binary()),
        "height": pa.array(heights, pa.int32()), "width": pa.array(widths, pa.int32()),
        **{f"fraction_{name}": pa.array([f[k] for f in fractions], pa.float64()) for k, name in enumerate(classes)},
        "error": pa.array([e or None for e in batch["error"]], pa.string()),
    })


def ray_kind(process: cpu.Process) -> str:
    """``driver``, ``raylet``, ``gcs_server``, ``workers`` (``ray::`` processes) or ``other`` (Ray's
    Python services)."""
    if process.pid == os.getpid():
        return "driver"
    if process.comm in ("raylet", "gcs_server"):
        return process.comm
    return "workers" if process.comm.startswith("ray::") else "other"


def ray_data_peer(cases: list[dict[str, Any]], *, batch: int) -> dict[str, dict[str, Any]]:
    """The Ray Data peer on each case (name, run, photos, warm, out, count), on a local Ray of 2 CPUs
    started here. Run in its own process (``--ray-peer``)."""
    import ray

    from petseg.data.decode import CLASSES
    from petseg.model import artifact

    ray.init(num_cpus=CORES, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {}
    try:
        for case in cases:
            model = artifact.resolve(case["run"])

            def run(photos: str, out: str) -> float:
                start = time.perf_counter()
                ds = ray.data.read_binary_files(photos, include_paths=True)
                ds = ds.map_batches(ray_decode, fn_kwargs={"size": model.image_size}, batch_size=batch)
                ds = ds.map_batches(RayPredictor, fn_constructor_kwargs={"model_dir": str(model.model_dir),
                                                                         "preprocessing": model.preprocessing},
                                    batch_size=batch, compute=ray.data.ActorPoolStrategy(size=RAY_ACTORS),
                                    num_cpus=RAY_ACTOR_CPUS)
                ds = ds.map_batches(ray_finish, fn_kwargs={"classes": list(CLASSES)}, batch_size=batch)
                ds.write_parquet(out)
                return time.perf_counter() - start

            first = run(case["warm"], case["out"] + "-warm1")  # Ray's workers start and import
            small = run(case["warm"], case["out"] + "-warm2")  # what every execution pays, and WARM_PHOTOS
            with cpu.Sampler() as sampler:  # the raylet does not account for the actors that exit
                seconds = run(case["photos"], case["out"])
            used = sampler.cpu_seconds(ray_kind)
            warm_count = len(os.listdir(case["warm"]))
            results[case["name"]] = {
                "seconds": seconds, "cpu_s": used, "first_run_seconds": round(first, 2),
                "small_run_seconds": round(small, 2), "small_run_photos": warm_count,
                "marginal_images_per_s": round((case["count"] - warm_count) / max(seconds - small, 1e-9), 1),
            }
    finally:
        ray.shutdown()
    return results


def read_output(out: Path) -> dict[str, tuple[bytes | None, str | None]]:
    """A pipeline's Parquet output: file name -> (mask PNG, error)."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(out), columns=["path", "mask_png", "error"])
    paths, masks, errors = (table.column(c).to_pylist() for c in ("path", "mask_png", "error"))
    return {path.rsplit("/", 1)[-1]: (mask, error) for path, mask, error in zip(paths, masks, errors)}


def check_outputs(case: Case, outputs: dict[str, Path]) -> dict[str, int]:
    """Every pipeline wrote the same rows: each photo once, the bad files as failed rows with an
    ``image_undecodable`` error and a null mask, and every other mask byte-identical to the job's.
    Raises SystemExit naming the first pipeline that did not."""
    rows = {name: read_output(out) for name, out in outputs.items()}
    job = rows["job"]
    for name, got in rows.items():
        failed = sorted(n for n, (mask, error) in got.items() if error is not None or mask is None)
        wrong = [n for n in failed if got[n][1] is None or not got[n][1].startswith("image_undecodable")]
        if len(got) != case.count or len(failed) != case.bad or wrong or set(got) != set(job):
            raise SystemExit(
                f"{case.name}: {name} wrote {len(got)} rows, {len(got) - len(failed)} segmented and {len(failed)} "
                f"failed ({wrong[:3]} without an image_undecodable error); the photos are {case.count}, of which "
                f"{case.bad} are not images")
        differ = sorted(n for n, (mask, _) in got.items() if mask != job[n][0])
        if differ:
            raise SystemExit(
                f"{case.name}: {name}'s masks differ from the job's for {len(differ)} photos, e.g. {differ[:3]}")
    return {"rows": case.count, "segmented": case.count - case.bad, "failed": case.bad,
            "identical_masks_per_pipeline": case.count - case.bad, "pipelines": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400, help="photos the recipe model segments")
    parser.add_argument("--data-path-count", type=int, default=4000, help="photos the nearly free model segments")
    parser.add_argument("--batch", type=int, default=32,
                        help="infer.batch_size, the peers' and the plain predict's batch")
    parser.add_argument("--cpu-counts", type=int, nargs="+", default=[4000, 16000],
                        help="photo counts at which the job's CPU per photo is measured (data-path model)")
    parser.add_argument("--cpu-repeats", type=int, default=3,
                        help="runs of the job in a row at each CPU count, and of the bare loop")
    parser.add_argument("--bare-loop", nargs=3, metavar=("RUN", "PHOTOS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--ray-peer", metavar="CASES_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if importlib.util.find_spec("ray") is None:  # before minutes of Spark runs, not after
        raise SystemExit("bench/infer.py compares the job with Ray Data: install the bench extra "
                         "(make bench, or pip install -c constraints.txt -e '.[train,bench]')")
    env.prepare_process_environment(master=f"local[{CORES}]")  # TF_USE_LEGACY_KERAS before TensorFlow
    if args.bare_loop:
        run, photos, out = map(Path, args.bare_loop)
        print(RESULT + json.dumps(bare_loop(run, photos, out, batch=args.batch, repeats=args.cpu_repeats)))
        return
    if args.ray_peer:
        print(RESULT + json.dumps(ray_data_peer(json.loads(args.ray_peer), batch=args.batch)))
        return

    import tensorflow as tf

    # The plain predict's pools: the job's two tasks' worth of cores (set before TensorFlow starts).
    tf.config.threading.set_intra_op_parallelism_threads(CORES)
    tf.config.threading.set_inter_op_parallelism_threads(CORES)

    def sub_process(*extra: str) -> Any:
        """Run this script with ``extra`` in a process of its own; its result. Its stderr is this one's."""
        done = subprocess.run([sys.executable, __file__, "--batch", str(args.batch),
                               "--cpu-repeats", str(args.cpu_repeats), *extra], check=True,
                              stdout=subprocess.PIPE, text=True)
        result = next(line for line in reversed(done.stdout.splitlines()) if line.startswith(RESULT))
        return json.loads(result[len(RESULT):])

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        rendered = render_photos(tmp_path / "rendered",
                                 min(DISTINCT_PHOTOS, max(args.count, args.data_path_count, *args.cpu_counts)))
        recipe_run, free_run = tmp_path / "recipe-run", tmp_path / "free-run"
        export_run(recipe_run, image_size=SIZE, n_depth=N_DEPTH)
        export_run(free_run, image_size=FREE_SIZE, n_depth=FREE_DEPTH)
        recipe = make_case("recipe_model", recipe_run, tmp_path / "photos", args.count, rendered)
        free = make_case("data_path", free_run, tmp_path / "many-photos", args.data_path_count, rendered)
        outputs: dict[str, dict[str, Path]] = {c.name: {p: tmp_path / f"{c.name}-{p}" for p in
                                                        ("job", "predict_batch_udf", "ray_data")}
                                               for c in (recipe, free)}

        # The Spark runs first, so that this process's TensorFlow (the plain predict) does not share the cores.
        repeats = args.cpu_repeats if free.count in args.cpu_counts else 1
        job_cpu: dict[int, list[Timed]] = {free.count: job_runs(free, outputs["data_path"]["job"], batch=args.batch,
                                                                repeats=repeats)[0]}
        data_path = job_cpu[free.count][0]
        for count in sorted(set(args.cpu_counts) - {free.count}):
            photos = tmp_path / f"cpu-photos-{count}"
            bad = photo_folder(photos, count, rendered)
            job_cpu[count], _ = job_runs(free, tmp_path / f"cpu-masks-{count}", batch=args.batch, count=count,
                                         photos=photos, bad=bad, repeats=args.cpu_repeats)
        (recipe_job,), cold_rate = job_runs(recipe, outputs["recipe_model"]["job"], batch=args.batch)
        pbudf = {c.name: predict_batch_udf_runs(c, outputs[c.name]["predict_batch_udf"], batch=args.batch)
                 for c in (free, recipe)}
        from pyspark.sql import SparkSession

        SparkSession.builder.getOrCreate().stop()
        outputs["data_path"]["bare_loop"] = tmp_path / "loop.parquet"
        loop = sub_process("--bare-loop", str(free_run), str(free.photos), str(outputs["data_path"]["bare_loop"]))
        ray_data = sub_process("--ray-peer", json.dumps([
            {"name": c.name, "run": str(c.run), "photos": str(c.photos), "warm": str(c.warm),
             "out": str(outputs[c.name]["ray_data"]), "count": c.count} for c in (free, recipe)]))
        plain_rate = plain_predict_rate(recipe_run, recipe.photos, batch=args.batch)
        checked = {c.name: check_outputs(c, outputs[c.name]) for c in (recipe, free)}

    loop_cpu_ms = 1000 * loop["cpu_s"] / loop["photos"]

    def peers(case: Case, job: Timed) -> dict[str, Any]:
        """The section's keys comparing the job with the two peers."""
        job_rate = case.count / job.seconds
        udf, udf_info = pbudf[case.name]
        ray_run = ray_data[case.name]
        udf_rate, ray_rate = case.count / udf.seconds, case.count / ray_run["seconds"]
        return {
            "predict_batch_udf_images_per_s": round(udf_rate, 1),
            "ray_data_images_per_s": round(ray_rate, 1),
            "ratio_job_to_predict_batch_udf": round(job_rate / udf_rate, 2),
            "ratio_job_to_ray_data": round(job_rate / ray_rate, 2),
            "goal_ratio_to_predict_batch_udf": GOAL_RATIO_TO_PREDICT_BATCH_UDF,
            "goal_ratio_to_ray_data": GOAL_RATIO_TO_RAY_DATA,
            "cpu_ms_per_photo": {"job": job.cpu_ms_per_photo(case.count),
                                 "predict_batch_udf": udf.cpu_ms_per_photo(case.count),
                                 "ray_data": round(1000 * sum(ray_run["cpu_s"].values()) / case.count, 3)},
            "peers": {
                "predict_batch_udf": {"seconds": round(udf.seconds, 2), "cpu_s": udf.cpu_s, **udf_info},
                "ray_data": {**{k: v for k, v in ray_run.items() if k != "seconds"},
                             "seconds": round(ray_run["seconds"], 2),
                             "actors": RAY_ACTORS, "actor_cpus": RAY_ACTOR_CPUS},
            },
            "rows_checked": checked[case.name],
        }

    def cpu_entry(count: int, runs: list[Timed]) -> dict[str, Any]:
        timed = runs[0]
        total = sum(timed.cpu_s.values())
        return {
            "photos": count, "wall_seconds": round(timed.seconds, 2), "cpu_s": timed.cpu_s,
            "jvm_threads_cpu_s": timed.jvm_threads,
            "cpu_ms_per_photo": {"total": round(1000 * total / count, 3),
                                 **{kind: round(1000 * s / count, 3) for kind, s in timed.cpu_s.items()}},
            "bare_loop_cpu_ms_per_photo": round(loop_cpu_ms, 3),
            "cpu_per_photo_ratio_to_loop": round(1000 * total / count / loop_cpu_ms, 2),
            "later_runs": [{"cpu_ms_per_photo": later.cpu_ms_per_photo(count),
                            "jvm_cpu_s": later.cpu_s.get("jvm"), "jvm_threads_cpu_s": later.jvm_threads,
                            "cpu_per_photo_ratio_to_loop": round(later.cpu_ms_per_photo(count) / loop_cpu_ms, 2)}
                           for later in runs[1:]],
        }

    from importlib.metadata import version

    recipe_rate = recipe.count / recipe_job.seconds
    data_path_rate = free.count / data_path.seconds
    print(json.dumps({
        "bench": "infer", "photo_size": "500x375 jpeg", "batch": args.batch, "spark_cores": CORES,
        "cpu_cores": os.cpu_count(), "stack": {**versions(), "ray": version("ray")},
        "bad_files": f"1 in {BAD_EVERY}, at least 1 per folder",
        "recipe_model": {
            "images": args.count, "image_size": SIZE, "n_depth": N_DEPTH,
            "job_images_per_s": round(recipe_rate, 1),
            "plain_predict_images_per_s": round(plain_rate, 1),
            "ratio_job_to_plain": round(recipe_rate / plain_rate, 2),
            "cold_job_images_per_s": round(cold_rate, 1),
            "goal_ratio": 0.8,
            **peers(recipe, recipe_job),
        },
        "data_path": {
            "images": args.data_path_count, "image_size": FREE_SIZE, "n_depth": FREE_DEPTH,
            "data_path_images_per_s_per_core": round(data_path_rate / CORES, 1),
            "bare_loop_images_per_s": round(loop["images_per_s"], 1),
            "ratio_data_path_to_loop": round(data_path_rate / loop["images_per_s"], 2),
            "goal_images_per_s_per_core": 300, "goal_ratio": 1.5,
            **peers(free, data_path),
        },
        "cpu_per_photo": {
            "model": "data path", "bare_loop_cpu_ms_per_photo": round(loop_cpu_ms, 3),
            "bare_loop_cpu_ms_per_photo_runs": loop["cpu_ms_per_photo_runs"],
            "goal_ratio_to_loop_at_most": GOAL_CPU_RATIO_TO_LOOP, "goal_at_photos": CPU_GOAL_COUNT,
            "counts": [cpu_entry(count, job_cpu[count]) for count in sorted(set(args.cpu_counts))],
        },
    }))


if __name__ == "__main__":
    main()
