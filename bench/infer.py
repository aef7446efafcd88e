"""Inference throughput: the Spark inference job beside a plain model.predict. Prints JSON.

Both use the recipe's model (128x128, 5-level VGG16-BN U-Net, random weights: speed does not depend
on them) and the same synthetic 500x375 JPEG photos in a folder. The job on local[2] does
everything (list, read, decode, predict, encode the PNG masks, write Parquet); the plain predict
gets the images already decoded and resized, in one process with TensorFlow's pools at 2 threads,
the job's two tasks' worth. The job is timed warm (a first run on a few rows loads the model in
each Python worker; Spark reuses those workers) and cold.

    python bench/infer.py [--count 400] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from petseg import config, env

SIZE, N_DEPTH, CORES = 128, 5, 2


def export_run(run: Path) -> None:
    from petseg.model import artifact, build_unet

    model = build_unet(image_size=SIZE, n_depth=N_DEPTH, encoder_weights="none", encoder_batch_norm=True)
    model.save(str(run / artifact.MODEL_FOLDER), include_optimizer=False)
    artifact.write_metadata(run, image_size=SIZE, preprocessing="unit_scale", run_id="bench")


def plain_predict_rate(run: Path, photos: list[Path], *, batch: int) -> float:
    import numpy as np
    import tensorflow as tf

    from petseg.data.decode import decode_for_model
    from petseg.model import artifact
    from petseg.model.preprocessing import preprocess

    model = tf.keras.models.load_model(str(artifact.resolve(str(run)).model_dir), compile=False)
    images = np.stack([decode_for_model(p.read_bytes(), size=SIZE)[0] for p in photos])
    model.predict(preprocess(images[:batch], "unit_scale"), batch_size=batch, verbose=0)  # trace and warm up
    start = time.perf_counter()
    np.argmax(model.predict(preprocess(images, "unit_scale"), batch_size=batch, verbose=0), axis=-1)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400, help="photos to segment")
    parser.add_argument("--batch", type=int, default=32, help="infer.batch_size and the plain predict's batch")
    args = parser.parse_args()
    env.prepare_process_environment(master=f"local[{CORES}]")  # TF_USE_LEGACY_KERAS before TensorFlow

    import tensorflow as tf

    # The plain predict's pools: the job's two tasks' worth of cores (set before TensorFlow starts).
    tf.config.threading.set_intra_op_parallelism_threads(CORES)
    tf.config.threading.set_inter_op_parallelism_threads(CORES)
    from petseg.data import render

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path, run = Path(tmp), Path(tmp) / "run"
        photos = []
        for i in range(args.count):
            path = tmp_path / "photos" / f"pet_{i:05d}.jpg"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(render.encode_jpeg(render.synthetic_pet(i, seed=0, size=(500, 375)).image))
            photos.append(path)
        run.mkdir()
        export_run(run)

        # The job first, so that this process's TensorFlow (the plain predict) does not share the cores.
        from petseg.infer.job import run_infer
        from petseg.session import get_or_create

        def job(*extra: str) -> tuple[float, object]:
            cfg = config.parse_job_arguments(
                [f"spark.master=local[{CORES}]", f"infer.model={run}", f"infer.input={tmp_path / 'photos'}",
                 f"infer.output={tmp_path / 'masks'}", f"infer.batch_size={args.batch}", *extra], job="infer")
            spark = get_or_create(cfg.spark)
            spark.sparkContext.setLogLevel("ERROR")
            start = time.perf_counter()
            report = run_infer(spark, infer=cfg.infer)
            return time.perf_counter() - start, report

        cold_seconds, _ = job(f"infer.limit={args.batch}")  # loads the model in each Python worker
        cold_rate = args.batch / cold_seconds
        seconds, report = job()
        assert report.segmented == args.count, report.format()
        print(report.format(), file=sys.stderr)
        job_rate = args.count / seconds
        from pyspark.sql import SparkSession

        SparkSession.builder.getOrCreate().stop()
        plain_rate = plain_predict_rate(run, photos, batch=args.batch)

    print(json.dumps({
        "bench": "infer", "images": args.count, "photo_size": "500x375", "image_size": SIZE, "n_depth": N_DEPTH,
        "batch": args.batch, "spark_cores": CORES, "cpu_cores": os.cpu_count(),
        "job_images_per_s": round(job_rate, 1),
        "plain_predict_images_per_s": round(plain_rate, 1),
        "ratio_job_to_plain": round(job_rate / plain_rate, 2),
        "cold_job_images_per_s": round(cold_rate, 1),
        "goal_ratio": 0.8,
    }))


if __name__ == "__main__":
    main()
