"""The Oxford-IIIT Pet release as distributed: images/, annotations/trimaps/, annotations/{trainval,test}.txt.

Images and trimaps are paired by file stem, and splits come from the list files, never from sort
order. Only their paths are paired: the decode task reads both files itself (see
:mod:`petseg.ingest.pairs` for why). Both folders are listed and paired on the driver, in one pass
over dicts (a second at 100,000 photos), and the pairs reach the decode tasks as a file
(:func:`petseg.io.fs.driver_table`), a row group a task, so no task grows with the listing and no
shuffle moves it.

Images that are in neither list are dropped and reported in the rejects table as
``not_in_split_lists``: the split lists define the benchmark, and guessing a split would leak test
images into training. Two files with one stem (``x.jpg`` and ``x.png``, or two trimaps) would be one
id with two sets of pixels: every image file of that stem is rejected as ``duplicate_id``.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from petseg.errors import InputError, RejectedInput
from petseg.ingest.pairs import PAIRS_SCHEMA, DecodeTasks
from petseg.io.fs import driver_table, list_files_sized, read_file, storage_for

if TYPE_CHECKING:
    import pyarrow as pa

#: Image files are matched by extension only to find them; decoding goes by content.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "JPG", "JPEG", "png", "PNG")
TRIMAP_EXTENSIONS = ("png", "PNG")
IMAGE_GLOB = "*.{" + ",".join(IMAGE_EXTENSIONS) + "}"
TRIMAP_GLOB = "*.{" + ",".join(TRIMAP_EXTENSIONS) + "}"
#: List file -> split name (TFDS and the reference notebook call trainval "train").
SPLIT_LISTS = {"train": "annotations/trainval.txt", "test": "annotations/test.txt"}
#: The file name without its extension: the example's id. The listing skips hidden files such as
#: the release's "._Abyssinian_1.png" AppleDouble entries.
_STEM = re.compile(r"([^/]+)\.[A-Za-z0-9]+$")
#: The columns of a pair the driver hands over; the decode task adds the files' bytes.
_HANDED_OVER = ("id", "split", "path", "reason", "detail", "mask_path")


@contextlib.contextmanager
def load_oxford(spark: SparkSession, *, root: str, tasks: DecodeTasks) -> Iterator[DataFrame]:
    """Pair the release's images with their trimaps and splits, for as long as the context lasts.

    Parameters
    ----------
    root
        URL of the folder that holds ``images/`` and ``annotations/``.
    tasks
        Sizes the decode tasks by the files' count and bytes (:class:`petseg.ingest.pairs.DecodeTasks`);
        each task reads and decodes its own files.

    Raises
    ------
    InputError
        When the folders or both split lists are missing, or no image file is found.
    """
    listing = _list_release(spark, root=root.rstrip("/"))
    rows = _paired_rows(listing)
    count = tasks.tasks(files=len(rows["path"]), input_bytes=listing.input_bytes)
    with driver_table(spark, _arrow_table(rows), partitions=count) as handed_over:
        no_bytes = F.lit(None).cast("binary")
        yield handed_over.select(*[no_bytes.alias(f.name) if f.name in ("image", "mask") else f.name
                                   for f in PAIRS_SCHEMA.fields])


@dataclass(frozen=True)
class _Listing:
    """The release as listed on the driver: files by stem, and the split lists' entries.

    Attributes
    ----------
    images_url, trimaps_url
        The two folders listed.
    image_files, trimap_files
        stem -> paths (more than one path for a duplicated stem).
    input_bytes
        Bytes of every image and trimap file listed.
    listed
        stem -> (split, list path, number of lists naming it), from :func:`_read_lists`.
    """

    images_url: str
    trimaps_url: str
    image_files: dict[str, list[str]]
    trimap_files: dict[str, list[str]]
    input_bytes: int
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
    image_files, image_bytes = _paths_by_stem(list_files_sized(f"{images_url}/{IMAGE_GLOB}"))
    trimap_files, trimap_bytes = _paths_by_stem(list_files_sized(f"{trimaps_url}/{TRIMAP_GLOB}"))
    listed = _read_lists(list_urls)
    if not image_files:
        raise InputError(f"{images_url} holds no image files ({IMAGE_GLOB}); is data.input the right folder?")
    return _Listing(images_url=images_url, trimaps_url=trimaps_url, image_files=image_files,
                    trimap_files=trimap_files, input_bytes=image_bytes + trimap_bytes, listed=listed)


def _paired_rows(listing: _Listing) -> dict[str, list]:
    """The pairs as columns (:data:`_HANDED_OVER`): one row per image file, with its trimap's path, its
    split and the reason it is rejected, if any; then a rejected row per trimap without an image
    (``image_missing``) and per listed stem with no file at all (``listed_files_missing``), so that
    nothing is lost unreported. No file is read here.

    An image row's reason is the first of ``duplicate_id``, ``mask_missing``, ``in_both_split_lists``,
    ``not_in_split_lists`` that applies.
    """
    rows: dict[str, list] = {name: [] for name in _HANDED_OVER}

    def add(*values: str | None) -> None:
        for name, value in zip(_HANDED_OVER, values):
            rows[name].append(value)

    duplicates = _duplicate_ids(listing.image_files, listing.trimap_files)
    for stem in sorted(listing.image_files):
        trimaps = listing.trimap_files.get(stem, [])
        split, _, lists = listing.listed.get(stem, (None, None, 0))
        mask_path = trimaps[0] if len(trimaps) == 1 else None
        if stem in duplicates:
            reason, detail = "duplicate_id", duplicates[stem]
        elif not trimaps:
            reason, detail = "mask_missing", f"no trimap {stem}.png in {listing.trimaps_url}"
        elif lists > 1:
            reason, detail = "in_both_split_lists", "listed in both trainval.txt and test.txt; keep it in one"
        elif split is None:
            reason, detail = "not_in_split_lists", "listed in neither trainval.txt nor test.txt"
        else:
            reason = detail = None
        for path in listing.image_files[stem]:
            add(stem, split if lists == 1 else None, path, reason, detail, mask_path)
    for stem in sorted(set(listing.trimap_files) - set(listing.image_files)):
        add(stem, None, f"{listing.trimaps_url}/{stem}.png", "image_missing",
            f"trimap has no image {stem}.* in {listing.images_url}", None)
    for stem in sorted(set(listing.listed) - set(listing.image_files) - set(listing.trimap_files)):
        split, list_path, _ = listing.listed[stem]
        add(stem, split, list_path, "listed_files_missing", "listed, but neither image nor trimap exists", None)
    return rows


def _arrow_table(rows: dict[str, list]) -> "pa.Table":
    """``rows`` as an Arrow table of strings (typed even where a column is all null)."""
    import pyarrow as pa

    return pa.table({name: pa.array(rows[name], pa.string()) for name in _HANDED_OVER})


def _paths_by_stem(files: list[tuple[str, int]]) -> tuple[dict[str, list[str]], int]:
    """(stem -> paths, bytes of the files) of listed (path, bytes)."""
    found: dict[str, list[str]] = {}
    total = 0
    for path, size in files:
        match = _STEM.search(path)
        if match:
            found.setdefault(match.group(1), []).append(path)
            total += size
    return found, total


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
