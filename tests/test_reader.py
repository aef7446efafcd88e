"""Reading a dataset back: every row of a shard exactly once per epoch, or a loud failure."""

import itertools
from collections import Counter

import pytest

from petseg.data.reader import IncompleteReadError, _cut_epochs, open_split, open_split_arrays, shard_rows, split_stats

#: Reads of one split in the repeat test. On petastorm's own num_epochs=1 read, 10 of 30 such reads
#: came back short here (whole row groups missing), so 30 catches the loss with near certainty.
READS = 30


@pytest.fixture(scope="module")
def nine_groups(spark, tmp_path_factory):
    from conftest import synthetic_dataset

    return synthetic_dataset(spark, tmp_path_factory.mktemp("reader"), synthetic_count=375, image_size=32,
                             min_row_groups_per_split=9)


def test_every_read_of_a_split_is_complete(nine_groups):
    rows, groups = split_stats(nine_groups)["train"]
    assert rows == 300 and groups >= 9
    short = []
    for attempt in range(READS):
        with open_split(nine_groups, split="train", fields=("id",), workers_count=1 + attempt % 2) as reader:
            ids = [row.id for row in reader]
        if len(ids) != rows or len(set(ids)) != rows:
            short.append(len(ids))
    assert short == [], f"{len(short)} of {READS} reads were incomplete: {short}"


def test_shards_cover_the_split_once_and_epochs_repeat_it_exactly(nine_groups):
    seen: Counter[str] = Counter()
    for shard in range(3):
        expected = shard_rows(nine_groups, split="train", shard=shard, shard_count=3)
        with open_split(nine_groups, split="train", fields=("id",), shard=shard, shard_count=3, num_epochs=2,
                        shuffle=True, seed=shard) as reader:
            ids = [row.id for row in reader]
        assert len(ids) == 2 * expected and sorted(ids[:expected]) == sorted(ids[expected:])  # each epoch whole
        seen.update(ids[:expected])
    assert len(seen) == 300 and set(seen.values()) == {1}  # the shards split the rows, none twice


class _Row:
    def __init__(self, key):
        self.source_path = key


def test_a_reader_that_stops_early_fails_loudly_and_early_rows_wait_for_their_epoch():
    with pytest.raises(IncompleteReadError, match="delivered 2 of the shard's 3 rows"):
        list(_cut_epochs(iter([_Row("a"), _Row("b")]), rows_per_epoch=3, num_epochs=1, shard="shard 0"))
    # 'a' of the second epoch arrives before 'c' of the first: it waits, and each epoch is whole.
    arrived = [_Row(k) for k in "abacbc"]
    got = [r.source_path for r in _cut_epochs(iter(arrived), rows_per_epoch=3, num_epochs=2, shard="s")]
    assert got == ["a", "b", "c", "a", "b", "c"]


def test_an_endless_read_that_cannot_complete_its_epoch_fails_instead_of_hanging():
    # Keys that repeat before the shard's count is reached (duplicate keys, or footers that count rows
    # the reader never delivers): an endless reader never stops, so only the repeats can tell.
    pulled = []
    endless = (pulled.append(k) or _Row(k) for k, _ in zip(itertools.cycle("ab"), range(100_000)))
    with pytest.raises(IncompleteReadError, match="repeated a source_path"):
        list(_cut_epochs(endless, rows_per_epoch=3, num_epochs=1, shard="s"))
    assert len(pulled) <= 8  # it failed after two epochs' worth of repeats, not after the source ran dry


def _petastorm_arrays(url: str, split: str):
    import numpy as np

    with open_split(url, split=split, fields=("image", "mask"), workers_count=1) as reader:
        rows = list(reader)
    return np.stack([r.image for r in rows]), np.stack([r.mask for r in rows])


@pytest.mark.parametrize("codec", ["raw", "png"])
def test_the_array_reader_gives_petastorms_pixels_a_row_group_at_a_time(spark, tmp_path, codec):
    import numpy as np

    from conftest import synthetic_dataset

    url = synthetic_dataset(spark, tmp_path, synthetic_count=60, image_size=32, image_codec=codec,
                            min_row_groups_per_split=3)
    images, masks = _petastorm_arrays(url, "test")
    with open_split_arrays(url, split="test") as reader:
        groups = list(reader)
        assert reader.image_shape == (32, 32, 3) and reader.mask_shape == (32, 32)
    assert len(groups) == split_stats(url)["test"][1] >= 3  # one chunk per row group
    assert all(g[0].dtype == np.uint8 and g[0].flags.c_contiguous for g in groups)
    assert np.array_equal(np.concatenate([g[0] for g in groups]), images)
    assert np.array_equal(np.concatenate([g[1] for g in groups]), masks)


def test_array_reader_shards_cover_the_split_once_and_each_epoch_is_whole(nine_groups):
    import numpy as np

    images, _ = _petastorm_arrays(nine_groups, "train")
    key = {img.tobytes(): i for i, img in enumerate(images)}  # synthetic pets are all different
    assert len(key) == 300
    seen: Counter[int] = Counter()
    for shard in range(3):
        expected = shard_rows(nine_groups, split="train", shard=shard, shard_count=3)
        with open_split_arrays(nine_groups, split="train", shard=shard, shard_count=3, num_epochs=None,
                               shuffle=True, seed=shard) as reader:
            assert reader.rows_per_epoch == expected
            epochs = [[key[img.tobytes()] for g in reader.next_epoch() for img in g[0]] for _ in range(3)]
        assert all(sorted(e) == sorted(epochs[0]) and len(e) == expected for e in epochs)
        assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # shuffled: a new row-group order
        seen.update(epochs[0])
    assert len(seen) == 300 and set(seen.values()) == {1}


def test_array_columns_that_are_not_one_shape_fail_with_the_fix():
    import io

    import numpy as np
    import pyarrow as pa

    from petseg.data.reader import decode_array_column

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    same = pa.array([npy(np.full((2, 2), i, np.uint8)) for i in range(3)], pa.binary())
    assert decode_array_column(same, what="mask").tolist() == [[[i, i], [i, i]] for i in range(3)]
    mixed = pa.array([npy(np.zeros((2, 2), np.uint8)), npy(np.zeros((4,), np.uint8))], pa.binary())
    with pytest.raises(ValueError, match="mask: arrays of different shapes or types in one column; re-ingest"):
        decode_array_column(mixed, what="mask")
    with pytest.raises(ValueError, match="image: a value is neither a .npy array nor an image"):
        decode_array_column(pa.array([b"junk"], pa.binary()), what="image")
