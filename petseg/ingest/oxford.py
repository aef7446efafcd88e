"""The Oxford-IIIT Pet release as distributed: images/, annotations/trimaps/, annotations/{trainval,test}.txt.

Images and trimaps are paired by file stem with a join, and splits come from the list files, never
from sort order. Only their paths are paired: the decode task reads both files itself (see
:mod:`petseg.ingest.pairs` for why). Both folders are listed on the driver; the images' paths are
spread over the decode tasks, and the trimaps' paths and the lists are broadcast to them. Trimap
listings over :data:`TRIMAP_BROADCAST_BYTES` are joined by key instead: a shuffle, which no driver
memory or broadcast limit bounds.

Images that are in neither list are dropped and reported in the rejects table as
``not_in_split_lists``: the split lists define the benchmark, and guessing a split would leak test
images into training. Two files with one stem (``x.jpg`` and ``x.png``, or two trimaps) would be one
id with two sets of pixels: every image file of that stem is rejected as ``duplicate_id``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from petseg.errors import InputError, RejectedInput
from petseg.ingest.pairs import PAIRS_SCHEMA
from petseg.io.fs import list_files, read_file, storage_for

#: Image files are matched by extension only to find them; decoding goes by content.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "JPG", "JPEG", "png", "PNG")
TRIMAP_EXTENSIONS = ("png", "PNG")
IMAGE_GLOB = "*.{" + ",".join(IMAGE_EXTENSIONS) + "}"
TRIMAP_GLOB = "*.{" + ",".join(TRIMAP_EXTENSIONS) + "}"
#: List file -> split name (TFDS and the reference notebook call trainval "train").
SPLIT_LISTS = {"train": "annotations/trainval.txt", "test": "annotations/test.txt"}
#: Trimap listings (stems and paths) up to this many bytes are broadcast to the images. A broadcast
#: is built on the driver (a few times its size in JVM memory), so 64 MiB keeps a 1 GB driver safe;
#: the release's 7,390 (~0.7 MB) fit, millions of trimaps (~100 bytes each) are joined by key.
TRIMAP_BROADCAST_BYTES = 64 * 1024 * 1024
#: The file name without its extension: the example's id. The listing skips hidden files such as
#: the release's "._Abyssinian_1.png" AppleDouble entries.
_STEM = re.compile(r"([^/]+)\.[A-Za-z0-9]+$")


def load_oxford(
    spark: SparkSession, *, root: str, partitions: int, broadcast_bytes: int = TRIMAP_BROADCAST_BYTES
) -> DataFrame:
    """Pair the release's images with their trimaps and splits.

    Parameters
    ----------
    root
        URL of the folder that holds ``images/`` and ``annotations/``.
    partitions
        Decode in this many tasks: the images' paths are spread over them by a shuffle of paths
        alone, so each task reads and decodes its own files.
    broadcast_bytes
        Broadcast the trimaps' stems and paths when they add up to at most this; otherwise join by key.

    Raises
    ------
    InputError
        When the folders or both split lists are missing, or no image file is found.
    """
    listing = _list_release(spark, root=root.rstrip("/"))
    pairs = _paired_images(spark, listing, partitions=partitions, broadcast_bytes=broadcast_bytes)
    unpaired = _unpaired_files(spark, listing)
    if unpaired is not None:
        pairs = pairs.unionByName(unpaired, allowMissingColumns=True)
    return pairs.select([f.name for f in PAIRS_SCHEMA.fields])


@dataclass(frozen=True)
class _Listing:
    """The release as listed on the driver: files by stem, and the split lists' entries.

    Attributes
    ----------
    images_url, trimaps_url
        The two folders listed.
    image_files, trimap_files
        stem -> paths (more than one path for a duplicated stem).
    trimap_listing_bytes
        Bytes of the trimaps' stems and paths: what a broadcast of them would hold.
    listed
        stem -> (split, list path, number of lists naming it), from :func:`_read_lists`.
    """

    images_url: str
    trimaps_url: str
    image_files: dict[str, list[str]]
    trimap_files: dict[str, list[str]]
    trimap_listing_bytes: int
    listed: dict[str, tuple[str, str, int]]


def _list_release(spark: SparkSession, *, root: str) -> _Listing:
    """List the release under ``root`` (no trailing slash): its image and trimap files and its split lists.

    Raises
    ------
    InputError
        When the folders or both split lists are missing, or no image file is found.
    """
    storage = storage_for(spark)
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

    # Listed on the driver in one native call per folder (pyarrow), which, unlike Spark's file
    # listing (SPARK-26161), keeps zero-length files: they are read and rejected as empty, not lost.
    # The names are needed here anyway, to pair stems and report files without a partner.
    image_files, _ = _paths_by_stem(list_files(f"{images_url}/{IMAGE_GLOB}"))
    trimap_files, trimap_listing_bytes = _paths_by_stem(list_files(f"{trimaps_url}/{TRIMAP_GLOB}"))
    listed = _read_lists(list_urls)
    if not image_files:
        raise InputError(f"{images_url} holds no image files ({IMAGE_GLOB}); is data.input the right folder?")
    return _Listing(images_url=images_url, trimaps_url=trimaps_url, image_files=image_files,
                    trimap_files=trimap_files, trimap_listing_bytes=trimap_listing_bytes, listed=listed)


def _paired_images(spark: SparkSession, listing: _Listing, *, partitions: int, broadcast_bytes: int) -> DataFrame:
    """One row per image file, spread over ``partitions`` decode tasks: its trimap's path, its split,
    and the reason it is rejected, if any (see :func:`_rejection`); no file is read yet."""
    # Spread over the decode tasks by a shuffle of paths only: no file is read before the decode task.
    ids, paths = _flatten(listing.image_files)
    image_rows = _local(spark, {"id": ids, "path": paths}, "id string, path string").repartition(partitions)
    ids, paths = _flatten(listing.trimap_files)
    mask_rows = _local(spark, {"id": ids, "mask_path": paths}, "id string, mask_path string")
    duplicates = _duplicate_ids(listing.image_files, listing.trimap_files)
    # One trimap row per stem, so the join below gives each image file exactly one row.
    if duplicates:
        mask_rows = mask_rows.where(~F.col("id").isin(list(duplicates)))
    duplicate_rows = _local(spark, {"id": list(duplicates), "duplicate": list(duplicates.values())},
                            "id string, duplicate string")
    listed = listing.listed
    split_rows = _local(
        spark,
        {
            "id": list(listed),
            "split": [split if n == 1 else None for split, _, n in listed.values()],
            "n_lists": [n for _, _, n in listed.values()],
        },
        "id string, split string, n_lists int",
    )

    # The large side (images) stays in its decode partitions; trimaps (when small) and lists are broadcast to it.
    if listing.trimap_listing_bytes <= broadcast_bytes:
        paired = image_rows.join(F.broadcast(mask_rows), "id", "left")
    else:
        paired = image_rows.join(mask_rows, "id", "left")
    paired = (
        paired.join(F.broadcast(split_rows), "id", "left")
        .join(F.broadcast(duplicate_rows), "id", "left")
    )
    reason, detail = _rejection(trimaps_url=listing.trimaps_url)
    no_bytes = F.lit(None).cast("binary")
    return paired.select("id", "split", "path", no_bytes.alias("image"), no_bytes.alias("mask"), reason.alias("reason"),
                         detail.alias("detail"), "mask_path")


def _rejection(*, trimaps_url: str) -> tuple[Column, Column]:
    """(reason, detail) of a paired image row: null for a row to decode, else the first of these that
    applies: ``duplicate_id``, ``mask_missing``, ``in_both_split_lists``, ``not_in_split_lists``."""
    reason = (
        F.when(F.col("duplicate").isNotNull(), F.lit("duplicate_id"))
        .when(F.col("mask_path").isNull(), F.lit("mask_missing"))
        .when(F.col("n_lists") > 1, F.lit("in_both_split_lists"))
        .when(F.col("split").isNull(), F.lit("not_in_split_lists"))
    )
    detail = (
        F.when(F.col("duplicate").isNotNull(), F.col("duplicate"))
        .when(F.col("mask_path").isNull(), F.concat(F.lit("no trimap "), F.col("id"), F.lit(f".png in {trimaps_url}")))
        .when(F.col("n_lists") > 1, F.lit("listed in both trainval.txt and test.txt; keep it in one"))
        .when(F.col("split").isNull(), F.lit("listed in neither trainval.txt nor test.txt"))
    )
    return reason, detail


def _unpaired_files(spark: SparkSession, listing: _Listing) -> DataFrame | None:
    """Rejected rows for trimaps without an image (``image_missing``) and listed stems with no file at
    all (``listed_files_missing``), so that nothing is lost unreported; None when there are none."""
    image_ids, trimap_ids, listed = set(listing.image_files), set(listing.trimap_files), listing.listed
    unpaired = [
        (stem, None, f"{listing.trimaps_url}/{stem}.png", "image_missing",
         f"trimap has no image {stem}.* in {listing.images_url}")
        for stem in sorted(trimap_ids - image_ids)
    ] + [
        (stem, listed[stem][0], listed[stem][1], "listed_files_missing", "listed, but neither image nor trimap exists")
        for stem in sorted(set(listed) - image_ids - trimap_ids)
    ]
    if not unpaired:
        return None
    columns = ["id", "split", "path", "reason", "detail"]
    return _local(spark, {c: [row[i] for row in unpaired] for i, c in enumerate(columns)},
                  ", ".join(f"{c} string" for c in columns))


def _local(spark: SparkSession, columns: dict[str, list], schema: str) -> DataFrame:
    """A small driver-side table; built from pandas through Arrow, so no Python task has to serve it."""
    return spark.createDataFrame(pd.DataFrame(columns), schema)


def _paths_by_stem(paths: list[str]) -> tuple[dict[str, list[str]], int]:
    """(stem -> paths, bytes of the stems and paths) of listed files."""
    found: dict[str, list[str]] = {}
    total = 0
    for path in paths:
        match = _STEM.search(path)
        if match:
            found.setdefault(match.group(1), []).append(path)
            total += len(match.group(1)) + len(path)
    return found, total


def _flatten(files: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """(ids, paths): one entry per file."""
    pairs = [(stem, path) for stem, paths in files.items() for path in paths]
    return [stem for stem, _ in pairs], [path for _, path in pairs]


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


def _read_lists(lists: dict[str, str]) -> dict[str, tuple[str, str, int]]:
    """id -> (split, list path, number of lists naming it), from the release's list files; '#' starts a comment."""
    found: dict[str, list[tuple[str, str]]] = {}
    for split, url in lists.items():
        try:
            text = read_file(url).decode("utf-8", errors="replace")
        except RejectedInput as exc:
            raise InputError(f"cannot read the split list {exc.detail}; check its permissions") from None
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.setdefault(line.split()[0], []).append((split, url))
    return {stem: (entries[0][0], entries[0][1], len({s for s, _ in entries})) for stem, entries in found.items()}
