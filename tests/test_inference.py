"""Segmenting images with an exported model: same decoding as training, original sizes back, bad rows kept."""

from petseg import config, env

env.prepare_process_environment(master="local[2]")  # tf-keras, before TensorFlow is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from petseg.data import decode, render  # noqa: E402
from petseg.errors import InputError  # noqa: E402
from petseg.model.segment import segment_images  # noqa: E402
from petseg.model import artifact  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(exported_run):
    return exported_run


def test_masks_match_a_local_predict_at_original_size(run_dir):
    loaded = artifact.load(str(run_dir))
    pets = [render.synthetic_pet(i, seed=9, size=size) for i, size in enumerate([(50, 40), (32, 32), (300, 200)])]
    encoded = [render.encode_png(p.image) for p in pets]
    out = segment_images(loaded, [*encoded[:1], b"", b"not an image", *encoded[1:]], batch_size=2)
    assert [o.error is None for o in out] == [True, False, False, True, True]
    assert out[1].error.startswith("image_empty") and out[2].error.startswith("image_undecodable")
    good = [out[0], out[3], out[4]]
    expected = loaded.predict_labels(np.stack([decode.resize_image(p.image, 32) for p in pets]), batch_size=8)
    for pet, seg, labels in zip(pets, good, expected):
        np.testing.assert_array_equal(seg.mask_model, labels)
        assert seg.mask.shape == pet.image.shape[:2]  # back at the image's own size
        np.testing.assert_array_equal(seg.mask, decode.resize_mask(labels, pet.image.shape[:2]))
        assert abs(sum(seg.fractions) - 1) < 1e-9 and len(seg.fractions) == 3


def test_the_udf_pipeline_keeps_order_and_errors_and_decodes_ahead_of_the_model(run_dir, tmp_path):
    import cv2

    from petseg.model.segment import ImageRow, segment_stream

    loaded = artifact.load(str(run_dir))
    pets = [render.synthetic_pet(i, seed=5, size=(40 + 8 * i, 30 + 4 * i)) for i in range(7)]
    files = []
    for i, pet in enumerate(pets):
        files.append(tmp_path / f"p{i}.jpg")
        files[-1].write_bytes(render.encode_jpeg(pet.image))
    (tmp_path / "empty.jpg").write_bytes(b"")
    urls = [str(f) for f in files]
    batches = [urls[:3], [str(tmp_path / "empty.jpg"), urls[3], str(tmp_path / "missing.jpg")], urls[4:]]
    pulled = []

    def source():
        for i, batch in enumerate(batches):
            pulled.append(i)
            yield [ImageRow(url) for url in batch]

    results = []
    for out in segment_stream(loaded, source(), batch_size=2, read_files=True, model_resolution=True, threads=2):
        if not results:
            assert pulled == [0, 1]  # the second batch was read and decoded while the first was predicted
        results.append(out)
    assert [len(r) for r in results] == [3, 3, 3]
    flat = [seg for out in results for seg in out]
    assert flat[3].error.startswith("image_empty") and flat[5].error.startswith("file_unreadable")
    good = [seg for seg in flat if seg.error is None]
    expected = segment_images(loaded, [f.read_bytes() for f in files], batch_size=8)
    for pet, seg, want in zip(pets, good, expected):
        mask = cv2.imdecode(np.frombuffer(seg.mask_png, np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(mask, want.mask)
        model_mask = cv2.imdecode(np.frombuffer(seg.mask_model_png, np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(model_mask, want.mask_model)
        assert (seg.height, seg.width) == pet.image.shape[:2] and seg.fractions == want.fractions
        assert seg.fractions == tuple(np.bincount(want.mask.ravel(), minlength=3) / want.mask.size)


def test_masks_are_pngs_that_opencv_and_pillow_read_back_exactly():
    import io

    import cv2
    from PIL import Image

    from petseg.model.segment import encode_mask

    rng = np.random.default_rng(4)
    # 1-pixel sides; a photo's size; 3,000 rows of 401 filtered bytes, deflated a megabyte at a time.
    for shape in [(1, 1), (1, 9), (9, 1), (375, 500), (3000, 400)]:
        mask = rng.integers(0, 3, shape, dtype=np.uint8)
        mask[: shape[0] // 2, : shape[1] // 2] = 2  # a run, as a pet is
        mask[-1, 0] = 255  # a difference from the row above that wraps around 256
        for view in (mask, np.asfortranarray(mask)):
            png = encode_mask(view)
            np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED), mask)
            with Image.open(io.BytesIO(png)) as image:  # Pillow checks each chunk's CRC
                assert image.mode == "L"
                np.testing.assert_array_equal(np.asarray(image), mask)
    wider = np.full((2, 3), 300, np.uint16)  # not uint8 labels: OpenCV writes it, as before
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(encode_mask(wider), np.uint8), cv2.IMREAD_UNCHANGED), wider)


def test_a_task_model_is_left_out_of_collections_until_a_new_version_replaces_it(run_dir, tmp_path):
    import gc
    import shutil
    import weakref

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    try:
        first = artifact.load(str(run), freeze=True)
        assert gc.get_freeze_count() > 0  # what the load left is out of every later collection
        old = weakref.ref(first.model)
        del first
        artifact.write_metadata(run, image_size=32, preprocessing="unit_scale", run_id="retrained")
        second = artifact.load(str(run), freeze=True)
        assert second.artifact.version == "retrained"
        assert old() is None  # the version dropped from the cache was collected, frozen as it was
    finally:
        gc.unfreeze()


def test_a_task_rereads_a_zip_on_the_path_only_when_the_zip_changed(tmp_path, monkeypatch):
    """pyspark's worker calls importlib.invalidate_caches() at every task; Python < 3.13 then re-reads
    every zip on sys.path (pyspark.zip, py4j's zip) unless the task environment stopped it."""
    import importlib
    import sys
    import zipfile

    archive = tmp_path / "lib.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("zipped_first.py", "VALUE = 1\n")
    monkeypatch.syspath_prepend(str(archive))
    monkeypatch.delitem(sys.modules, "zipped_first", raising=False)
    monkeypatch.delitem(sys.modules, "zipped_second", raising=False)
    assert importlib.import_module("zipped_first").VALUE == 1
    importer = sys.path_importer_cache[str(archive)]
    env.prepare_task_environment()
    if sys.version_info < (3, 13):
        files = importer._files
        importlib.invalidate_caches()  # the next task's
        assert importer._files is files  # the unchanged archive was not read again
    with zipfile.ZipFile(archive, "a") as zipped:
        zipped.writestr("zipped_second.py", "VALUE = 2\n")
    importlib.invalidate_caches()
    assert importlib.import_module("zipped_second").VALUE == 2  # the changed one was


def test_model_resolution_and_missing_models(run_dir, tmp_path):
    assert artifact.resolve(str(run_dir / "model")).image_size == 32  # the model folder works too
    assert artifact.load(str(run_dir)) is artifact.load(str(run_dir))  # loaded once per process
    with pytest.raises(InputError, match="does not exist; pass a training run's train.output_dir"):
        artifact.resolve(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="is not a petseg model"):
        artifact.resolve(str(tmp_path))


def test_spark_udf_equals_local_segmentation_and_keeps_bad_rows(spark, run_dir):
    import cv2

    from petseg.infer.job import segment_column

    pets = [render.synthetic_pet(i, seed=4, size=size) for i, size in enumerate([(64, 48), (40, 30), (100, 80)])]
    rows = [(f"pet{i}", render.encode_jpeg(p.image)) for i, p in enumerate(pets)] + [("empty", b""), ("junk", b"xx")]
    df = spark.createDataFrame(rows, "key string, image binary").repartition(2)
    out = df.select("key", segment_column("image", str(run_dir), batch_size=2, model_resolution=True).alias("s"))
    got = {r["key"]: r["s"] for r in out.collect()}
    assert got["empty"]["mask_png"] is None and got["empty"]["error"].startswith("image_empty")
    assert got["junk"]["error"].startswith("image_undecodable")
    local = segment_images(artifact.load(str(run_dir)), [data for _, data in rows[:3]], batch_size=8)
    for i, (pet, seg) in enumerate(zip(pets, local)):
        row = got[f"pet{i}"]
        mask = cv2.imdecode(np.frombuffer(row["mask_png"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert mask.shape == pet.image.shape[:2] and row["error"] is None
        np.testing.assert_array_equal(mask, seg.mask)  # the UDF's masks are the local model's
        model_mask = cv2.imdecode(np.frombuffer(row["mask_model_png"], np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(model_mask, seg.mask_model)
        assert abs(row["fraction_pet"] + row["fraction_background"] + row["fraction_border"] - 1) < 1e-9


#: The inference output's columns as users query them, by name and Spark type, in order: the UDF's struct
#: and the MLflow model's frame; the job adds the key first and model_uri, model_version before error.
#: Written out, not derived: a change here is a change to what their queries read.
OUTPUT_CONTRACT = [
    ("mask_png", "binary"), ("mask_model_png", "binary"), ("height", "int"), ("width", "int"),
    ("fraction_pet", "double"), ("fraction_background", "double"), ("fraction_border", "double"),
    ("error", "string"),
]


def test_spark_pandas_mlflow_and_the_pipeline_derive_one_output_contract():
    from dataclasses import fields

    import pyarrow as pa

    from petseg.errors import RejectedInput
    from petseg.infer.job import SEGMENTATION_SCHEMA
    from petseg.model.pyfunc import _signature
    from petseg.model.segment import OUTPUT_COLUMNS, EncodedSegmentation, results_frame

    names = [name for name, _ in OUTPUT_CONTRACT]
    assert [c.name for c in OUTPUT_COLUMNS] == names
    # Spark: every field nullable, no metadata, as the schema was before it was derived.
    assert [(f.name, f.dataType.simpleString(), f.nullable, f.metadata) for f in SEGMENTATION_SCHEMA.fields] == [
        (name, kind, True, {}) for name, kind in OUTPUT_CONTRACT
    ]
    # MLflow names Spark's int "integer"; no output is required.
    assert _signature().outputs.to_dict() == [
        {"type": "integer" if kind == "int" else kind, "name": name, "required": False}
        for name, kind in OUTPUT_CONTRACT
    ]
    # The pipeline's record: the columns' fields in their order, the per-class columns sharing a tuple.
    assert [f.name for f in fields(EncodedSegmentation)] == list(dict.fromkeys(c.field for c in OUTPUT_COLUMNS))
    good = EncodedSegmentation(mask_png=b"png", mask_model_png=b"small png", height=375, width=500,
                               fractions=(0.5, 0.25, 0.25), error=None)
    bad = EncodedSegmentation.rejected(RejectedInput("image_empty", "the image has no bytes"))
    frame = results_frame([good, bad])
    assert list(frame.columns) == names
    # pandas: what Arrow hands Spark is the contract's types, whatever pandas inferred.
    arrow_types = {"binary": pa.binary(), "int": pa.int32(), "double": pa.float64(), "string": pa.string()}
    arrow = pa.Table.from_pandas(frame, preserve_index=False).schema
    assert arrow.types == [arrow_types[kind] for _, kind in OUTPUT_CONTRACT]
    assert frame.iloc[0].tolist() == [b"png", b"small png", 375, 500, 0.5, 0.25, 0.25, None]
    assert frame.iloc[1].isna().tolist() == [True] * (len(names) - 1) + [False]
    assert frame["error"].iloc[1] == "image_empty: the image has no bytes"


# --------------------------------------------------------------------------- the inference job


def _decode_png(data: bytes) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def _infer(spark, *overrides: str):
    from conftest import load_job_config

    from petseg.infer.job import run_infer

    cfg = load_job_config("infer", *overrides)
    return cfg.infer, run_infer(spark, infer=cfg.infer)


def test_job_on_a_parquet_table_keeps_bad_rows_and_original_sizes(spark, run_dir, tmp_path):
    pets = [render.synthetic_pet(i, seed=21, size=size) for i, size in enumerate([(64, 48), (30, 41), (120, 90)])]
    rows = [(f"pet{i}", render.encode_jpeg(p.image), "x") for i, p in enumerate(pets)]
    rows += [("empty", b"", "x"), ("junk", b"GIF89a but not really", "x"), ("null", None, "x")]
    src = tmp_path / "photos.parquet"
    spark.createDataFrame(rows, "name string, photo binary, other string").write.parquet(str(src))
    infer, report = _infer(spark, f"infer.model={run_dir}", f"infer.input={src}", "infer.image_column=photo",
                           "infer.key_column=name", f"infer.output={tmp_path / 'masks'}", "infer.batch_size=2")
    assert report.input_format == "parquet" and report.segmented == 3
    assert report.failed == {"image_empty": 2, "image_undecodable": 1}
    out = {r["name"]: r for r in spark.read.parquet(str(tmp_path / "masks")).collect()}
    assert set(out) == {name for name, _, _ in rows}  # nothing lost
    contract = [name for name, _ in OUTPUT_CONTRACT]
    assert spark.read.parquet(str(tmp_path / "masks")).columns == ["name", *contract[:-1], "model_uri",
                                                                    "model_version", "error"]
    local = segment_images(artifact.load(str(run_dir)), [data for _, data, _ in rows[:3]], batch_size=8)
    for i, (pet, seg) in enumerate(zip(pets, local)):
        row = out[f"pet{i}"]
        mask = _decode_png(row["mask_png"])
        assert mask.shape == pet.image.shape[:2] == (row["height"], row["width"])  # its own size, not 32x32
        np.testing.assert_array_equal(mask, seg.mask)  # the job's masks are a local predict's
        assert row["mask_model_png"] is None  # infer.model_resolution is off
        assert (row["model_uri"], row["model_version"], row["error"]) == (infer.model, "run-under-test", None)
    for name in ("empty", "junk", "null"):
        assert out[name]["mask_png"] is None and out[name]["fraction_pet"] is None and out[name]["error"]
    # A re-run replaces the output.
    _, again = _infer(spark, f"infer.model={run_dir}", f"infer.input={src}", "infer.image_column=photo",
                      "infer.key_column=name", f"infer.output={tmp_path / 'masks'}", "infer.limit=2")
    assert again.rows == 2 and spark.read.parquet(str(tmp_path / "masks")).count() == 2


def test_arrow_batches_are_bounded_by_the_bytes_of_their_images(spark, run_dir, tmp_path):
    import cv2

    from petseg.infer.job import LARGE_VAR_TYPES_CONF

    rng = np.random.default_rng(4)
    photos = [cv2.imencode(".png", rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))[1].tobytes() for _ in range(7)]
    largest = max(map(len, photos))
    src = tmp_path / "big.parquet"
    spark.createDataFrame([(f"p{i}", p) for i, p in enumerate(photos)], "id string, image binary").write.parquet(str(src))
    # Room for two and a half of the largest images: two rows per batch, not infer.arrow_batch_rows.
    _, report = _infer(spark, f"infer.model={run_dir}", f"infer.input={src}", f"infer.output={tmp_path / 'masks'}",
                       f"infer.arrow_batch_bytes={int(2.5 * largest)}", "infer.arrow_batch_rows=64", "infer.batch_size=2")
    assert report.arrow_batch_rows == 2 and report.segmented == 7
    assert spark.conf.get(LARGE_VAR_TYPES_CONF, None) != "true"  # the job's confs are put back
    # File paths are read inside the UDF, so only rows bound their batches.
    folder = tmp_path / "files"
    folder.mkdir()
    for i, photo in enumerate(photos[:3]):
        (folder / f"p{i}.png").write_bytes(photo)
    _, report = _infer(spark, f"infer.model={run_dir}", f"infer.input={folder}", f"infer.output={tmp_path / 'm2'}",
                       f"infer.arrow_batch_bytes={largest}", "infer.arrow_batch_rows=64", "infer.batch_size=2")
    assert report.arrow_batch_rows == 64 and report.segmented == 3


def test_job_on_a_folder_of_files_reports_empty_and_unreadable(spark, run_dir, tmp_path):
    from petseg.errors import RejectedInput
    from petseg.io.fs import read_file

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    pet = render.synthetic_pet(5, seed=2, size=(70, 50))
    (folder / "a.jpg").write_bytes(render.encode_jpeg(pet.image))
    (folder / "sub" / "b.png").write_bytes(render.encode_png(pet.image))
    (folder / "empty.jpg").write_bytes(b"")  # Spark's binaryFile would drop this one silently
    (folder / "_SUCCESS").write_bytes(b"")  # hidden, as Spark treats it
    _, report = _infer(spark, f"infer.model={run_dir}", f"infer.input={folder}", f"infer.output={tmp_path / 'out'}",
                       "infer.model_resolution=true")
    assert report.input_format == "images" and report.segmented == 2 and report.failed == {"image_empty": 1}
    out = {r["path"].rsplit("/", 1)[-1]: r for r in spark.read.parquet(str(tmp_path / "out")).collect()}
    assert set(out) == {"a.jpg", "b.png", "empty.jpg"}
    assert _decode_png(out["b.png"]["mask_png"]).shape == pet.image.shape[:2]
    assert _decode_png(out["b.png"]["mask_model_png"]).shape == (32, 32)
    _, globbed = _infer(spark, f"infer.model={run_dir}", f"infer.input={folder}/*.jpg", f"infer.output={tmp_path / 'g'}")
    assert globbed.rows == 2  # a.jpg and empty.jpg, not sub/b.png
    # A file that vanished (or cannot be read) after listing becomes an error row, not a failed job.
    with pytest.raises(RejectedInput, match="file_unreadable"):
        read_file((folder / "gone.jpg").as_uri())
    from petseg.infer.job import segment_column

    frame = spark.createDataFrame([((folder / "a.jpg").as_uri(),), ((folder / "gone.jpg").as_uri(),)], "path string")
    got = frame.select(segment_column("path", str(run_dir), read_files=True).alias("s")).collect()
    assert got[0]["s"]["error"] is None and got[1]["s"]["error"].startswith("file_unreadable")


def test_job_segments_files_whose_names_hold_a_space_a_percent_and_a_hash(spark, run_dir, tmp_path):
    folder = tmp_path / "photos a b%20#1"
    folder.mkdir()
    (folder / "a b%20#1.jpg").write_bytes(render.encode_jpeg(render.synthetic_pet(3, seed=4, size=(40, 30)).image))
    _, report = _infer(spark, f"infer.model={run_dir}", f"infer.input={folder}", f"infer.output={tmp_path / 'odd'}")
    assert report.segmented == 1 and report.failed == {}
    [row] = spark.read.parquet(str(tmp_path / "odd")).collect()
    assert row["path"] == f"file://{folder}/a b%20#1.jpg" and (row["height"], row["width"]) == (30, 40)


def test_a_run_retrained_into_the_same_folder_is_loaded_anew_in_reused_workers(spark, tmp_path):
    """A notebook: infer, retrain into the same folder, infer again in the same session (Spark reuses
    its Python workers, and with them any model they cached)."""
    from conftest import assert_masks_are_a_fresh_predict, write_pet_photos

    from petseg.model import build_unet

    folder = tmp_path / "photos"
    pets = write_pet_photos(folder)
    run = tmp_path / "run"
    for seed, run_id in ((11, "first"), (12, "second")):
        model = build_unet(image_size=32, n_depth=2, encoder_weights="none", seed=seed)
        model.save(str(run / artifact.MODEL_FOLDER), include_optimizer=False)
        artifact.write_metadata(run, image_size=32, preprocessing="unit_scale", run_id=run_id)
        _, report = _infer(spark, f"infer.model={run}", f"infer.input={folder}", f"infer.output={tmp_path / run_id}",
                           "infer.partitions=2")
        assert report.model_version == run_id and report.segmented == 4
        assert_masks_are_a_fresh_predict(spark, tmp_path / run_id, model=model, pets=pets, preprocessing="unit_scale",
                                         version=run_id)
    with pytest.raises(InputError, match="is now version second, not first"):
        artifact.load(f"file://{run}", version="first")


def test_job_on_the_ingested_dataset_and_catalog_tables(spark, run_dir, tmp_path):
    from conftest import data_config

    from petseg.ingest.convert import run_ingest

    data = data_config(source="synthetic", dataset=str(tmp_path / "pets"), synthetic_count=10, synthetic_seed=5,
                       image_size=32, min_row_groups_per_split=1)
    run_ingest(spark, data=data)
    _, report = _infer(spark, f"infer.model={run_dir}", f"infer.input={tmp_path / 'pets'}", "infer.output=masks_tbl")
    assert report.input_format == "petastorm" and report.segmented == 10 and report.failed == {}
    rows = {r["id"]: r for r in spark.table("masks_tbl").collect()}  # written with saveAsTable
    with open_split_rows(data.dataset) as stored:
        for row in stored:
            got = rows[row.id]
            assert (got["height"], got["width"]) == (row.height, row.width)  # the original size, from the columns
            expected = artifact.load(str(run_dir)).predict_labels(row.image[None], batch_size=1)[0]
            np.testing.assert_array_equal(_decode_png(got["mask_png"]), decode.resize_mask(expected, (row.height, row.width)))
    # A catalog table as input (any key), with a limit for a quick look.
    spark.createDataFrame([("k1", render.encode_png(render.synthetic_pet(1, seed=1).image))], "key string, image binary") \
        .write.mode("overwrite").saveAsTable("photos_tbl")
    _, quick = _infer(spark, f"infer.model={run_dir}", "infer.input=photos_tbl", f"infer.output={tmp_path / 'q'}",
                      "infer.limit=1")
    assert quick.input_format == "table" and quick.segmented == 1


def open_split_rows(url: str):
    from petseg.data.reader import open_split

    return open_split(url, split="test", fields=("id", "image", "height", "width"), workers_count=1)


def test_job_fails_at_once_on_a_bad_model_or_input(spark, run_dir, tmp_path):
    with pytest.raises(InputError, match="does not exist; pass a training run's train.output_dir"):
        _infer(spark, f"infer.model={tmp_path / 'nope'}", f"infer.input={tmp_path}", f"infer.output={tmp_path.parent / (tmp_path.name + '_o')}")
    with pytest.raises(InputError, match="is not a petseg model"):
        _infer(spark, f"infer.model={tmp_path}", f"infer.input={tmp_path}", f"infer.output={tmp_path.parent / (tmp_path.name + '_o')}")
    with pytest.raises(InputError, match="is not a local path"):
        artifact.resolve("hdfs://nn/runs/r1")
    src = tmp_path / "t.parquet"
    spark.createDataFrame([("a", b"x", "e")], "id string, bytes binary, error string").write.parquet(str(src))
    with pytest.raises(InputError, match="infer.image_column='image' is not a binary column.*binary columns there: bytes"):
        _infer(spark, f"infer.model={run_dir}", f"infer.input={src}", f"infer.output={tmp_path.parent / (tmp_path.name + '_o')}")
    with pytest.raises(InputError, match="key column 'error' has the name of an output column"):
        _infer(spark, f"infer.model={run_dir}", f"infer.input={src}", "infer.image_column=bytes", "infer.key_column=error",
               f"infer.output={tmp_path.parent / (tmp_path.name + '_o')}")
    with pytest.raises(InputError, match="matches no files"):
        _infer(spark, f"infer.model={run_dir}", f"infer.input={tmp_path}/*.jpg", f"infer.output={tmp_path.parent / (tmp_path.name + '_o')}")
    with pytest.raises(config.ConfigError, match="infer.output=None is not allowed"):
        _infer(spark, f"infer.model={run_dir}", f"infer.input={src}")
    assert not (tmp_path.parent / (tmp_path.name + "_o")).exists()


def test_listing_follows_hadoop_globs_and_spark_hidden_names(tmp_path):
    from petseg.io.fs import list_files

    for name in ["a.jpg", "b.png", "c.gif", "_SUCCESS", ".DS_Store", "sub/d.jpg", "2024-01/e.jpg", "_tmp/f.jpg",
                 "part=1/g.jpg"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    root = f"file://{tmp_path}"

    def names(url):
        return sorted(u[len(root) + 1:] for u in list_files(url))

    assert names(root) == ["2024-01/e.jpg", "a.jpg", "b.png", "c.gif", "part=1/g.jpg", "sub/d.jpg"]
    assert names(f"{root}/*.jpg") == ["a.jpg"]  # `*` stays within one path component
    assert names(f"{root}/*.{{jpg,png}}") == ["a.jpg", "b.png"]
    assert names(f"{root}/2024-*") == ["2024-01/e.jpg"]  # a matching folder brings its files
    assert names(f"{root}/[as]*/*.jpg") == ["sub/d.jpg"]
    assert list_files(f"{root}/a.jpg") == [f"{root}/a.jpg"] and list_files(f"{root}/missing") == []


def test_wide_trees_are_listed_on_the_executors_with_the_same_rules(spark, tmp_path, capsys):
    from petseg.io.fs import list_files, list_files_frame

    for name in ["a.jpg", "b.png", "_SUCCESS", ".hidden/x.jpg", "sub/d.jpg", "sub/deeper/e.jpg", "2024-01/e.jpg",
                 "2024-02/f.jpg", "2024-02/.g.jpg", "_tmp/f.jpg", "part=1/g.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")  # empty files are listed too: they become error rows
    root = f"file://{tmp_path}"
    for url in [root, f"{root}/*.jpg", f"{root}/2024-*", f"{root}/2024-*/*.jpg", f"{root}/[as]*/*.jpg",
                f"{root}/{{sub,part=1}}", f"{root}/a.jpg", f"{root}/missing"]:
        frame = list_files_frame(spark, url, parallel_folders=1)
        assert sorted(r.path for r in frame.collect()) == sorted(list_files(url)), url
    list_files_frame(spark, root, parallel_folders=1).explain()
    assert "MapInPandas" in capsys.readouterr().out  # the subfolders were listed by tasks
    list_files_frame(spark, root).explain()
    assert "MapInPandas" not in capsys.readouterr().out  # 4 subfolders: listed on the driver


def test_listed_paths_reach_spark_through_arrow_not_a_python_worker(spark, tmp_path):
    from petseg.io.fs import list_files_frame

    arrow = "spark.sql.execution.arrow.pyspark.enabled"
    for name in ["a.jpg", "sub/b.jpg", "sub/deeper/c.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    before = spark.conf.get(arrow, None)
    for parallel_folders in (1, 32):  # the subfolders listed by tasks, then all on the driver
        frame = list_files_frame(spark, f"file://{tmp_path}", parallel_folders=parallel_folders)
        assert frame.count() == 3
        # Pickled rows would need a Python worker (a PythonRDD) in every job over the listing.
        assert "PythonRDD" not in frame._jdf.queryExecution().toRdd().toDebugString()
    assert spark.conf.get(arrow, None) == before


def _cli(spark, *args: str) -> int:
    """``petseg <args>`` through :func:`petseg.cli.main` on the test session (spark.master is null, so
    the active session is used and left running); the confs it applies are put back."""
    from petseg.cli import main

    saved = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")
    try:
        return main(list(args))
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", saved)


def test_images_over_the_pixel_limit_become_error_rows(spark, run_dir, tmp_path):
    from conftest import png_bomb

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "small.jpg").write_bytes(render.encode_jpeg(render.synthetic_pet(1, seed=3, size=(40, 30)).image))
    (folder / "big.jpg").write_bytes(render.encode_jpeg(render.synthetic_pet(2, seed=3, size=(100, 80)).image))
    (folder / "bomb.png").write_bytes(png_bomb(20_000, 10_000))  # Pillow's DecompressionBombError once failed the job
    code = _cli(spark, "infer", f"infer.model={run_dir}", f"infer.input={folder}", f"infer.output={tmp_path / 'out'}",
                "data.max_image_pixels=5000")
    assert code == 0
    out = {r["path"].rsplit("/", 1)[-1]: r for r in spark.read.parquet(str(tmp_path / "out")).collect()}
    assert out["small.jpg"]["error"] is None and out["small.jpg"]["mask_png"]
    assert out["big.jpg"]["error"].startswith("image_too_large: the image is 100x80 = 8000 pixels, over "
                                              "data.max_image_pixels=5000")
    assert out["bomb.png"]["error"].startswith("image_too_large: ") and out["bomb.png"]["mask_png"] is None


def test_a_mask_that_cannot_be_encoded_is_an_error_row(spark, run_dir, tmp_path):
    import io

    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(render.encode_jpeg(render.synthetic_pet(1, seed=3, size=(40, 30)).image))
    wide = io.BytesIO()
    Image.new("RGB", (1_000_001, 1), (90, 120, 30)).save(wide, format="PNG")  # Pillow reads it; libpng won't write it
    (folder / "wide.png").write_bytes(wide.getvalue())
    infer, report = _infer(spark, f"infer.model={run_dir}", f"infer.input={folder}", f"infer.output={tmp_path / 'out'}")
    assert report.segmented == 1 and report.failed == {"mask_unencodable": 1}
    out = {r["path"].rsplit("/", 1)[-1]: r for r in spark.read.parquet(str(tmp_path / "out")).collect()}
    assert out["wide.png"]["mask_png"] is None and out["wide.png"]["fraction_pet"] is None
    assert out["wide.png"]["error"].startswith("mask_unencodable: the 1000001x1 mask could not be encoded as PNG")


def test_inference_that_segments_nothing_fails_with_one_line(spark, run_dir, tmp_path, capsys):
    from petseg.infer.job import NothingSegmentedError

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"not an image")
    (bad / "b.jpg").write_bytes(b"")
    with pytest.raises(NothingSegmentedError, match=r"none of the 2 rows of infer.input=.* was segmented \(failed: "
                                                    r"\{.*'image_undecodable': 1.*\}\); the error column of .* says why"):
        _infer(spark, f"infer.model={run_dir}", f"infer.input={bad}", f"infer.output={tmp_path / 'o1'}")
    assert spark.read.parquet(str(tmp_path / "o1")).count() == 2  # written first, so the errors can be read
    empty = tmp_path / "empty.parquet"
    spark.createDataFrame([], "id string, image binary").write.parquet(str(empty))
    with pytest.raises(NothingSegmentedError, match="holds no rows to segment"):
        _infer(spark, f"infer.model={run_dir}", f"infer.input={empty}", f"infer.output={tmp_path / 'o2'}")
    # Through the command line: a non-zero exit and one line naming the fix.
    capsys.readouterr()
    assert _cli(spark, "infer", f"infer.model={run_dir}", f"infer.input={bad}", f"infer.output={tmp_path / 'o3'}") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("petseg: infer failed: none of the 2 rows of infer.input=") and "error column" in err[-1]
    assert _cli(spark, "infer", f"infer.model={run_dir}", f"infer.input={empty}", f"infer.output={tmp_path / 'o4'}") == 1
    assert "holds no rows to segment" in capsys.readouterr().err.strip().splitlines()[-1]


def test_gpu_confs_that_would_move_a_pinned_worker_are_refused():
    from pyspark import SparkConf

    from petseg.session import GpuSchedulingError, check_gpu_task_slots

    def conf(**values: str) -> SparkConf:
        return SparkConf(loadDefaults=False).setAll([(k.replace("_", "."), v) for k, v in values.items()])

    with pytest.raises(GpuSchedulingError, match=r"spark.executor.resource.gpu.amount=2 with spark.task.resource.gpu."
                                                 r"amount=1 .* or set spark.python.worker.reuse=false"):
        check_gpu_task_slots(conf(spark_executor_resource_gpu_amount="2", spark_task_resource_gpu_amount="1"))
    for fine in (conf(spark_executor_resource_gpu_amount="1", spark_task_resource_gpu_amount="1"),  # one GPU each
                 conf(spark_executor_resource_gpu_amount="1", spark_task_resource_gpu_amount="0.5"),  # one GPU shared
                 conf(spark_executor_resource_gpu_amount="2", spark_task_resource_gpu_amount="2"),  # all GPUs per task
                 conf(spark_executor_resource_gpu_amount="2", spark_task_resource_gpu_amount="1",
                      spark_python_worker_reuse="false"),  # a fresh worker per task
                 conf()):  # no GPU scheduling
        check_gpu_task_slots(fine)


GPU_TASKS = """
import json, os, sys
import pandas as pd
from pyspark import TaskContext
from pyspark.sql import SparkSession
from petseg import env
from petseg.data import render
from petseg.infer.job import segment_column, segment_udf

run, discovery = sys.argv[1], sys.argv[2]
master = "local-cluster[1,2,2048]"  # one executor, two cores, two (fake) GPUs, one GPU per task
env.prepare_process_environment(master=master)
spark = (SparkSession.builder.master(master).config("spark.ui.enabled", "false")
         .config("spark.worker.resource.gpu.amount", "2").config("spark.worker.resource.gpu.discoveryScript", discovery)
         .config("spark.executor.resource.gpu.amount", "2").config("spark.executor.resource.gpu.discoveryScript", discovery)
         .config("spark.task.resource.gpu.amount", "1").config("spark.python.worker.reuse", "false")
         .config("spark.executorEnv.TF_USE_LEGACY_KERAS", "1").getOrCreate())
rows = [(f"p{i}", render.encode_png(render.synthetic_pet(i, seed=1, size=(40, 30)).image)) for i in range(4)]
frame = spark.createDataFrame(rows, "id string, image binary").repartition(2)
segment = segment_udf(run, batch_size=2)

def probe(batches):
    # The UDF's own function, in a task Spark scheduled with a GPU; then what its TensorFlow was shown.
    batch = pd.concat(list(batches))
    none = pd.Series([None] * len(batch), dtype="Int32")
    out = pd.concat(list(segment.func(iter([(batch["image"], none, none)]))))
    yield pd.DataFrame([{"assigned": ",".join(TaskContext.get().resources()["gpu"].addresses),
                         "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                         "growth": os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH"),
                         "segmented": int(out["error"].isna().sum()), "pid": os.getpid()}])

seen = frame.mapInPandas(probe, "assigned string, visible string, growth string, segmented int, pid int").collect()
job = frame.select(segment_column("image", run, batch_size=2).alias("s")).where("s.error is null").count()
print("RESULT " + json.dumps({"tasks": [r.asDict() for r in seen], "segmented": job}))
spark.stop()
"""


@pytest.mark.slow
@pytest.mark.cluster
def test_each_gpu_task_shows_tensorflow_only_its_own_gpu(run_dir, tmp_path):
    """local-cluster with two fake GPUs on one executor: two concurrent tasks, assigned GPU 0 and GPU 1,
    each pin their Python worker's TensorFlow to their own GPU, with memory growth on."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "fake_gpus.sh"
    script.write_text('#!/usr/bin/env bash\necho \'{"name": "gpu", "addresses": ["0", "1"]}\'\n')
    script.chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if k != "PYSPARK_PYTHON"}
    done = subprocess.run([sys.executable, "-c", GPU_TASKS, str(run_dir), str(script)], capture_output=True, text=True,
                          env=environ, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    tasks = result["tasks"]
    assert sorted(t["assigned"] for t in tasks) == ["0", "1"]  # two tasks, two different GPUs
    assert all(t["visible"] == t["assigned"] and t["growth"] == "true" for t in tasks), tasks
    assert len({t["pid"] for t in tasks}) == 2 and sum(t["segmented"] for t in tasks) == 4
    assert result["segmented"] == 4  # the job's UDF under the same GPU scheduling


def test_preview_lays_the_written_masks_over_their_photos_beside_the_output(spark, run_dir, tmp_path):
    import cv2

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        (folder / f"p{i}.jpg").write_bytes(render.encode_jpeg(render.synthetic_pet(i, seed=7, size=(900, 600)).image))
    (folder / "bad.jpg").write_bytes(b"nope")
    heights = {}
    for n in (2, 4):
        out = tmp_path / f"masks{n}"
        _, report = _infer(spark, f"infer.model={run_dir}", f"infer.input={folder}", f"infer.output={out}",
                           f"infer.preview_images={n}")
        assert report.preview == f"file://{out}_preview.png" and f"preview: {report.preview}" in report.format()
        picture = cv2.imdecode(np.frombuffer((tmp_path / f"masks{n}_preview.png").read_bytes(), np.uint8),
                               cv2.IMREAD_COLOR)
        heights[n] = picture.shape[0]
    assert heights[4] > 1.5 * heights[2]  # a second row of photos: one per segmented row asked for
    # A Parquet input: the photos come from the input rows with the output's keys.
    table = tmp_path / "table"
    rows = [(f"k{i}", render.encode_png(render.synthetic_pet(i, seed=2, size=(60, 40)).image)) for i in range(3)]
    spark.createDataFrame(rows, "key string, image binary").write.parquet(str(table))
    _, report = _infer(spark, f"infer.model={run_dir}", f"infer.input={table}", f"infer.output={tmp_path / 'tm'}",
                       "infer.preview_images=3")
    assert (tmp_path / "tm_preview.png").stat().st_size > 1000
    from petseg.errors import ConfigError

    with pytest.raises(ConfigError, match="infer.preview_images=3 is not allowed; use 0 with a table"):
        _infer(spark, f"infer.model={run_dir}", f"infer.input={table}", "infer.output=some_table",
               "infer.preview_images=3")


def test_the_docs_column_table_lists_the_output_contract():
    """docs/inference.md's table of output columns names exactly the columns the job writes, in order."""
    import re

    from conftest import ROOT

    from petseg.infer.job import SEGMENTATION_SCHEMA

    text = (ROOT / "docs" / "inference.md").read_text()
    documented = [name for row in re.findall(r"^\| (`[^|]+`) \|", text, re.M) for name in re.findall(r"`(\w+)`", row)]
    written = [f.name for f in SEGMENTATION_SCHEMA.fields if f.name != "error"] + ["model_uri", "model_version", "error"]
    assert documented == written
