"""The tfds source: a real prepared data_dir read by executors, and tfds' own mock_data."""

import numpy as np
import pytest
from conftest import data_config

from petseg.data import decode, render
from petseg.data.reader import open_split
from petseg.errors import InputError, RejectedInput
from petseg.ingest.convert import run_ingest
from petseg.ingest.tfds import plan_slices, read_slice


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A prepared oxford_iiit_pet data_dir, built offline from synthetic pets with the real feature spec."""
    import tensorflow_datasets as tfds

    data_dir = tmp_path_factory.mktemp("tfds")
    features = tfds.builder("oxford_iiit_pet", data_dir=str(data_dir)).info.features  # from code: no download
    pets = [render.synthetic_pet(i, seed=5, test_fraction=0.5) for i in range(8)]
    bad = render.synthetic_pet(99, seed=5)
    splits = {"train": [], "test": []}
    for pet in pets + [bad]:
        trimap = pet.trimap if pet is not bad else np.full_like(pet.trimap, 9)  # values outside 1..3
        splits["train" if pet is bad else pet.split].append(
            {
                "image": pet.image,
                "label": 0,
                "species": 0,
                "file_name": f"{pet.stem}.jpg",
                "segmentation_mask": trimap[..., None],
                "head_bbox": tfds.features.BBox(0.0, 0.0, 1.0, 1.0),
            }
        )
    tfds.dataset_builders.store_as_tfds_dataset(
        name="oxford_iiit_pet",
        version=tfds.builder("oxford_iiit_pet", data_dir=str(data_dir)).version,
        features=features,
        split_datasets={k: list(enumerate(v)) for k, v in splits.items()},
        data_dir=str(data_dir),
    )
    return data_dir, pets


def test_ingest_from_prepared_data_dir(spark, tfds_dir, tmp_path):
    data_dir, pets = tfds_dir
    data = data_config(source="tfds", input=str(data_dir), dataset=str(tmp_path / "pets"), image_size=32,
                       min_row_groups_per_split=1)
    report = run_ingest(spark, data=data)
    assert report.written == {"train": 4, "test": 4}
    assert report.rejected == {"mask_values_out_of_range": 1}
    with open_split(data.dataset, split="test", fields=("id", "mask", "height", "width", "source_path")) as reader:
        rows = {row.id: row for row in reader}
    for pet in (p for p in pets if p.split == "test"):
        row = rows[pet.stem]
        np.testing.assert_array_equal(row.mask, decode.resize_mask(pet.trimap - 1, 32))
        assert (row.height, row.width) == pet.trimap.shape
        assert row.source_path == f"tfds://oxford_iiit_pet/test/{pet.stem}.jpg"


def test_unprepared_data_dir_says_how_to_prepare(spark, tmp_path):
    (tmp_path / "tfds").mkdir()
    data = data_config(source="tfds", input=str(tmp_path / "tfds"), dataset=str(tmp_path / "pets"))
    with pytest.raises(InputError, match=r"no prepared TFDS dataset 'oxford_iiit_pet'.*tfds build oxford_iiit_pet"):
        run_ingest(spark, data=data)


def test_read_slice_under_mock_data():
    """tfds' mock_data serves random examples: encoded bytes come through, but mask sizes are unrelated."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=3):
        rows = list(read_slice(name="oxford_iiit_pet", data_dir="/unused", split="train", start=0, stop=3))
    assert len(rows) == 3
    for stem, split, path, image, mask, reason, _, _ in rows:
        assert split == "train" and path.startswith("tfds://oxford_iiit_pet/train/") and reason is None
        assert decode.decode_rgb(image).ndim == 3  # the image arrives encoded and decodes by content
        with pytest.raises(RejectedInput) as err:
            decode.prepare_example(image, mask, size=32)
        assert err.value.reason in {"size_mismatch", "mask_values_out_of_range"}


def test_plan_slices_cover_each_split_once():
    slices = plan_slices({"train": 600, "test": 10, "validation": 5}, slice_size=256)
    assert slices == [("test", 0, 10), ("train", 0, 256), ("train", 256, 512), ("train", 512, 600)]
