"""Reading an ingested dataset back: Petastorm readers per split and shard, and tf.data on top.

TensorFlow is imported only inside the functions that build tf.data pipelines, so Spark-side code
that merely inspects a dataset stays light.
"""

from __future__ import annotations

import contextlib
import posixpath
from collections import Counter
from typing import TYPE_CHECKING, Iterator, Sequence

import pyarrow.parquet as pq
from petastorm import make_reader
from petastorm.predicates import in_set
from petastorm.reader import Reader

from petseg.data.schema import SPLIT, SPLITS
from petseg.io import urls

if TYPE_CHECKING:
    import tensorflow as tf

#: The fields training needs; the rest (source_path, original size) stay on disk.
TRAINING_FIELDS = ("id", "image", "mask")


@contextlib.contextmanager
def open_split(
    dataset_url: str,
    *,
    split: str,
    fields: Sequence[str] = TRAINING_FIELDS,
    shard: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = 1,
    shuffle: bool = False,
    seed: int | None = None,
    workers_count: int = 2,
) -> Iterator[Reader]:
    """A Petastorm reader over one split, optionally one shard of it, as a context manager.

    Parameters
    ----------
    dataset_url
        The ingested dataset.
    split
        ``train`` or ``test``; the reader opens only that split's folder.
    shard, shard_count
        Read row groups ``i`` with ``i % shard_count == shard`` (Petastorm shards by row group).
    num_epochs
        None repeats forever.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a petseg split; use one of {', '.join(SPLITS)}")
    # petastorm resolves a partition predicate through the reader's field view, so the split
    # column must be among the fields read or make_reader fails with KeyError: 'split'.
    fields = list(dict.fromkeys([*fields, SPLIT]))
    with make_reader(
        dataset_url,
        schema_fields=fields,
        predicate=in_set({split}, SPLIT),
        cur_shard=shard,
        shard_count=shard_count,
        num_epochs=num_epochs,
        shuffle_row_groups=shuffle,
        seed=seed,
        workers_count=workers_count,
    ) as reader:
        yield reader


def make_tf_dataset(reader: Reader, *, chunk: int = 64) -> "tf.data.Dataset":
    """``(image uint8 [H, W, 3], mask uint8 [H, W])`` pairs from a reader opened on image and mask.

    Rows are stacked into chunks in Python and unbatched by tf.data: TensorFlow's generator bridge
    costs about a millisecond per element, so handing it one row at a time (as petastorm's
    ``make_petastorm_dataset`` does) caps the pipeline far below what the reader itself delivers.
    """
    import numpy as np
    import tensorflow as tf

    image_shape = tuple(reader.schema.fields["image"].shape)
    mask_shape = tuple(reader.schema.fields["mask"].shape)

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        images, masks = [], []
        for row in reader:
            images.append(row.image)
            masks.append(row.mask)
            if len(images) == chunk:
                yield np.stack(images), np.stack(masks)
                images, masks = [], []
        if images:
            yield np.stack(images), np.stack(masks)

    signature = (
        tf.TensorSpec((None, *image_shape), tf.uint8),
        tf.TensorSpec((None, *mask_shape), tf.uint8),
    )
    return tf.data.Dataset.from_generator(chunks, output_signature=signature).unbatch()


def split_stats(dataset_url: str) -> dict[str, tuple[int, int]]:
    """``split -> (rows, row groups)`` from the Parquet file footers (no pixel data is read)."""
    from pyarrow import fs as pafs

    filesystem, root = urls.arrow_filesystem(dataset_url)
    rows: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    for info in filesystem.get_file_info(pafs.FileSelector(root, recursive=True)):
        folder, name = posixpath.split(info.path)
        partition = posixpath.basename(folder)
        if info.is_file and name.endswith(".parquet") and partition.startswith(f"{SPLIT}="):
            split = partition.split("=", 1)[1]
            with filesystem.open_input_file(info.path) as f:
                meta = pq.ParquetFile(f).metadata
            rows[split] += meta.num_rows
            groups[split] += meta.num_row_groups
    return {split: (rows[split], groups[split]) for split in rows}


def row_groups_per_split(dataset_url: str) -> dict[str, int]:
    """Count the Parquet row groups in each split folder."""
    return {split: groups for split, (_, groups) in split_stats(dataset_url).items()}
