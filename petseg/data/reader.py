"""Reading an ingested dataset back: Petastorm readers per split and shard, and tf.data on top.

TensorFlow is imported only inside the functions that build tf.data pipelines, so Spark-side code
that merely inspects a dataset stays light.
"""

from __future__ import annotations

import contextlib
import itertools
import posixpath
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import pyarrow.parquet as pq
from petastorm import make_reader
from petastorm.predicates import in_set
from petastorm.reader import Reader

from petseg.data.schema import SPLIT, SPLITS, ignore_petastorm_pyarrow_deprecations
from petseg.io import urls

if TYPE_CHECKING:
    import tensorflow as tf

#: The fields training needs; the rest (source_path, original size) stay on disk.
TRAINING_FIELDS = ("id", "image", "mask")


class IncompleteReadError(RuntimeError):
    """A reader delivered fewer rows than its shard holds: a read that would silently lose data."""


#: The field that tells rows apart when epochs are cut from an endless read: ingest writes one
#: source per row (a file path, a tfds record, a synthetic index), so it is unique where ids may not be.
_ROW_KEY = "source_path"


class SplitReader:
    """Rows of one split (or one shard of it), exactly the shard's rows per epoch, each once.

    Iterating yields Petastorm rows (namedtuples of the fields asked for, plus ``split`` and
    ``source_path``); :attr:`schema` is the reader's, and :attr:`rows_per_epoch` what one epoch holds.
    """

    def __init__(self, reader: Reader, *, rows_per_epoch: int, num_epochs: int | None, shard: str) -> None:
        self._reader = reader
        self.rows_per_epoch = rows_per_epoch
        self.num_epochs = num_epochs
        # One stream for the reader's life: rows held back for the next epoch live in it, so a second
        # iteration continues where the first stopped instead of dropping them.
        self._stream = _cut_epochs(iter(reader), rows_per_epoch=rows_per_epoch, num_epochs=num_epochs, shard=shard)

    @property
    def schema(self) -> Any:
        return self._reader.schema

    def __iter__(self) -> Iterator[Any]:
        """The rows of every remaining epoch (like petastorm's reader, this is a one-pass iterator)."""
        return self._stream

    def next_epoch(self) -> Iterator[Any]:
        """Exactly the rows of the next epoch: every row of the shard once."""
        return itertools.islice(self._stream, self.rows_per_epoch)


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
) -> Iterator[SplitReader]:
    """A reader over one split, optionally one shard of it, as a context manager.

    Every epoch delivers every row of the shard exactly once, or the read fails with
    :class:`IncompleteReadError` naming the shard and both counts (see :func:`_cut_epochs`).

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
    rows = shard_rows(dataset_url, split=split, shard=shard, shard_count=shard_count)
    # petastorm resolves a partition predicate through the reader's field view, so the split
    # column must be among the fields read or make_reader fails with KeyError: 'split'.
    fields = list(dict.fromkeys([*fields, SPLIT, _ROW_KEY]))
    ignore_petastorm_pyarrow_deprecations()
    reader_url, filesystem = urls.petastorm_source(dataset_url)
    with make_reader(
        reader_url,
        filesystem=filesystem,
        schema_fields=fields,
        predicate=in_set({split}, SPLIT),
        cur_shard=shard,
        shard_count=shard_count,
        # Always endless: see _cut_epochs for why a bounded petastorm read cannot be trusted.
        num_epochs=None,
        shuffle_row_groups=shuffle,
        seed=seed,
        workers_count=workers_count,
    ) as reader:
        label = f"split {split!r} of {dataset_url}" + (f", shard {shard} of {shard_count}" if shard_count else "")
        yield SplitReader(reader, rows_per_epoch=rows, num_epochs=num_epochs, shard=label)


def _cut_epochs(rows: Iterator[Any], *, rows_per_epoch: int, num_epochs: int | None, shard: str) -> Iterator[Any]:
    """Cut an endless petastorm read into epochs of exactly the shard's rows, each row once per epoch.

    Why: petastorm 0.13.1 ends a ``num_epochs=1`` read early without an error. Its thread pool's
    ``get_results`` (workers_pool/thread_pool.py, lines 186-189) checks ``all_workers_done()`` before
    ``self._ventilator.completed()``; the ventilator can hand out the last row groups and mark itself
    completed between the two checks, so the pool raises ``EmptyResultError``, which
    ``py_dict_reader_worker.py`` turns into a plain ``StopIteration``: whole row groups go missing
    (measured: a third of 30 reads of a 9-row-group split). Since petastorm PR #810 (0.13.0) that
    branch spins without blocking, which makes the race frequent; the process and dummy pools order
    the checks the same way. An endless read never takes the branch (its ventilator never
    completes), so every read here is endless and cut by count. With more than one reader worker a
    row group of the next epoch can arrive before the last of this one, so a row whose key this
    epoch has already delivered is held back for the next, and every epoch holds each row once.
    """
    if rows_per_epoch == 0:
        return  # an empty shard: an endless loop of empty epochs would never yield
    held: deque[Any] = deque()
    epochs = itertools.count() if num_epochs is None else range(num_epochs)
    for _ in epochs:
        seen: set[Any] = set()
        early: deque[Any] = deque()
        while len(seen) < rows_per_epoch:
            row = held.popleft() if held else next(rows, None)
            if row is None:
                raise IncompleteReadError(
                    f"{shard}: the reader delivered {len(seen)} of the shard's {rows_per_epoch} rows and stopped; "
                    "nothing was lost silently, re-run the read"
                )
            key = getattr(row, _ROW_KEY)
            if key in seen:
                early.append(row)
                # Rows of the next epoch arrive early by a row group or so (one per extra worker);
                # two whole epochs of repeats mean this one can never complete, and an endless read
                # would hang here, holding rows, instead of failing.
                if len(early) >= 2 * rows_per_epoch:
                    raise IncompleteReadError(
                        f"{shard}: {len(early)} rows repeated a {_ROW_KEY} already read this epoch before the "
                        f"shard's {rows_per_epoch} rows arrived ({len(seen)} did); its {_ROW_KEY} values are not "
                        "unique or its Parquet footers count rows the reader does not deliver: re-ingest the dataset"
                    )
                continue
            seen.add(key)
            yield row
        held.extend(early)


def make_tf_dataset(reader: SplitReader, *, chunk: int = 64, epoch_per_iteration: bool = False) -> "tf.data.Dataset":
    """``(image uint8 [H, W, 3], mask uint8 [H, W])`` pairs from a reader opened on image and mask.

    Rows are stacked into chunks in Python and unbatched by tf.data: TensorFlow's generator bridge
    costs about a millisecond per element, so handing it one row at a time (as petastorm's
    ``make_petastorm_dataset`` does) caps the pipeline far below what the reader itself delivers.

    Parameters
    ----------
    epoch_per_iteration
        False: one iteration of the dataset reads every remaining epoch of the reader. True: each
        iteration (each ``iter()``, as Keras's ``evaluate`` makes one per call) reads exactly the
        reader's next epoch, so repeated evaluations score every row once each.
    """
    import numpy as np
    import tensorflow as tf

    image_shape = tuple(reader.schema.fields["image"].shape)
    mask_shape = tuple(reader.schema.fields["mask"].shape)

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        images, masks = [], []
        for row in reader.next_epoch() if epoch_per_iteration else reader:
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


def _row_groups(dataset_url: str) -> list[tuple[str, int]]:
    """``(split, rows)`` of every row group, in the order petastorm numbers them for sharding.

    petastorm's ``load_row_groups`` orders a materialized dataset's pieces by file path, then row group
    within each file; its shard ``k`` of ``n`` reads the row groups whose index ``i % n == k``. Only the
    Parquet footers are read, no pixel data.
    """
    from pyarrow import fs as pafs

    filesystem, root = urls.arrow_filesystem(dataset_url)
    files = []
    for info in filesystem.get_file_info(pafs.FileSelector(root, recursive=True)):
        folder, name = posixpath.split(info.path)
        partition = posixpath.basename(folder)
        if info.is_file and name.endswith(".parquet") and partition.startswith(f"{SPLIT}="):
            files.append((info.path, partition.split("=", 1)[1]))
    groups = []
    for path, split in sorted(files):
        with filesystem.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        groups += [(split, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    return groups


def dataset_fingerprint(dataset_url: str) -> str:
    """A digest of the dataset's file names and sizes: the same files give the same digest.

    Spark names every file it writes with the writing job's id, so a re-ingest into the same
    folder gives another digest even when the rows are alike.
    """
    import hashlib
    import json

    from pyarrow import fs as pafs

    filesystem, root = urls.arrow_filesystem(dataset_url)
    files = sorted(
        (posixpath.relpath(info.path, root), info.size)
        for info in filesystem.get_file_info(pafs.FileSelector(root, recursive=True)) if info.is_file
    )
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def split_stats(dataset_url: str) -> dict[str, tuple[int, int]]:
    """``split -> (rows, row groups)`` from the Parquet file footers (no pixel data is read)."""
    rows: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    for split, count in _row_groups(dataset_url):
        rows[split] += count
        groups[split] += 1
    return {split: (rows[split], groups[split]) for split in rows}


def shard_rows(dataset_url: str, *, split: str, shard: int | None = None, shard_count: int | None = None) -> int:
    """The rows of ``split`` that petastorm's shard ``shard`` of ``shard_count`` reads in one epoch."""
    if not shard_count:
        return sum(rows_per_shard(dataset_url, split=split, shard_count=1))
    return rows_per_shard(dataset_url, split=split, shard_count=shard_count)[shard]


def rows_per_shard(dataset_url: str, *, split: str, shard_count: int) -> list[int]:
    """The rows of ``split`` in each of petastorm's ``shard_count`` shards (row group ``i`` goes to ``i % n``)."""
    counts = [0] * shard_count
    for i, (group_split, count) in enumerate(_row_groups(dataset_url)):
        if group_split == split:
            counts[i % shard_count] += count
    return counts


def row_groups_per_split(dataset_url: str) -> dict[str, int]:
    """Count the Parquet row groups in each split folder."""
    return {split: groups for split, (_, groups) in split_stats(dataset_url).items()}
