"""One dataset format from either writer: petseg's own metadata is what petastorm's materialize_dataset writes.

Run on the Spark 3.5 / pyarrow 14 environment, where petastorm 0.13.1 works and so can judge both.
The same checks across environments (a dataset written on Spark 4, read here) are in test_spark4.py.
"""

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import data_config

from petseg.data import unischema
from petseg.data.reader import first_rows, open_split, open_split_arrays
from petseg.data.schema import IMAGE_CODECS, encode_value, pet_fields, pet_schema


def _depickled(blob: bytes):
    from petastorm.etl.legacy import depickle_legacy_package_name_compatible

    return depickle_legacy_package_name_compatible(blob)


@pytest.mark.parametrize("codec", list(IMAGE_CODECS))
def test_petastorm_unpickles_petsegs_unischema_as_the_one_it_builds(codec):
    fields = pet_fields(image_size=24, image_codec=codec)
    ours, theirs = _depickled(unischema.unischema_pickle(fields)), pet_schema(image_size=24, image_codec=codec)
    assert type(ours) is type(theirs) and vars(ours).keys() == vars(theirs).keys()
    assert list(ours.fields) == list(theirs.fields) and ours._name == theirs._name
    for name, field in theirs.fields.items():
        got = ours.fields[name]
        assert got == field and getattr(ours, name) is got
        assert type(got.codec) is type(field.codec) and vars(got.codec).keys() == vars(field.codec).keys()
        assert str(got.codec) == str(field.codec)
    # and petseg reads back the fields from either pickle
    assert unischema.read_fields(pickle.dumps(theirs), where="x") == fields
    assert unischema.read_fields(unischema.unischema_pickle(fields), where="x") == fields


def test_reading_a_unischema_runs_no_code_from_the_pickle():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(ValueError, match=r"where: the Petastorm Unischema cannot be read \(builtins.print has no place"):
        unischema.read_fields(pickle.dumps(Evil()), where="where")
    with pytest.raises(ValueError, match="holds a int, not a Unischema"):
        unischema.read_fields(pickle.dumps(3), where="where")


@pytest.mark.parametrize("codec", list(IMAGE_CODECS))
def test_petsegs_encoding_is_petastorms_byte_for_byte(codec):
    rng = np.random.default_rng(1)
    schema = pet_schema(image_size=24, image_codec=codec)
    for field in pet_fields(image_size=24, image_codec=codec):
        if field.codec == "scalar":
            continue
        value = rng.integers(0, 255 if field.name == "image" else 3, field.shape, dtype=np.uint8)
        theirs = schema.fields[field.name]
        assert encode_value(field, value) == bytes(theirs.codec.encode(theirs, value))
    with pytest.raises(ValueError, match=r"mask: a uint8 array of shape \(3, 3\) where the dataset stores uint8 \(24, 24\)"):
        encode_value(pet_fields(image_size=24)[3], np.zeros((3, 3), np.uint8))


@pytest.fixture(scope="module")
def both_writers(spark, tmp_path_factory):
    """The same synthetic pets ingested twice, by each writer."""
    from petseg.ingest.convert import run_ingest

    root = tmp_path_factory.mktemp("writers")
    out = {}
    for writer in ("petastorm", "petseg"):
        data = data_config(source="synthetic", dataset=str(root / writer), synthetic_count=40, image_size=16,
                           min_row_groups_per_split=3, image_codec="png")
        report = run_ingest(spark, data=data, writer=writer)
        assert report.writer == writer and report.written == {"train": 32, "test": 8}
        out[writer] = (data.dataset, root / writer, report)
    return out


def test_both_writers_write_the_same_metadata_keys_and_row_groups(both_writers):
    footers = {}
    for writer, (_, folder, _) in both_writers.items():
        meta = pq.read_metadata(folder / "_common_metadata")
        footers[writer] = meta
        groups = json.loads(meta.metadata[unischema.ROW_GROUPS_PER_FILE_KEY])
        on_disk = sorted(str(p.relative_to(folder)) for p in folder.glob("split=*/*.parquet"))
        assert sorted(groups) == on_disk
        assert all(pq.read_metadata(folder / name).num_row_groups == n for name, n in groups.items())
        assert unischema.stored_fields(str(folder)) == pet_fields(image_size=16, image_codec="png")
    ours, theirs = footers["petseg"], footers["petastorm"]
    assert set(ours.metadata) == set(theirs.metadata)
    assert ours.schema.to_arrow_schema().equals(theirs.schema.to_arrow_schema())
    # the data files are written with the same settings: the same row groups per split
    counts = {w: sorted(json.loads(f.metadata[unischema.ROW_GROUPS_PER_FILE_KEY]).values()) for w, f in footers.items()}
    assert counts["petseg"] == counts["petastorm"]


def test_petastorms_reader_and_petsegs_read_either_writers_dataset_alike(both_writers):
    seen = {}
    for writer, (url, _, _) in both_writers.items():
        with open_split(url, split="train", fields=("id", "image", "mask"), workers_count=1) as reader:
            rows = {row.id: (row.image, row.mask) for row in reader}
        with open_split_arrays(url, split="train") as reader:
            images, masks = (np.concatenate(a) for a in zip(*reader))
        assert len(rows) == 32 and images.shape == (32, 16, 16, 3)
        assert sorted(map(bytes, images)) == sorted(bytes(i) for i, _ in rows.values())
        ids, first_images, _ = first_rows(url, split="test", count=3)
        assert len(ids) == 3 and first_images.shape == (3, 16, 16, 3)
        seen[writer] = rows
    assert seen["petseg"].keys() == seen["petastorm"].keys()
    for key, (image, mask) in seen["petastorm"].items():
        np.testing.assert_array_equal(seen["petseg"][key][0], image)
        np.testing.assert_array_equal(seen["petseg"][key][1], mask)


def test_the_ingest_report_names_the_writer(both_writers):
    assert "  writer:  petseg's own (Petastorm's format, petastorm not used)" in both_writers["petseg"][2].format()
    assert "  writer:  petastorm's materialize_dataset" in both_writers["petastorm"][2].format()


def test_this_environment_writes_with_petastorm():
    """pyarrow 14 with petastorm installed: ingest keeps petastorm's own writer here."""
    from petseg.ingest.convert import dataset_writer

    assert dataset_writer() == "petastorm"


def test_a_folder_without_petastorm_metadata_is_named_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no _common_metadata: it is not a dataset petseg's ingest wrote"):
        unischema.stored_fields(str(tmp_path))
    pq.write_metadata(pa.schema([("id", "string")]), tmp_path / "_common_metadata")
    with pytest.raises(ValueError, match="holds no Petastorm Unischema; re-run ingest"):
        unischema.stored_fields(str(tmp_path))
