"""Synthetic ingest, the Petastorm -> tf.data round trip, row-group layout and atomic re-runs."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import data_config

from petseg.data import decode, render
from petseg.data.reader import make_tf_dataset, open_split, row_groups_per_split
from petseg.errors import InputError
from petseg.ingest.convert import run_ingest

COUNT = 40


@pytest.fixture(scope="module")
def synthetic_dataset(spark, tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    data = data_config(source="synthetic", dataset=str(out / "pets"), synthetic_count=COUNT, synthetic_seed=11,
                       synthetic_test_fraction=0.25, image_size=64, min_row_groups_per_split=3)
    return data, run_ingest(spark, data=data)


def test_report(synthetic_dataset):
    _, report = synthetic_dataset
    assert report.written == {"train": 30, "test": 10} and report.rejected == {}


def test_round_trip_into_tf_data(synthetic_dataset):
    import tensorflow as tf

    data, _ = synthetic_dataset
    counts = {}
    for split in ("train", "test"):
        with open_split(data.dataset, split=split) as reader:
            ds = make_tf_dataset(reader).batch(8)
            assert ds.element_spec[0].dtype == tf.uint8 and ds.element_spec[1].dtype == tf.uint8
            n, labels = 0, set()
            for image, mask in ds:
                assert image.shape[1:] == (64, 64, 3) and mask.shape[1:] == (64, 64)
                labels |= set(np.unique(mask.numpy()).tolist())
                n += image.shape[0]
        counts[split] = n
        assert labels == {0, 1, 2}
    assert counts == {"train": 30, "test": 10}


def test_pixels_match_the_generator(synthetic_dataset):
    data, _ = synthetic_dataset
    with open_split(data.dataset, split="test", fields=("id", "image", "mask", "height", "width")) as reader:
        rows = {row.id: row for row in reader}
    index = next(i for i in range(COUNT) if render.split_for(i, test_fraction=0.25) == "test")
    pet = render.synthetic_pet(index, seed=11, test_fraction=0.25)
    row = rows[pet.stem]
    assert (row.height, row.width) == pet.trimap.shape
    np.testing.assert_array_equal(row.mask, decode.resize_mask(pet.trimap - 1, 64))


def test_each_split_has_its_own_row_groups(synthetic_dataset):
    data, _ = synthetic_dataset
    groups = row_groups_per_split(data.dataset)
    assert set(groups) == {"train", "test"} and min(groups.values()) >= 3
    # Sharding one split over two workers gives disjoint halves that cover it.
    seen = []
    for shard in range(2):
        with open_split(data.dataset, split="test", fields=("id",), shard=shard, shard_count=2) as reader:
            seen.append({row.id for row in reader})
    assert seen[0] and seen[1] and not seen[0] & seen[1] and len(seen[0] | seen[1]) == 10


def test_rerun_replaces_cleanly(spark, tmp_path):
    data = data_config(source="synthetic", dataset=str(tmp_path / "pets"), synthetic_count=6, image_size=32,
                       min_row_groups_per_split=1)
    run_ingest(spark, data=data)
    def parts():
        return {p.name for p in (tmp_path / "pets" / "split=train").glob("part-*.parquet")}

    first = parts()
    data.synthetic_count = 4
    report = run_ingest(spark, data=data)
    assert sum(report.written.values()) == 4
    second = parts()
    assert first and second and not first & second  # no data file of the old run survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pets", "pets_rejects"]  # no temporary, old or lock left
    with open_split(data.dataset, split="train", fields=("id",)) as reader:
        assert len(list(reader)) == report.written["train"]
    # A dataset that cannot be published (another job writes it) leaves this run's dataset and rejects as a pair.
    rejects = sorted(p.name for p in (tmp_path / "pets_rejects").iterdir())
    (tmp_path / "pets.petseg-lock").write_text(json.dumps({"host": "h", "pid": 1, "id": "x", "refreshed": time.time()}))
    data.synthetic_count = 8
    with pytest.raises(InputError, match="is being written by another job"):
        run_ingest(spark, data=data)
    assert parts() == second and sorted(p.name for p in (tmp_path / "pets_rejects").iterdir()) == rejects


def test_the_console_script_fails_a_bad_value_with_exit_2_and_the_key():
    """The demo itself, through the console script, is test_train.py's test_demo_learns."""
    env = {k: v for k, v in os.environ.items() if k != "PYSPARK_PYTHON"}
    bad = subprocess.run([sys.executable, "-m", "petseg.cli", "ingest", "data.image_size=tiny"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "data.image_size" in bad.stderr and "expected int" in bad.stderr


def test_rejects_are_projected_and_shuffled_to_one_file_not_coalesced_with_the_images(spark, capsys):
    """coalesce(1) would scan the whole cached frame, every image's bytes, in one task."""
    from pyspark import StorageLevel

    from petseg.ingest.convert import rejects_table

    frame = spark.createDataFrame(
        [(f"id{i}", "train", f"/p/{i}.jpg", b"\0" * 1000, "image_empty" if i % 3 else None, "d") for i in range(40)],
        "id string, split string, path string, image binary, reason string, detail string",
    ).repartition(4).persist(StorageLevel.MEMORY_AND_DISK)
    frame.count()
    try:
        table = rejects_table(frame.where("reason is not null"))
        assert table.columns == ["id", "split", "path", "reason", "detail"] and table.rdd.getNumPartitions() == 1
        table.explain()
        plan = capsys.readouterr().out
        assert "Exchange SinglePartition" in plan and "Coalesce" not in plan
        assert table.count() == 26
    finally:
        frame.unpersist()


def test_every_source_has_a_loader_and_a_source_without_one_is_named_with_the_choices(tmp_path):
    """Ingest dispatches on data.source through a table: a source added to the config without a loader fails
    naming itself and the sources there are, before any Spark work, instead of being read as another one."""
    import dataclasses

    from petseg.config import Source
    from petseg.errors import ConfigError
    from petseg.ingest.convert import LOADERS, load_pairs

    assert set(LOADERS) == set(Source)
    data = dataclasses.replace(data_config(source="synthetic", dataset=str(tmp_path / "pets")), source="kaggle")
    with pytest.raises(ConfigError, match="data.source='kaggle' has no ingest loader; use one of synthetic, oxford, tfds"):
        load_pairs(None, data)  # no session: the table is consulted first
