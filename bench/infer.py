"""Inference throughput: the Spark job beside a plain model.predict, and its data path beside a bare loop. Prints JSON.

Two measurements on the same synthetic 500x375 JPEG photos in a folder:

* recipe model: the job (list, read, decode, predict, encode the PNG masks, write Parquet) with the
  recipe's model (128x128, 5-level VGG16-BN U-Net, random weights: speed does not depend on them)
  beside a plain ``model.predict`` of the images already decoded and resized, in one process with
  TensorFlow's pools at 2 threads, the job's two tasks' worth. The job is timed warm (a first run on
  a few rows loads the model in each Python worker; Spark reuses those workers) and cold.
* data path: the same job with a nearly free model (32x32, one level), so its rate is the cost of
  list + read + decode + resize + mask upsample + PNG encode + write, given per core; beside the same
  work, model included, in a bare loop in one process pinned to one core.

    python bench/infer.py [--count 400] [--data-path-count 4000] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from petseg import config, env
from petseg.model.artifact import versions

SIZE, N_DEPTH, CORES = 128, 5, 2
#: The nearly free model of the data-path measurement: its predict costs ~0.05 ms an image.
FREE_SIZE, FREE_DEPTH = 32, 1


def export_run(run: Path, *, image_size: int, n_depth: int) -> None:
    from petseg.model import artifact, build_unet

    model = build_unet(image_size=image_size, n_depth=n_depth, encoder_weights="none", encoder_batch_norm=True)
    model.save(str(run / artifact.MODEL_FOLDER), include_optimizer=False)
    artifact.write_metadata(run, image_size=image_size, preprocessing="unit_scale", run_id="bench")


def write_photos(folder: Path, count: int) -> None:
    from petseg.data import render

    folder.mkdir(parents=True)
    for i in range(count):
        image = render.synthetic_pet(i, seed=0, size=(500, 375)).image
        (folder / f"pet_{i:05d}.jpg").write_bytes(render.encode_jpeg(image))


def plain_predict_rate(run: Path, photos: Path, *, batch: int) -> float:
    import numpy as np
    import tensorflow as tf

    from petseg.data.decode import decode_for_model
    from petseg.model import artifact
    from petseg.model.preprocessing import preprocess

    model = tf.keras.models.load_model(str(artifact.resolve(str(run)).model_dir), compile=False)
    images = np.stack([decode_for_model(p.read_bytes(), size=SIZE)[0] for p in sorted(photos.iterdir())])
    model.predict(preprocess(images[:batch], "unit_scale"), batch_size=batch, verbose=0)  # trace and warm up
    start = time.perf_counter()
    np.argmax(model.predict(preprocess(images, "unit_scale"), batch_size=batch, verbose=0), axis=-1)
    return len(images) / (time.perf_counter() - start)


def bare_loop(run: Path, photos: Path, out: Path, *, batch: int) -> float:
    """The job's per-image work in one process on one core: list, read, decode, predict, upsample,
    class fractions, PNG, one Parquet file. Run in its own process (``--bare-loop``)."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from petseg.data.decode import decode_for_model, resize_mask
    from petseg.model.segment import class_fractions, encode_mask
    from petseg.io.fs import list_files, read_file
    from petseg.model import artifact

    loaded = artifact.load(str(run), threads=1)
    size = loaded.image_size
    loaded.predict_labels(np.zeros((batch, size, size, 3), np.uint8), batch_size=batch)  # trace
    start = time.perf_counter()
    files = sorted(list_files(str(photos)))
    rows: dict[str, list] = {"path": [], "mask_png": [], "fractions": []}
    for first in range(0, len(files), batch):
        chunk = files[first:first + batch]
        decoded = [decode_for_model(read_file(f), size=size) for f in chunk]
        labels = loaded.predict_labels(np.stack([image for image, _ in decoded]), batch_size=batch)
        for path, (_, shape), label in zip(chunk, decoded, labels):
            mask = resize_mask(label, shape)
            rows["path"].append(path)
            rows["mask_png"].append(encode_mask(mask))
            rows["fractions"].append(list(class_fractions(mask, len(loaded.classes))))
    pq.write_table(pa.table(rows), str(out))
    return len(files) / (time.perf_counter() - start)


def job_rate(run: Path, photos: Path, out: Path, *, batch: int, count: int) -> tuple[float, float]:
    """The job's warm rate over ``count`` photos, and its cold rate over one batch (model loads)."""
    from petseg.infer.job import run_infer
    from petseg.session import get_or_create

    def job(*extra: str) -> float:
        cfg = config.parse_job_arguments(
            [f"spark.master=local[{CORES}]", f"infer.model={run}", f"infer.input={photos}",
             f"infer.output={out}", f"infer.batch_size={batch}", *extra], job="infer")
        spark = get_or_create(**config.to_dict(cfg.spark))
        spark.sparkContext.setLogLevel("ERROR")
        start = time.perf_counter()
        report = run_infer(spark, infer=cfg.infer)
        seconds = time.perf_counter() - start
        assert report.segmented == report.rows and not report.failed, report.format()
        print(report.format(), file=sys.stderr)
        return seconds

    cold = batch / job(f"infer.limit={batch}")  # loads the model in each Python worker
    return count / job(), cold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400, help="photos the recipe model segments")
    parser.add_argument("--data-path-count", type=int, default=4000, help="photos the nearly free model segments")
    parser.add_argument("--batch", type=int, default=32, help="infer.batch_size and the plain predict's batch")
    parser.add_argument("--bare-loop", nargs=3, metavar=("RUN", "PHOTOS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    env.prepare_process_environment(master=f"local[{CORES}]")  # TF_USE_LEGACY_KERAS before TensorFlow
    if args.bare_loop:
        run, photos, out = map(Path, args.bare_loop)
        print(json.dumps({"images_per_s": bare_loop(run, photos, out, batch=args.batch)}))
        return

    import tensorflow as tf

    # The plain predict's pools: the job's two tasks' worth of cores (set before TensorFlow starts).
    tf.config.threading.set_intra_op_parallelism_threads(CORES)
    tf.config.threading.set_inter_op_parallelism_threads(CORES)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        recipe_run, free_run = tmp_path / "recipe-run", tmp_path / "free-run"
        recipe_photos, free_photos = tmp_path / "photos", tmp_path / "many-photos"
        write_photos(recipe_photos, args.count)
        write_photos(free_photos, args.data_path_count)
        export_run(recipe_run, image_size=SIZE, n_depth=N_DEPTH)
        export_run(free_run, image_size=FREE_SIZE, n_depth=FREE_DEPTH)

        # The jobs first, so that this process's TensorFlow (the plain predict) does not share the cores.
        data_path_rate, _ = job_rate(free_run, free_photos, tmp_path / "free-masks", batch=args.batch,
                                     count=args.data_path_count)
        recipe_rate, cold_rate = job_rate(recipe_run, recipe_photos, tmp_path / "masks", batch=args.batch,
                                          count=args.count)
        from pyspark.sql import SparkSession

        SparkSession.builder.getOrCreate().stop()
        loop = subprocess.run(
            [sys.executable, __file__, "--batch", str(args.batch), "--bare-loop", str(free_run), str(free_photos),
             str(tmp_path / "loop.parquet")], check=True, capture_output=True, text=True)
        loop_rate = json.loads(loop.stdout.strip().splitlines()[-1])["images_per_s"]
        plain_rate = plain_predict_rate(recipe_run, recipe_photos, batch=args.batch)

    print(json.dumps({
        "bench": "infer", "photo_size": "500x375 jpeg", "batch": args.batch, "spark_cores": CORES,
        "cpu_cores": os.cpu_count(), "stack": versions(),
        "recipe_model": {
            "images": args.count, "image_size": SIZE, "n_depth": N_DEPTH,
            "job_images_per_s": round(recipe_rate, 1),
            "plain_predict_images_per_s": round(plain_rate, 1),
            "ratio_job_to_plain": round(recipe_rate / plain_rate, 2),
            "cold_job_images_per_s": round(cold_rate, 1),
            "goal_ratio": 0.8,
        },
        "data_path": {
            "images": args.data_path_count, "image_size": FREE_SIZE, "n_depth": FREE_DEPTH,
            "data_path_images_per_s_per_core": round(data_path_rate / CORES, 1),
            "bare_loop_images_per_s": round(loop_rate, 1),
            "ratio_data_path_to_loop": round(data_path_rate / loop_rate, 2),
            "goal_images_per_s_per_core": 300, "goal_ratio": 1.5,
        },
    }))


if __name__ == "__main__":
    main()
