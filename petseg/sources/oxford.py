"""The Oxford-IIIT Pet release as distributed: images/, annotations/trimaps/, annotations/{trainval,test}.txt.

Images and trimaps are paired by file stem with a join, and splits come from the list files, never
from sort order. Images are read with Spark's binaryFile source and stay in their scan partitions;
the trimaps (~3 KB each, ~22 MB for the whole release) and the lists are broadcast to them, so the
large side is never shuffled.

Images that are in neither list are dropped and reported in the rejects table as
``not_in_split_lists``: the split lists define the benchmark, and guessing a split would leak test
images into training.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from petseg.sources import PAIRS_SCHEMA, InputError
from petseg.storage import Storage

#: Image files are matched by extension only to find them; decoding goes by content.
IMAGE_GLOB = "*.{jpg,jpeg,JPG,JPEG,png,PNG}"
TRIMAP_GLOB = "*.{png,PNG}"
#: List file -> split name (TFDS and the reference notebook call trainval "train").
SPLIT_LISTS = {"train": "annotations/trainval.txt", "test": "annotations/test.txt"}

# The stem is the file name without its extension; Spark already skips hidden files such as the
# release's "._Abyssinian_1.png" AppleDouble entries.
_STEM = F.regexp_extract("path", r"([^/]+)\.[A-Za-z0-9]+$", 1)


def load_oxford(spark: SparkSession, *, root: str, partitions: int | None = None) -> DataFrame:
    """Pair the release's images with their trimaps and splits.

    Parameters
    ----------
    root
        URL of the folder that holds ``images/`` and ``annotations/``.
    partitions
        Repartition the pairs to this many tasks; None keeps binaryFile's size-based split.

    Raises
    ------
    InputError
        When the folders or both split lists are missing, or no image file is found.
    """
    root = root.rstrip("/")
    storage = Storage(spark)
    images_url, trimaps_url = f"{root}/images", f"{root}/annotations/trimaps"
    missing = [u for u in (images_url, trimaps_url) if not storage.is_dir(u)]
    if missing:
        raise InputError(
            f"data.input={root!r} is not an Oxford-IIIT Pet folder: {', '.join(missing)} not found. Point "
            "data.input at the folder where images.tar.gz and annotations.tar.gz were unpacked"
        )
    lists = {split: f"{root}/{rel}" for split, rel in SPLIT_LISTS.items() if storage.exists(f"{root}/{rel}")}
    if not lists:
        raise InputError(
            f"no split lists under {root}/annotations: expected trainval.txt and/or test.txt from annotations.tar.gz"
        )

    images = _binary_files(spark, images_url, IMAGE_GLOB).select(
        _STEM.alias("id"), "path", F.col("content").alias("image")
    )
    if images.select("path").limit(1).count() == 0:
        raise InputError(f"{images_url} holds no image files ({IMAGE_GLOB}); is data.input the right folder?")
    trimaps = _binary_files(spark, trimaps_url, TRIMAP_GLOB).select(
        _STEM.alias("id"), F.col("path").alias("mask_path"), F.col("content").alias("mask")
    )
    listed = _read_lists(spark, lists)

    paired = images.join(F.broadcast(trimaps), "id", "left").join(F.broadcast(listed), "id", "left")
    reason = (
        F.when(F.col("mask").isNull(), F.lit("mask_missing"))
        .when(F.col("n_lists") > 1, F.lit("in_both_split_lists"))
        .when(F.col("split").isNull(), F.lit("not_in_split_lists"))
    )
    detail = (
        F.when(F.col("mask").isNull(), F.concat(F.lit("no trimap "), F.col("id"), F.lit(".png in "), F.lit(trimaps_url)))
        .when(F.col("n_lists") > 1, F.lit("listed in both trainval.txt and test.txt; keep it in one"))
        .when(F.col("split").isNull(), F.lit("listed in neither trainval.txt nor test.txt"))
    )
    pairs = paired.select(
        "id",
        F.when(F.col("n_lists") > 1, F.lit(None)).otherwise(F.col("split")).alias("split"),
        "path",
        "image",
        "mask",
        reason.alias("reason"),
        detail.alias("detail"),
    )
    if partitions:
        pairs = pairs.repartition(partitions)

    # Trimaps without an image, and listed stems with no file at all, are reported too: nothing is lost.
    image_ids = images.select("id")
    orphans = trimaps.join(image_ids, "id", "left_anti").select(
        "id",
        F.lit(None).cast("string").alias("split"),
        F.col("mask_path").alias("path"),
        F.lit(None).cast("binary").alias("image"),
        F.lit(None).cast("binary").alias("mask"),
        F.lit("image_missing").alias("reason"),
        F.concat(F.lit("trimap has no image "), F.col("id"), F.lit(".* in "), F.lit(images_url)).alias("detail"),
    )
    ghosts = (
        listed.join(image_ids, "id", "left_anti")
        .join(trimaps.select("id"), "id", "left_anti")
        .select(
            "id",
            "split",
            F.col("list_path").alias("path"),
            F.lit(None).cast("binary").alias("image"),
            F.lit(None).cast("binary").alias("mask"),
            F.lit("listed_files_missing").alias("reason"),
            F.lit("listed, but neither image nor trimap exists").alias("detail"),
        )
    )
    return pairs.unionByName(orphans).unionByName(ghosts).select([f.name for f in PAIRS_SCHEMA.fields])


def _binary_files(spark: SparkSession, url: str, glob: str) -> DataFrame:
    """(path, content) of every file matching ``glob`` under ``url``, zero-length files included."""
    files = spark.read.format("binaryFile").option("pathGlobFilter", glob).load(url).select("path", "content")
    return files.unionByName(_empty_files(spark, url, glob))


def _empty_files(spark: SparkSession, url: str, glob: str) -> DataFrame:
    """Zero-length files, which Spark's file sources drop while listing (SPARK-26161, SPARK-27291).

    An empty image or trimap is bad input that must reach the rejects table, not vanish; this
    driver-side listing finds them so they can be added back with empty content.
    """
    hidden = ("_", ".")  # the same names Spark's listing ignores
    empty = [
        (path, bytearray())
        for path, length in Storage(spark).glob(url, glob)
        if length == 0 and not path.rsplit("/", 1)[-1].startswith(hidden)
    ]
    return spark.createDataFrame(empty, "path string, content binary")


def _read_lists(spark: SparkSession, lists: dict[str, str]) -> DataFrame:
    """(id, split, list_path, n_lists) from the release's list files; '#' lines are comments."""
    frames = []
    for split, url in lists.items():
        lines = spark.read.text(url).select(F.trim("value").alias("line"))
        frames.append(
            lines.where((F.length("line") > 0) & ~F.col("line").startswith("#")).select(
                F.split("line", r"\s+").getItem(0).alias("id"), F.lit(split).alias("split"), F.lit(url).alias("list_path")
            )
        )
    union = frames[0]
    for frame in frames[1:]:
        union = union.unionByName(frame)
    return union.groupBy("id").agg(
        F.min("split").alias("split"), F.min("list_path").alias("list_path"), F.countDistinct("split").alias("n_lists")
    )
