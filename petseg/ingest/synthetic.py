"""Synthetic pets generated on the executors, each task rendering its own slice of indices."""

from __future__ import annotations

from typing import Iterator

from pyspark.sql import DataFrame, SparkSession

from petseg.data import render
from petseg.ingest.pairs import PAIRS_SCHEMA


def load_synthetic(spark: SparkSession, *, count: int, seed: int, test_fraction: float, partitions: int) -> DataFrame:
    """``count`` encoded synthetic pets (JPEG image, PNG trimap), as files in the Oxford release would be."""

    def render_slice(indices: Iterator[int]) -> Iterator[tuple]:
        for i in indices:
            pet = render.synthetic_pet(i, seed=seed, test_fraction=test_fraction)
            path = f"synthetic://seed={seed}/{pet.stem}"
            yield (pet.stem, pet.split, path, render.encode_jpeg(pet.image), render.encode_png(pet.trimap), None, None, None)

    rdd = spark.sparkContext.parallelize(range(count), min(count, partitions)).mapPartitions(render_slice)
    return spark.createDataFrame(rdd, PAIRS_SCHEMA)
