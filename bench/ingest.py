"""Ingest throughput: the Spark job on local cores beside a bare single-process loop. Prints JSON.

Both sides read the same Oxford-layout files (synthetic pets, 500x375 JPEG, like the release's photos)
and do the same work per image: decode by content, check, resize, encode with the dataset's codecs.
The job also pairs by stem, writes Parquet and the Petastorm metadata (petastorm's writer or petseg's,
as the stack allows: "writer" in the JSON); the loop writes nothing.

    python bench/ingest.py [--count 500] [--cores 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from petseg import config
from petseg.data import render
from petseg.data.decode import prepare_example
from petseg.data.schema import encode_value, pet_fields
from petseg.model.artifact import versions


def bare_loop(root: Path, *, image_size: int, codec: str) -> tuple[int, float]:
    """The same per-image work in one process pinned to one core (OpenCV would otherwise use them all)."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    fields = {f.name: f for f in pet_fields(image_size=image_size, image_codec=codec)}
    image_field, mask_field = fields["image"], fields["mask"]
    start, n = time.perf_counter(), 0
    for path in sorted((root / "images").glob("*.jpg")):
        trimap = root / "annotations" / "trimaps" / f"{path.stem}.png"
        example = prepare_example(path.read_bytes(), trimap.read_bytes(), size=image_size)
        encode_value(image_field, example.image)
        encode_value(mask_field, example.mask)
        n += 1
    return n, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="at least 500; more amortises Spark start-up")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. data.partitions=8")
    parser.add_argument("--repeats", type=int, default=3, help="timed job runs; the best is reported")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "oxford"
        render.write_oxford_layout(root, count=args.count, seed=0, test_fraction=0.5, size=(500, 375), keep=False)
        cfg = config.parse_job_arguments(
            [
                f"spark.master=local[{args.cores}]",
                "data.source=oxford",
                f"data.input={root}",
                f"data.dataset={Path(tmp) / 'pets'}",
                *args.overrides,
            ],
            local=True,
        )
        from petseg.ingest.convert import run_ingest
        from petseg.session import get_or_create

        spark = get_or_create(**config.to_dict(cfg.spark))
        spark.sparkContext.setLogLevel("ERROR")
        run_ingest(spark, data=cfg.data)  # warm-up: JVM JIT, Python worker start-up
        times, phases = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            report = run_ingest(spark, data=cfg.data)
            times.append(time.perf_counter() - start)
            phases.append(report.seconds)
        spark.stop()
        written = sum(report.written.values())
        # Last: pinning this process to one core also pins the threads it starts afterwards.
        n, loop_s = bare_loop(root, image_size=cfg.data.image_size, codec=cfg.data.image_codec.value)

    job_rate, loop_rate = written / min(times), n / loop_s
    print(
        json.dumps(
            {
                "bench": "ingest",
                "images": args.count,
                "image_size_in": "500x375 jpeg",
                "image_size_out": cfg.data.image_size,
                "codec": cfg.data.image_codec.value,
                "spark_cores": args.cores,
                "job_images_per_s": round(job_rate, 1),
                "job_seconds": [round(t, 2) for t in times],
                "best_job_phase_seconds": phases[times.index(min(times))],
                "bare_loop_images_per_s": round(loop_rate, 1),
                "ratio_job_to_loop": round(job_rate / loop_rate, 2),
                "goal_ratio": 1.5,
                "writer": report.writer,
                "stack": versions(),
            }
        )
    )


if __name__ == "__main__":
    main()
