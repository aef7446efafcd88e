"""Reading a dataset back: every row of a shard exactly once per epoch, or a loud failure."""

import itertools
from collections import Counter

import pytest

from petseg.data.reader import IncompleteReadError, _cut_epochs, open_split, shard_rows, split_stats

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
