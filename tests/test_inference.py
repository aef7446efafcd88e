"""Segmenting images with an exported model: same decoding as training, original sizes back, bad rows kept."""

import json

from petseg import config

config.prepare_process_environment(master="local[2]")  # tf-keras, before TensorFlow is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from petseg import images, synthetic  # noqa: E402
from petseg.inference import load_model, predict_labels, resolve_model, segment_images  # noqa: E402
from petseg.sources import InputError  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from petseg.model import build_unet

    run = tmp_path_factory.mktemp("run")
    build_unet(image_size=32, n_depth=2, encoder_weights="none", seed=3).save(str(run / "model"), include_optimizer=False)
    (run / "petseg-model.json").write_text(json.dumps(
        {"model_path": "model", "image_size": 32, "classes": ["pet", "background", "border"], "preprocessing": "unit_scale"}
    ))
    return run


def test_masks_match_a_local_predict_at_original_size(run_dir):
    loaded = load_model(str(run_dir))
    pets = [synthetic.render(i, seed=9, size=size) for i, size in enumerate([(50, 40), (32, 32), (300, 200)])]
    encoded = [synthetic.encode_png(p.image) for p in pets]
    out = segment_images(loaded, [*encoded[:1], b"", b"not an image", *encoded[1:]], batch_size=2)
    assert [o.error is None for o in out] == [True, False, False, True, True]
    assert out[1].error.startswith("image_empty") and out[2].error.startswith("image_undecodable")
    good = [out[0], out[3], out[4]]
    expected = predict_labels(loaded, np.stack([images.resize_image(p.image, 32) for p in pets]), batch_size=8)
    for pet, seg, labels in zip(pets, good, expected):
        np.testing.assert_array_equal(seg.mask_model, labels)
        assert seg.mask.shape == pet.image.shape[:2]  # back at the image's own size
        np.testing.assert_array_equal(seg.mask, images.resize_mask(labels, pet.image.shape[:2]))
        assert abs(sum(seg.fractions) - 1) < 1e-9 and len(seg.fractions) == 3


def test_model_resolution_and_missing_models(run_dir, tmp_path):
    assert resolve_model(str(run_dir / "model"))[1]["image_size"] == 32  # the model folder works too
    assert load_model(str(run_dir)) is load_model(str(run_dir))  # loaded once per process
    with pytest.raises(InputError, match="does not exist; pass a training run's train.output_dir"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="is not a petseg model"):
        resolve_model(str(tmp_path))


def test_spark_udf_equals_local_segmentation_and_keeps_bad_rows(spark, run_dir):
    import cv2

    from petseg.infer import segment_column

    pets = [synthetic.render(i, seed=4, size=size) for i, size in enumerate([(64, 48), (40, 30), (100, 80)])]
    rows = [(f"pet{i}", synthetic.encode_jpeg(p.image)) for i, p in enumerate(pets)] + [("empty", b""), ("junk", b"xx")]
    df = spark.createDataFrame(rows, "key string, image binary").repartition(2)
    out = df.select("key", segment_column("image", str(run_dir), batch_size=2, model_resolution=True).alias("s"))
    got = {r["key"]: r["s"] for r in out.collect()}
    assert got["empty"]["mask_png"] is None and got["empty"]["error"].startswith("image_empty")
    assert got["junk"]["error"].startswith("image_undecodable")
    local = segment_images(load_model(str(run_dir)), [data for _, data in rows[:3]], batch_size=8)
    for i, (pet, seg) in enumerate(zip(pets, local)):
        row = got[f"pet{i}"]
        mask = cv2.imdecode(np.frombuffer(row["mask_png"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert mask.shape == pet.image.shape[:2] and row["error"] is None
        np.testing.assert_array_equal(mask, seg.mask)  # the UDF's masks are the local model's
        model_mask = cv2.imdecode(np.frombuffer(row["mask_model_png"], np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(model_mask, seg.mask_model)
        assert abs(row["fraction_pet"] + row["fraction_background"] + row["fraction_border"] - 1) < 1e-9
