"""The TensorFlow Datasets build of Oxford-IIIT Pet (``oxford_iiit_pet``) from a prepared data_dir.

The driver reads only the dataset's metadata and cuts each split into slices; executors open the
same data_dir and read their slice, so the data_dir must be reachable from every node (a shared
file system, GCS, or DBFS). Images and masks are read still encoded (``SkipDecoding``), so they go
through exactly the same decoding and checks as files of the Oxford release.
"""

from __future__ import annotations

from typing import Iterator

from pyspark.sql import DataFrame, SparkSession

from petseg.data.schema import SPLITS
from petseg.errors import InputError
from petseg.ingest.pairs import PAIRS_SCHEMA

#: Examples per Spark task: small enough to spread ~7,000 pets over many cores, large enough that
#: opening the TFRecord shards and importing TensorFlow in the worker is amortised.
SLICE_SIZE = 256


def load_tfds(
    spark: SparkSession, *, data_dir: str, name: str = "oxford_iiit_pet", download: bool = False
) -> DataFrame:
    """Read the ``train`` and ``test`` splits of a prepared TFDS dataset as encoded pairs.

    Raises
    ------
    InputError
        When the dataset is not prepared under ``data_dir`` and downloading is not allowed.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if not download:
            raise InputError(
                f"no prepared TFDS dataset {name!r} under data.input={data_dir!r}. Prepare it where the internet is "
                f"reachable (`tfds build {name} --data_dir {data_dir}`) and copy the folder, or set "
                "data.tfds_download=true to download it now"
            )
        builder.download_and_prepare()
    slices = plan_slices({split: info.num_examples for split, info in builder.info.splits.items()})
    if not slices:
        raise InputError(f"TFDS dataset {name!r} under {data_dir!r} has no examples in splits {', '.join(SPLITS)}")

    def read(tasks: Iterator[tuple[str, int, int]]) -> Iterator[tuple]:
        for split, start, stop in tasks:
            yield from read_slice(name=name, data_dir=data_dir, split=split, start=start, stop=stop)

    rdd = spark.sparkContext.parallelize(slices, len(slices)).mapPartitions(read)  # one task per slice
    return spark.createDataFrame(rdd, PAIRS_SCHEMA)


def plan_slices(split_sizes: dict[str, int], *, slice_size: int = SLICE_SIZE) -> list[tuple[str, int, int]]:
    """``(split, start, stop)`` ranges covering petseg's splits; other TFDS splits are ignored."""
    return [
        (split, start, min(start + slice_size, size))
        for split, size in sorted(split_sizes.items())
        if split in SPLITS
        for start in range(0, size, slice_size)
    ]


def read_slice(*, name: str, data_dir: str, split: str, start: int, stop: int) -> Iterator[tuple]:
    """Rows of :data:`PAIRS_SCHEMA` for examples ``start:stop`` of ``split``, image and mask still encoded."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    ds = builder.as_dataset(
        split=f"{split}[{start}:{stop}]",
        shuffle_files=False,
        # Only the three features petseg uses, image and mask left encoded for petseg's own decoder.
        decoders=tfds.decode.PartialDecoding(
            {"image": True, "segmentation_mask": True, "file_name": True},
            decoders={"image": tfds.decode.SkipDecoding(), "segmentation_mask": tfds.decode.SkipDecoding()},
        ),
    )
    for example in tfds.as_numpy(ds):
        file_name = example["file_name"].decode()
        stem = file_name.rsplit(".", 1)[0]
        yield (stem, split, f"tfds://{name}/{split}/{file_name}", example["image"], example["segmentation_mask"], None, None, None)
