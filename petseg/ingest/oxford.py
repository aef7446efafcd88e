"""The Oxford-IIIT Pet release as distributed: images/, annotations/trimaps/, annotations/{trainval,test}.txt.

Images and trimaps are paired by file stem with a join, and splits come from the list files, never
from sort order. Images are read with Spark's binaryFile source and stay in their scan partitions
when the trimaps are few enough to broadcast to them (the release's 7,390 are ~22 MB); beyond
:data:`TRIMAP_BROADCAST_BYTES` both are joined by key, a shuffle that no driver or broadcast limit
bounds. Pairing, duplicate and missing-file checks are DataFrame operations: only the anomalies
(stems with a file missing on one side) ever reach the driver, so it stays flat as the data grows.

Images that are in neither list are dropped and reported in the rejects table as
``not_in_split_lists``: the split lists define the benchmark, and guessing a split would leak test
images into training. Two files with one stem (``x.jpg`` and ``x.png``, or two trimaps) would be one
id with two sets of pixels: every image file of that stem is rejected as ``duplicate_id``.
"""

from __future__ import annotations

import functools

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from petseg.errors import InputError
from petseg.ingest.pairs import PAIRS_SCHEMA
from petseg.io.fs import Storage

#: Image files are matched by extension only to find them; decoding goes by content.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "JPG", "JPEG", "png", "PNG")
TRIMAP_EXTENSIONS = ("png", "PNG")
IMAGE_GLOB = "*.{" + ",".join(IMAGE_EXTENSIONS) + "}"
TRIMAP_GLOB = "*.{" + ",".join(TRIMAP_EXTENSIONS) + "}"
#: List file -> split name (TFDS and the reference notebook call trainval "train").
SPLIT_LISTS = {"train": "annotations/trainval.txt", "test": "annotations/test.txt"}
#: Trimaps up to this many bytes in all are broadcast to the images, which then stay in their scan
#: partitions. A broadcast is built on the driver (a few times its size in JVM memory), so 64 MiB
#: keeps a 1 GB driver safe; Oxford's 22 MB fits, a million trimaps (~3 GB) are joined by key.
TRIMAP_BROADCAST_BYTES = 64 * 1024 * 1024


def _stem(path: str = "path") -> F.Column:
    """The file name without its extension (Spark's listing already skips hidden files such as the
    release's "._Abyssinian_1.png" AppleDouble entries)."""
    return F.regexp_extract(path, r"([^/]+)\.[A-Za-z0-9]+$", 1)


def load_oxford(
    spark: SparkSession, *, root: str, partitions: int, broadcast_bytes: int = TRIMAP_BROADCAST_BYTES
) -> DataFrame:
    """Pair the release's images with their trimaps and splits.

    Parameters
    ----------
    root
        URL of the folder that holds ``images/`` and ``annotations/``.
    partitions
        Decode in this many tasks. binaryFile splits by bytes into many small tasks; merging them
        (a narrow coalesce, no shuffle) saves the fixed cost of each Python task.
    broadcast_bytes
        Broadcast the trimaps when their files add up to at most this; otherwise join by key.

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
    list_urls = {split: f"{root}/{rel}" for split, rel in SPLIT_LISTS.items() if storage.exists(f"{root}/{rel}")}
    if not list_urls:
        raise InputError(
            f"no split lists under {root}/annotations: expected trainval.txt and/or test.txt from annotations.tar.gz"
        )

    images = _binary_files(spark, images_url, IMAGE_GLOB)
    trimaps = _binary_files(spark, trimaps_url, TRIMAP_GLOB)
    listed = _read_lists(spark, list_urls)
    image_rows = images.select(_stem().alias("id"), "path", F.col("content").alias("image"))
    mask_rows = trimaps.select(_stem().alias("id"), "path", F.col("content").alias("mask"))

    # Zero-length files are invisible to Spark's file listing (SPARK-26161, SPARK-27291), yet an empty
    # image is bad input to report, not to lose. Look for them only where a file was expected.
    image_keys, trimap_keys = image_rows.select("id", "path"), mask_rows.select("id", "path")
    empty_images = _empty_files(storage, images_url, _expected_but_absent(listed, trimap_keys, image_keys),
                                IMAGE_EXTENSIONS)
    empty_trimaps = _empty_files(storage, trimaps_url, _expected_but_absent(listed, image_keys, trimap_keys),
                                 TRIMAP_EXTENSIONS)
    image_rows = _with_empty_files(spark, image_rows, empty_images, "image")
    mask_rows = _with_empty_files(spark, mask_rows, empty_trimaps, "mask")
    image_keys, trimap_keys = image_rows.select("id", "path"), mask_rows.select("id", "path")
    if image_keys.isEmpty():
        raise InputError(f"{images_url} holds no image files ({IMAGE_GLOB}); is data.input the right folder?")

    # Images last: where both sides have duplicates, the images' detail wins.
    image_duplicates = _duplicate_ids(image_keys, "image files")
    duplicates = image_duplicates.unionByName(
        _duplicate_ids(trimap_keys, "trimaps").join(image_duplicates, "id", "left_anti")
    )
    # One trimap row per stem, so the join below gives each image file exactly one row.
    masks = mask_rows.select("id", "mask").join(F.broadcast(duplicates), "id", "left_anti")
    trimap_bytes = trimaps.agg(F.sum("length")).first()[0] or 0  # from the listing; no trimap is read
    if trimap_bytes <= broadcast_bytes:
        # The large side (images) stays in its scan partitions, merged into fewer tasks.
        paired = image_rows.coalesce(partitions).join(F.broadcast(masks), "id", "left")
    else:
        paired = image_rows.join(masks, "id", "left")
    # Lists and duplicates hold an id and a few words per image: small beside the images, broadcast.
    paired = paired.join(F.broadcast(listed), "id", "left").join(F.broadcast(duplicates), "id", "left")
    reason = (
        F.when(F.col("duplicate").isNotNull(), F.lit("duplicate_id"))
        .when(F.col("mask").isNull(), F.lit("mask_missing"))
        .when(F.col("n_lists") > 1, F.lit("in_both_split_lists"))
        .when(F.col("split").isNull(), F.lit("not_in_split_lists"))
    )
    detail = (
        F.when(F.col("duplicate").isNotNull(), F.col("duplicate"))
        .when(F.col("mask").isNull(), F.concat(F.lit("no trimap "), F.col("id"), F.lit(f".png in {trimaps_url}")))
        .when(F.col("n_lists") > 1, F.lit("listed in both trainval.txt and test.txt; keep it in one"))
        .when(F.col("split").isNull(), F.lit("listed in neither trainval.txt nor test.txt"))
    )
    pairs = paired.select("id", "split", "path", "image", "mask", reason.alias("reason"), detail.alias("detail"))

    # Trimaps without an image, and listed stems with no file at all, are reported too: nothing is lost.
    image_ids, trimap_ids = image_keys.select("id"), trimap_keys.select("id")
    trimaps_alone = trimap_keys.join(image_ids, "id", "left_anti").groupBy("id").agg(
        F.lit(None).cast("string").alias("split"),
        F.min("path").alias("path"),
        F.lit("image_missing").alias("reason"),
        F.concat(F.lit("trimap has no image "), F.col("id"), F.lit(f".* in {images_url}")).alias("detail"),
    )
    listed_alone = listed.join(image_ids, "id", "left_anti").join(trimap_ids, "id", "left_anti").select(
        "id", "split", F.col("list_path").alias("path"), F.lit("listed_files_missing").alias("reason"),
        F.lit("listed, but neither image nor trimap exists").alias("detail"),
    )
    for extra in (trimaps_alone, listed_alone):
        pairs = pairs.unionByName(extra, allowMissingColumns=True)
    return pairs.select([f.name for f in PAIRS_SCHEMA.fields])


def _binary_files(spark: SparkSession, url: str, glob: str) -> DataFrame:
    return spark.read.format("binaryFile").option("pathGlobFilter", glob).load(url)


def _expected_but_absent(listed: DataFrame, other_side: DataFrame, keys: DataFrame) -> set[str]:
    """Stems named by the split lists or the other folder but with no file in ``keys``: the only
    stems that reach the driver, a handful in a sound release."""
    expected = listed.select("id").unionByName(other_side.select("id")).distinct()
    return {row.id for row in expected.join(keys.select("id"), "id", "left_anti").collect()}


def _empty_files(storage: Storage, url: str, stems: set[str], extensions: tuple[str, ...]) -> list[tuple[str, str]]:
    """(stem, path) of zero-length files named ``<stem>.<ext>`` under ``url``, for the given stems."""
    found = []
    for stem in sorted(stems):
        for path, length in storage.glob(url, f"{stem}.*"):
            if length == 0 and path.rsplit(".", 1)[-1] in extensions:
                found.append((stem, path))
    return found


def _with_empty_files(spark: SparkSession, rows: DataFrame, empty: list[tuple[str, str]], column: str) -> DataFrame:
    """``rows`` (id, path, <column>) plus a row with no bytes for each empty file; built from pandas
    through Arrow, so no Python task has to serve it."""
    if not empty:
        return rows
    ids, paths = zip(*empty)
    extra = pd.DataFrame({"id": ids, "path": paths, column: [b""] * len(ids)})
    return rows.unionByName(spark.createDataFrame(extra, f"id string, path string, {column} binary"))


def _duplicate_ids(keys: DataFrame, what: str) -> DataFrame:
    """(id, duplicate: why its images are rejected) for stems with several files in ``keys``: the
    stem is the example's id, and no rule could say which file it should be."""
    names = F.array_join(F.sort_array(F.collect_list(F.regexp_extract("path", r"[^/]+$", 0))), ", ")
    return (
        keys.groupBy("id")
        .agg(F.count("*").alias("n"), names.alias("names"))
        .where(F.col("n") > 1)
        .select("id", F.format_string(
            f"%d {what} share the id '%s' (%s); keep one %s.* and rename or remove the others",
            "n", "id", "names", "id",
        ).alias("duplicate"))
    )


def _read_lists(spark: SparkSession, lists: dict[str, str]) -> DataFrame:
    """(id, split, list_path, n_lists) from the release's list files, one row per listed id; split is
    null for an id in both lists. '#' starts a comment; the id is a line's first word."""
    lines = functools.reduce(DataFrame.unionByName, [
        spark.read.text(url).select(F.lit(split).alias("split"), F.lit(url).alias("list_path"),
                                    F.trim("value").alias("line"))
        for split, url in lists.items()
    ])
    lines = lines.where((F.col("line") != "") & ~F.col("line").startswith("#"))
    return (
        lines.select(F.split("line", r"\s+").getItem(0).alias("id"), "split", "list_path")
        .groupBy("id")
        .agg(F.countDistinct("split").alias("n_lists"), F.min("split").alias("split"),
             F.min("list_path").alias("list_path"))
        .select("id", F.when(F.col("n_lists") == 1, F.col("split")).alias("split"), "list_path", "n_lists")
    )
