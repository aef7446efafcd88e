"""Reading an ingested dataset back: readers per split and shard, and tf.data on top.

``open_split`` wraps petastorm's row reader; ``open_split_arrays``, training's, reads row groups with
pyarrow alone. TensorFlow and petastorm are imported only inside the functions that need them, so
code that merely inspects a dataset, or reads its arrays, stays light.
"""

from __future__ import annotations

import contextlib
import itertools
import posixpath
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Sequence

import pyarrow.parquet as pq

from petseg.data.schema import SPLIT, SPLITS, ignore_petastorm_pyarrow_deprecations
from petseg.io import urls

if TYPE_CHECKING:
    import tensorflow as tf
    from petastorm.reader import Reader

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

    def __init__(self, reader: "Reader", *, rows_per_epoch: int, num_epochs: int | None, shard: str) -> None:
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
    from petastorm import make_reader
    from petastorm.predicates import in_set

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


def make_tf_dataset(reader: "SplitReader | ArrayReader", *, chunk: int = 64,
                    epoch_per_iteration: bool = False) -> "tf.data.Dataset":
    """``(image uint8 [H, W, 3], mask uint8 [H, W])`` pairs from a reader opened on image and mask.

    Arrays reach TensorFlow in chunks, unbatched by tf.data: TensorFlow's generator bridge costs
    about a millisecond per call, so handing it one row at a time (as petastorm's
    ``make_petastorm_dataset`` does) caps the pipeline far below what the reader itself delivers.
    An :class:`ArrayReader` hands over whole row groups; a :class:`SplitReader`'s rows are stacked
    ``chunk`` at a time.

    Parameters
    ----------
    epoch_per_iteration
        False: one iteration of the dataset reads every remaining epoch of the reader. True: each
        iteration (each ``iter()``, as Keras's ``evaluate`` makes one per call) reads exactly the
        reader's next epoch, so repeated evaluations score every row once each.
    """
    import tensorflow as tf

    if isinstance(reader, ArrayReader):
        def chunks() -> Iterator[tuple[Any, Any]]:
            return reader.next_epoch() if epoch_per_iteration else iter(reader)

        image_shape, mask_shape = reader.image_shape, reader.mask_shape
    else:
        def chunks() -> Iterator[tuple[Any, Any]]:
            return _stacked(reader.next_epoch() if epoch_per_iteration else reader, chunk)

        image_shape = tuple(reader.schema.fields["image"].shape)
        mask_shape = tuple(reader.schema.fields["mask"].shape)

    signature = (
        tf.TensorSpec((None, *image_shape), tf.uint8),
        tf.TensorSpec((None, *mask_shape), tf.uint8),
    )
    return tf.data.Dataset.from_generator(chunks, output_signature=signature).unbatch()


def _stacked(rows: Iterator[Any], chunk: int) -> Iterator[tuple[Any, Any]]:
    import numpy as np

    images, masks = [], []
    for row in rows:
        images.append(row.image)
        masks.append(row.mask)
        if len(images) == chunk:
            yield np.stack(images), np.stack(masks)
            images, masks = [], []
    if images:
        yield np.stack(images), np.stack(masks)


class ArrayReader:
    """One split (or shard) of a dataset as ``(images, masks)`` arrays, a row group at a time.

    Training's reader: whole row groups read by pyarrow and decoded column-wise, with no Python work
    per row, so it keeps a GPU fed where petastorm's row reader spends a thread's time per row. It
    reads the shards petastorm's would (row group ``i`` of the dataset to shard ``i % n``) in order,
    or in a new order each epoch with ``shuffle``; each epoch is every row group of the shard once,
    counted against the footers. Petastorm itself is not imported: the columns are plain Parquet.
    """

    def __init__(self, dataset_url: str, *, split: str, shard: int | None, shard_count: int | None,
                 num_epochs: int | None, shuffle: bool, seed: int | None,
                 row_groups: Sequence[RowGroup] | None = None) -> None:
        self._filesystem, _ = urls.arrow_filesystem(dataset_url)
        index = row_group_index(dataset_url) if row_groups is None else row_groups
        groups = [g for i, g in enumerate(index) if g.split == split and (not shard_count or i % shard_count == shard)]
        self._groups = groups
        self.rows_per_epoch = sum(g.rows for g in groups)
        self.num_epochs = num_epochs
        self._label = f"split {split!r} of {dataset_url}" + (f", shard {shard} of {shard_count}" if shard_count else "")
        self._shuffle, self._seed = shuffle, seed
        self._epochs = itertools.count() if num_epochs is None else iter(range(num_epochs))
        self.image_shape: tuple[int, ...] = ()
        self.mask_shape: tuple[int, ...] = ()
        if groups:  # the shapes tf.data needs before the first read, from the first row alone
            with self._filesystem.open_input_file(groups[0].path) as f:
                first = next(pq.ParquetFile(f).iter_batches(batch_size=1, row_groups=[groups[0].index],
                                                            columns=["image", "mask"]))
            self.image_shape = decode_array_column(first.column("image"), what=f"image of {groups[0].path}").shape[1:]
            self.mask_shape = decode_array_column(first.column("mask"), what=f"mask of {groups[0].path}").shape[1:]

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        """The row groups of every remaining epoch (a one-pass iterator, as a petastorm reader is)."""
        if not self._groups:
            return  # an empty shard: an endless loop of empty epochs would never yield
        for epoch in self._epochs:
            yield from self._epoch(epoch)

    def next_epoch(self) -> Iterator[tuple[Any, Any]]:
        """Exactly the next epoch: every row group of the shard once, as ``(images, masks)``."""
        epoch = next(self._epochs, None)
        return iter(()) if epoch is None else self._epoch(epoch)

    def _epoch(self, epoch: int) -> Iterator[tuple[Any, Any]]:
        order = list(range(len(self._groups)))
        if self._shuffle:
            import numpy as np

            np.random.default_rng(None if self._seed is None else [self._seed, epoch]).shuffle(order)
        delivered = 0
        for i in order:
            images, masks = self._read(self._groups[i])
            delivered += len(images)
            yield images, masks
        if delivered != self.rows_per_epoch:
            raise IncompleteReadError(f"{self._label}: read {delivered} rows where the footers count "
                                      f"{self.rows_per_epoch}; the dataset changed while it was read")

    def _read(self, group: "RowGroup") -> tuple[Any, Any]:
        with self._filesystem.open_input_file(group.path) as f:
            table = pq.ParquetFile(f).read_row_group(group.index, columns=["image", "mask"])
        if table.num_rows != group.rows:
            raise IncompleteReadError(f"{self._label}: row group {group.index} of {group.path} holds "
                                      f"{table.num_rows} rows where its footer counts {group.rows}")
        return (decode_array_column(table.column("image"), what=f"image of {group.path}"),
                decode_array_column(table.column("mask"), what=f"mask of {group.path}"))


@contextlib.contextmanager
def open_split_arrays(
    dataset_url: str,
    *,
    split: str,
    shard: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = 1,
    shuffle: bool = False,
    seed: int | None = None,
    row_groups: Sequence[RowGroup] | None = None,
) -> Iterator[ArrayReader]:
    """An :class:`ArrayReader` over one split, optionally one shard of it, as a context manager.

    Parameters
    ----------
    dataset_url
        The ingested dataset.
    split
        ``train`` or ``test``.
    shard, shard_count
        Read row groups ``i`` with ``i % shard_count == shard``, as petastorm shards (and as
        :func:`rows_per_shard` counts).
    num_epochs
        None repeats forever.
    shuffle, seed
        A new row-group order each epoch, drawn from ``(seed, epoch)``.
    row_groups
        The dataset's :func:`row_group_index`, when the caller has read it already; None reads it.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a petseg split; use one of {', '.join(SPLITS)}")
    yield ArrayReader(dataset_url, split=split, shard=shard, shard_count=shard_count, num_epochs=num_epochs,
                      shuffle=shuffle, seed=seed, row_groups=row_groups)


def first_rows(dataset_url: str, *, split: str, count: int) -> tuple[list[str], Any, Any]:
    """``(ids, images, masks)`` of the first ``count`` rows of ``split``, in row-group order: a preview's
    rows, read with pyarrow alone."""
    ids: list[str] = []
    images, masks = [], []
    filesystem, _ = urls.arrow_filesystem(dataset_url)
    for group in row_group_index(dataset_url):
        if len(ids) >= count:
            break
        if group.split != split or not group.rows:
            continue
        with filesystem.open_input_file(group.path) as f:
            table = pq.ParquetFile(f).read_row_group(group.index, columns=["id", "image", "mask"]).slice(0, count - len(ids))
        ids += table.column("id").to_pylist()
        images.append(decode_array_column(table.column("image"), what=f"image of {group.path}"))
        masks.append(decode_array_column(table.column("mask"), what=f"mask of {group.path}"))
    if not ids:
        raise ValueError(f"split {split!r} of {dataset_url} has no rows; re-run ingest")
    import numpy as np

    return ids, np.concatenate(images), np.concatenate(masks)


#: The first bytes of every .npy file: petastorm's NdarrayCodec stores np.save's output.
_NPY_MAGIC = b"\x93NUMPY"


def decode_array_column(column: Any, *, what: str) -> Any:
    """A Parquet column of encoded arrays as one ``(rows, ...)`` uint8 array.

    The raw codec's values are ``.npy`` files of one shape and dtype, so their headers are equal
    and each value is one header and the pixels: the whole column is sliced as one buffer, with no
    Python work per row. JPEG and PNG values are decoded one by one as petastorm's
    CompressedImageCodec does (OpenCV, BGR to RGB).
    """
    import numpy as np

    array = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    n = len(array)
    if n == 0:
        raise ValueError(f"{what}: an empty column has no shape")
    if array.null_count:
        raise ValueError(f"{what}: {array.null_count} of {n} values are null; re-ingest the dataset")
    offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset:array.offset + n + 1]
    data = np.frombuffer(array.buffers()[2], np.uint8)
    first = data[offsets[0]:offsets[1]].tobytes()
    if not first.startswith(_NPY_MAGIC):
        return np.stack([_decode_image(v.as_py(), what=what) for v in array])
    lengths = np.diff(offsets)
    header, shape, dtype = _npy_layout(first, what=what)
    if (lengths != lengths[0]).any():
        raise ValueError(f"{what}: arrays of different sizes in one column; re-ingest the dataset")
    rows = data[offsets[0]:offsets[-1]].reshape(n, int(lengths[0]))
    if (rows[:, :header] != rows[0, :header]).any():
        raise ValueError(f"{what}: arrays of different shapes or types in one column; re-ingest the dataset")
    return np.ascontiguousarray(rows[:, header:]).view(dtype).reshape(n, *shape)


def _npy_layout(value: bytes, *, what: str) -> tuple[int, tuple[int, ...], Any]:
    """The header's length, the shape and the dtype of one ``.npy`` value."""
    import io

    import numpy as np

    f = io.BytesIO(value)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran or dtype.hasobject:
        raise ValueError(f"{what}: a Fortran-ordered or object array; re-ingest the dataset")
    return f.tell(), tuple(shape), dtype


def _decode_image(value: bytes, *, what: str) -> Any:
    import cv2
    import numpy as np

    image = cv2.imdecode(np.frombuffer(value, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{what}: a value is neither a .npy array nor an image OpenCV decodes; re-ingest the dataset")
    return image[:, :, ::-1] if image.ndim == 3 else image


class RowGroup(NamedTuple):
    """One Parquet row group of a dataset, as :func:`row_group_index` lists them."""

    path: str  # in the dataset's pyarrow filesystem
    index: int  # within its file
    split: str
    rows: int


def row_group_index(dataset_url: str) -> list[RowGroup]:
    """Every row group of the dataset, in the order petastorm numbers them for sharding.

    petastorm's ``load_row_groups`` orders a materialized dataset's pieces by file path, then row group
    within each file; its shard ``k`` of ``n`` reads the row groups whose index ``i % n == k``. Only the
    Parquet footers are read, no pixel data.
    """
    from pyarrow import fs as pafs

    filesystem, root = urls.arrow_filesystem(dataset_url)
    files = []
    root = root.rstrip("/")
    for info in filesystem.get_file_info(pafs.FileSelector(root, recursive=True)):
        # Only <root>/split=<name>/<file>.parquet, as ingest writes them: a split= folder deeper down
        # is not this dataset's (another run's files, copied or renamed into it).
        parts = info.path[len(root) + 1:].split("/")
        if info.is_file and len(parts) == 2 and parts[1].endswith(".parquet") and parts[0].startswith(f"{SPLIT}="):
            files.append((info.path, parts[0].split("=", 1)[1]))
    groups = []
    for path, split in sorted(files):
        with filesystem.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        groups += [RowGroup(path, i, split, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
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
    for group in row_group_index(dataset_url):
        rows[group.split] += group.rows
        groups[group.split] += 1
    return {split: (rows[split], groups[split]) for split in rows}


def shard_rows(dataset_url: str, *, split: str, shard: int | None = None, shard_count: int | None = None) -> int:
    """The rows of ``split`` that petastorm's shard ``shard`` of ``shard_count`` reads in one epoch."""
    if not shard_count:
        return sum(rows_per_shard(dataset_url, split=split, shard_count=1))
    return rows_per_shard(dataset_url, split=split, shard_count=shard_count)[shard]


def rows_per_shard(dataset_url: str, *, split: str, shard_count: int,
                   row_groups: Sequence[RowGroup] | None = None) -> list[int]:
    """The rows of ``split`` in each of petastorm's ``shard_count`` shards (row group ``i`` goes to ``i % n``).

    ``row_groups``: the dataset's :func:`row_group_index`, when the caller has read it already.
    """
    index = row_group_index(dataset_url) if row_groups is None else row_groups
    counts = [0] * shard_count
    for i, group in enumerate(index):
        if group.split == split:
            counts[i % shard_count] += group.rows
    return counts


def row_groups_per_split(dataset_url: str) -> dict[str, int]:
    """Count the Parquet row groups in each split folder."""
    return {split: groups for split, (_, groups) in split_stats(dataset_url).items()}
