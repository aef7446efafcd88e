"""The Oxford-IIIT Pet release as distributed: images/, annotations/trimaps/, annotations/{trainval,test}.txt.

Images and trimaps are paired by file stem with a join, and splits come from the list files, never
from sort order. Images are read with Spark's binaryFile source and stay in their scan partitions;
the trimaps (~3 KB each, ~22 MB for the whole release) and the lists are broadcast to them, so the
large side is never shuffled. Trimaps over :data:`TRIMAP_BROADCAST_BYTES` in all are joined by key
instead: a shuffle, which no driver memory or broadcast limit bounds.

Images that are in neither list are dropped and reported in the rejects table as
``not_in_split_lists``: the split lists define the benchmark, and guessing a split would leak test
images into training. Two files with one stem (``x.jpg`` and ``x.png``, or two trimaps) would be one
id with two sets of pixels: every image file of that stem is rejected as ``duplicate_id``.
"""

from __future__ import annotations

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
#: Trimaps up to this many bytes in all are broadcast to the images. A broadcast is built on the
#: driver (a few times its size in JVM memory), so 64 MiB keeps a 1 GB driver safe; the release's
#: 22 MB fits, a million trimaps (~3 GB) are joined by key.
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

    # File names only (binaryFile reads no content for these), gathered on the driver: ~7,400 short rows.
    images = _binary_files(spark, images_url, IMAGE_GLOB)
    trimaps = _binary_files(spark, trimaps_url, TRIMAP_GLOB)
    (image_files, _), (trimap_files, trimap_bytes) = _paths_by_stem(images), _paths_by_stem(trimaps)
    listed = _read_lists(spark, list_urls)

    # Zero-length files are invisible to Spark's file listing (SPARK-26161, SPARK-27291), yet an empty
    # image is bad input to report, not to lose. Look for them only where a file was expected.
    empty_images = _empty_files(storage, images_url, (set(listed) | set(trimap_files)) - set(image_files),
                                IMAGE_EXTENSIONS)
    empty_trimaps = _empty_files(storage, trimaps_url, (set(listed) | set(image_files)) - set(trimap_files),
                                 TRIMAP_EXTENSIONS)
    for found, empty in ((image_files, empty_images), (trimap_files, empty_trimaps)):
        for stem, paths in empty.items():
            found.setdefault(stem, []).extend(paths)
    image_ids, trimap_ids = set(image_files), set(trimap_files)
    if not image_ids:
        raise InputError(f"{images_url} holds no image files ({IMAGE_GLOB}); is data.input the right folder?")

    image_rows = images.select(_stem().alias("id"), "path", F.col("content").alias("image"))
    if empty_images:
        ids, paths = zip(*[(stem, path) for stem, found in empty_images.items() for path in found])
        image_rows = image_rows.unionByName(_local(spark, {"id": ids, "path": paths, "image": [b""] * len(ids)},
                                                   "id string, path string, image binary"))
    mask_rows = trimaps.select(_stem().alias("id"), F.col("content").alias("mask"))
    if empty_trimaps:
        ids = [stem for stem, found in empty_trimaps.items() for _ in found]
        mask_rows = mask_rows.unionByName(_local(spark, {"id": ids, "mask": [b""] * len(ids)}, "id string, mask binary"))
    duplicates = _duplicate_ids(image_files, trimap_files)
    # One trimap row per stem, so the join below gives each image file exactly one row.
    if duplicates:
        mask_rows = mask_rows.where(~F.col("id").isin(list(duplicates)))
    duplicate_rows = _local(spark, {"id": list(duplicates), "duplicate": list(duplicates.values())},
                            "id string, duplicate string")
    split_rows = _local(
        spark,
        {
            "id": list(listed),
            "split": [split if n == 1 else None for split, _, n in listed.values()],
            "n_lists": [n for _, _, n in listed.values()],
        },
        "id string, split string, n_lists int",
    )

    # The large side (images) stays in its scan partitions; trimaps (when small) and lists are broadcast to it.
    if trimap_bytes <= broadcast_bytes:
        paired = image_rows.coalesce(partitions).join(F.broadcast(mask_rows), "id", "left")
    else:
        paired = image_rows.join(mask_rows, "id", "left")
    paired = (
        paired.join(F.broadcast(split_rows), "id", "left")
        .join(F.broadcast(duplicate_rows), "id", "left")
    )
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
    unpaired = [
        (stem, None, f"{trimaps_url}/{stem}.png", "image_missing", f"trimap has no image {stem}.* in {images_url}")
        for stem in sorted(trimap_ids - image_ids)
    ] + [
        (stem, listed[stem][0], listed[stem][1], "listed_files_missing", "listed, but neither image nor trimap exists")
        for stem in sorted(set(listed) - image_ids - trimap_ids)
    ]
    if unpaired:
        columns = ["id", "split", "path", "reason", "detail"]
        extra = _local(spark, {c: [row[i] for row in unpaired] for i, c in enumerate(columns)},
                       ", ".join(f"{c} string" for c in columns))
        pairs = pairs.unionByName(extra, allowMissingColumns=True)
    return pairs.select([f.name for f in PAIRS_SCHEMA.fields])


def _binary_files(spark: SparkSession, url: str, glob: str) -> DataFrame:
    return spark.read.format("binaryFile").option("pathGlobFilter", glob).load(url)


def _local(spark: SparkSession, columns: dict[str, list], schema: str) -> DataFrame:
    """A small driver-side table; built from pandas through Arrow, so no Python task has to serve it."""
    return spark.createDataFrame(pd.DataFrame(columns), schema)


def _paths_by_stem(files: DataFrame) -> tuple[dict[str, list[str]], int]:
    """(stem -> paths, total bytes) of the listed files; no file is read."""
    found: dict[str, list[str]] = {}
    total = 0
    for row in files.select(_stem().alias("id"), "path", "length").collect():
        found.setdefault(row.id, []).append(row.path)
        total += row.length
    return found, total


def _empty_files(storage: Storage, url: str, stems: set[str], extensions: tuple[str, ...]) -> dict[str, list[str]]:
    """stem -> paths of zero-length files named ``<stem>.<ext>`` under ``url``, for the given stems."""
    found: dict[str, list[str]] = {}
    for stem in sorted(stems):
        for path, length in storage.glob(url, f"{stem}.*"):
            if length == 0 and path.rsplit(".", 1)[-1] in extensions:
                found.setdefault(stem, []).append(path)
    return found


def _duplicate_ids(images: dict[str, list[str]], trimaps: dict[str, list[str]]) -> dict[str, str]:
    """stem -> why its images are rejected, for stems with several image files or several trimaps: the
    stem is the example's id, and no rule could say which file it should be."""
    found: dict[str, str] = {}
    for what, files in (("trimaps", trimaps), ("image files", images)):  # images last: their detail wins
        for stem, paths in files.items():
            if len(paths) > 1:
                names = ", ".join(sorted(p.rsplit("/", 1)[-1] for p in paths))
                found[stem] = (f"{len(paths)} {what} share the id {stem!r} ({names}); keep one {stem}.* "
                               f"and rename or remove the others")
    return found


def _read_lists(spark: SparkSession, lists: dict[str, str]) -> dict[str, tuple[str, str, int]]:
    """id -> (split, list path, number of lists naming it), from the release's list files; '#' starts a comment."""
    found: dict[str, list[tuple[str, str]]] = {}
    for split, url in lists.items():
        for row in spark.read.text(url).collect():
            line = row.value.strip()
            if line and not line.startswith("#"):
                found.setdefault(line.split()[0], []).append((split, url))
    return {stem: (entries[0][0], entries[0][1], len({s for s, _ in entries})) for stem, entries in found.items()}
