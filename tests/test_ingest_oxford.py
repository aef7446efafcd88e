"""The ingest job on an Oxford-layout folder with every known kind of bad input."""

import re
from dataclasses import replace

import numpy as np
import pytest
from conftest import data_config
from pyspark.sql import functions as F

from petseg.data import decode, render
from petseg.data.reader import open_split
from petseg.errors import InputError
from petseg.ingest.convert import run_ingest
from petseg.ingest.pairs import example_bytes


@pytest.fixture(scope="module")
def ingested(spark, oxford_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    data = data_config(source="oxford", input=str(oxford_dir.root), dataset=str(out / "pets"), image_size=32,
                       min_row_groups_per_split=2)
    return data, run_ingest(spark, data=data)


def test_counts_and_reasons(ingested, oxford_dir):
    data, report = ingested
    expected = {}
    for reason in oxford_dir.expected_reasons.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert report.rejected == expected
    splits = list(oxford_dir.accepted.values())
    assert report.written == {"train": splits.count("train"), "test": splits.count("test")}
    # Nothing lost: every image, trimap-only file and listed-only stem is either written or rejected.
    assert report.read == len(oxford_dir.accepted) + len(oxford_dir.expected_reasons)
    lines = report.format().splitlines()
    assert lines[0] == f"ingest: read {report.read}, written {len(oxford_dir.accepted)}, rejected {len(oxford_dir.expected_reasons)}"
    assert any(re.fullmatch(r"\s*rejected mask_missing\s+1", line) for line in lines)


def test_rejects_table(spark, ingested, oxford_dir):
    data, _ = ingested
    rows = spark.read.parquet(data.rejects).collect()
    assert {r["id"]: r["reason"] for r in rows} == oxford_dir.expected_reasons
    by_id = {r["id"]: r for r in rows}
    assert by_id["Noimage_1"]["path"].endswith("annotations/trimaps/Noimage_1.png")
    assert by_id["Ghost_1"]["path"].endswith("annotations/trainval.txt")
    assert by_id["Broken_1"]["path"].endswith("images/Broken_1.jpg")
    assert "120" not in by_id["Mismatch_1"]["detail"] and "mask is 60x50" in by_id["Mismatch_1"]["detail"]
    assert all(r["detail"] for r in rows)


def test_dataset_pairs_by_stem_and_split_from_lists(ingested, oxford_dir):
    data, _ = ingested
    seen = {}
    for split in ("train", "test"):
        with open_split(data.dataset, split=split, fields=("id", "split", "image", "mask", "height", "width", "source_path")) as reader:
            for row in reader:
                seen[row.id] = row
                assert row.split == split
    assert {k: v.split for k, v in seen.items()} == oxford_dir.accepted
    for pet in oxford_dir.pets:
        row = seen[pet.stem]
        assert (row.height, row.width) == pet.trimap.shape
        assert row.source_path.endswith(f"images/{pet.stem}.jpg")
        # The mask belongs to this very image: equal to its own trimap, resized NEAREST, minus one.
        np.testing.assert_array_equal(row.mask, decode.resize_mask(pet.trimap - 1, 32))
        expected = decode.resize_image(pet.image, 32).astype(int)
        assert np.abs(row.image.astype(int) - expected).mean() < 6  # JPEG source, reduced-scale decode
    cmyk = seen["Cmyk_1"].image.astype(int)
    assert np.abs(cmyk - decode.resize_image(oxford_dir.modes_pet.image, 32).astype(int)).mean() < 10


def test_missing_and_empty_input_fail_with_a_fix(spark, tmp_path):
    with pytest.raises(InputError, match="is not an Oxford-IIIT Pet folder.*Point data.input"):
        run_ingest(spark, data=data_config(source="oxford", input=str(tmp_path / "nope"), dataset=str(tmp_path / "o")))
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "annotations" / "trimaps").mkdir(parents=True)
    with pytest.raises(InputError, match="no split lists"):
        run_ingest(spark, data=data_config(source="oxford", input=str(tmp_path / "empty"), dataset=str(tmp_path / "o")))
    (tmp_path / "empty" / "annotations" / "test.txt").write_text("")
    with pytest.raises(InputError, match="holds no image files"):
        run_ingest(spark, data=data_config(source="oxford", input=str(tmp_path / "empty"), dataset=str(tmp_path / "o")))


def test_nothing_valid_fails_after_writing_rejects_and_keeps_old_dataset(spark, tmp_path):
    root = tmp_path / "allbad"
    render.write_oxford_layout(root, count=2, seed=3)
    for jpg in (root / "images").glob("*.jpg"):
        jpg.write_bytes(b"")
    out = tmp_path / "pets"
    old = out / "_common_metadata"  # a dataset of a petseg release before manifests
    (out / "split=train").mkdir(parents=True)
    old.write_text("the previous dataset")
    data = data_config(source="oxford", input=str(root), dataset=str(out))
    with pytest.raises(InputError, match="no valid example remains out of 2 read.*image_empty"):
        run_ingest(spark, data=data)
    assert old.read_text() == "the previous dataset"
    assert spark.read.parquet(data.rejects).count() == 2
    assert not [p for p in tmp_path.iterdir() if "petseg-tmp" in p.name]


def _add_listed_pair(root, stem: str, image: bytes, trimap: bytes) -> None:
    (root / "images" / f"{stem}.jpg").write_bytes(image)
    (root / "annotations" / "trimaps" / f"{stem}.png").write_bytes(trimap)
    with open(root / "annotations" / "trainval.txt", "a") as f:
        f.write(f"{stem} 1 1 1\n")


def test_images_over_the_pixel_limit_are_rejected_not_fatal(spark, tmp_path):
    from conftest import png_bomb

    root = tmp_path / "large"
    pets = render.write_oxford_layout(root, count=4, seed=5, size=(40, 30))  # 1,200 pixels each
    big = render.synthetic_pet(9, seed=5, size=(100, 80))  # 8,000 pixels
    _add_listed_pair(root, "Big_1", render.encode_jpeg(big.image), render.encode_png(big.trimap))
    # A header claiming 200 MP over a few bytes: Pillow's own guard raises a plain Exception for it,
    # which once failed the whole job.
    _add_listed_pair(root, "Bomb_1", png_bomb(20_000, 10_000), render.encode_png(big.trimap))
    data = data_config(source="oxford", input=str(root), dataset=str(tmp_path / "pets"), image_size=32,
                       min_row_groups_per_split=1, max_image_pixels=5000)
    report = run_ingest(spark, data=data)
    assert report.rejected == {"image_too_large": 2} and sum(report.written.values()) == len(pets)
    rejects = {r["id"]: r for r in spark.read.parquet(data.rejects).collect()}
    assert rejects["Big_1"]["detail"].startswith("the image is 100x80 = 8000 pixels, over data.max_image_pixels=5000")
    assert "200000000 pixels" in rejects["Bomb_1"]["detail"]


def test_files_sharing_a_stem_are_each_rejected_as_duplicate_ids(spark, tmp_path):
    root = tmp_path / "twins"
    pets = render.write_oxford_layout(root, count=2, seed=6, size=(40, 30))
    pet = render.synthetic_pet(7, seed=6, size=(40, 30))
    _add_listed_pair(root, "Twin_1", render.encode_jpeg(pet.image), render.encode_png(pet.trimap))
    (root / "images" / "Twin_1.png").write_bytes(render.encode_png(pet.image))  # one id, two images
    _add_listed_pair(root, "Masks_1", render.encode_jpeg(pet.image), render.encode_png(pet.trimap))
    (root / "annotations" / "trimaps" / "Masks_1.PNG").write_bytes(render.encode_png(pet.trimap))  # two trimaps
    data = data_config(source="oxford", input=str(root), dataset=str(tmp_path / "pets"), image_size=32,
                       min_row_groups_per_split=1)
    report = run_ingest(spark, data=data)
    assert report.rejected == {"duplicate_id": 3} and sum(report.written.values()) == len(pets)
    assert report.read == 5  # every image file once: read == written + rejected
    rejects = sorted((r["path"].rsplit("/", 1)[-1], r["id"], r["reason"], r["detail"])
                     for r in spark.read.parquet(data.rejects).collect())
    assert [r[:3] for r in rejects] == [("Masks_1.jpg", "Masks_1", "duplicate_id"), ("Twin_1.jpg", "Twin_1", "duplicate_id"),
                                        ("Twin_1.png", "Twin_1", "duplicate_id")]
    assert rejects[0][3].startswith("2 trimaps share the id 'Masks_1' (Masks_1.PNG, Masks_1.png); keep one")
    assert rejects[1][3].startswith("2 image files share the id 'Twin_1' (Twin_1.jpg, Twin_1.png); keep one")
    for split in ("train", "test"):
        with open_split(data.dataset, split=split, fields=("id",)) as reader:
            assert not {row.id for row in reader} & {"Twin_1", "Masks_1"}


def _tasks(fixed=None, *, max_files=1024, max_mb=64, min_tasks=1):
    from petseg.ingest.pairs import DecodeTasks, example_bytes

    return DecodeTasks(fixed=fixed, max_files=max_files, max_bytes=max_mb * 1024 * 1024,
                       example_bytes=example_bytes(32), min_tasks=min_tasks)


def test_decode_tasks_grow_with_the_input_so_what_a_task_holds_does_not(spark, tmp_path, capsys):
    """At a fixed task count (twice the default parallelism: 4 here at any size) a task's rows, and
    the cached and shuffled decoded examples, grew with the dataset until 2 GB executors ran out of
    heap at 40,000 photos; tasks are now sized by files and bytes, and the listing reaches them as a
    file, not inside the tasks (which Spark warned were over 1,000 KiB)."""
    from petseg.ingest.convert import decode_tasks, run_ingest
    from petseg.ingest.oxford import load_oxford

    root = tmp_path / "oxford"
    render.write_oxford_layout(root, count=40, seed=4, size=(40, 30))
    input_bytes = sum(f.stat().st_size for f in root.rglob("*.*") if f.suffix in (".jpg", ".png"))
    with load_oxford(spark, root=str(root), tasks=_tasks(max_files=6)) as pairs:
        per_task = pairs.groupBy(F.spark_partition_id().alias("task")).count().collect()
        pairs.explain()
        plan = capsys.readouterr().out
    assert len(per_task) == 7 and max(r["count"] for r in per_task) <= 6  # ceil(40 / 6)
    assert "ExistingRDD" not in plan and "LocalTableScan" not in plan  # no rows inside the plan's tasks
    by_bytes = _tasks(max_mb=1).tasks(files=40, input_bytes=input_bytes)
    assert by_bytes == -(-input_bytes // (1024 * 1024)) and _tasks(2, max_files=6).tasks(files=40) == 2
    # 100,000 photos at the defaults: 98 tasks of <= 1,024 files, not 4 of 25,000; at 256x256 the
    # decoded bytes decide (262 KB an example): 391 tasks of <= 64 MB.
    assert _tasks(min_tasks=4).tasks(files=100_000, input_bytes=100_000 * 30_000) == 98
    assert replace(_tasks(min_tasks=4), example_bytes=example_bytes(256)).tasks(files=100_000) == 391

    data = data_config(source="oxford", input=str(root), dataset=str(tmp_path / "pets"), image_size=32,
                       max_files_per_task=6, min_row_groups_per_split=1)
    assert decode_tasks(spark, data).tasks(files=40) == 7
    report = run_ingest(spark, data=data)
    assert report.decode_tasks == 7 and report.read == 40 and "(7 decode tasks)" in report.format()


def test_a_file_gone_between_listing_and_decoding_is_a_reject_not_a_failed_job(spark, tmp_path):
    """The decode task reads each file itself: one that cannot be read (deleted, no permission,
    a storage error) is that row's reject, and the rest of the job goes on."""
    from petseg.ingest.convert import prepare_pairs
    from petseg.ingest.oxford import load_oxford

    root = tmp_path / "oxford"
    render.write_oxford_layout(root, count=6, seed=3, size=(60, 50))
    with load_oxford(spark, root=str(root), tasks=_tasks(2)) as pairs:
        assert pairs.where("image is not null or mask is not null").count() == 0  # only paths leave the driver
        gone_image = sorted((root / "images").iterdir())[0]
        gone_trimap = sorted((root / "annotations" / "trimaps").iterdir())[1]
        gone_image.unlink()
        gone_trimap.unlink()
        rows = {r.id: r for r in prepare_pairs(pairs, image_size=32, image_codec="raw").collect()}
    assert len(rows) == 6
    failed = {stem: (r.reason, r.detail) for stem, r in rows.items() if r.reason}
    assert set(failed) == {gone_image.stem, gone_trimap.stem}
    assert all(reason == "file_unreadable" for reason, _ in failed.values())
    assert str(gone_image) in failed[gone_image.stem][1] and str(gone_trimap) in failed[gone_trimap.stem][1]
    assert all(r.image is not None for stem, r in rows.items() if stem not in failed)
