"""The U-Net factory, its argument checks, preprocessing, loss, metrics and optimizer schedule."""

import os

# tf-keras (Keras 2) must be chosen before TensorFlow is first imported anywhere in the process.
os.environ["TF_USE_LEGACY_KERAS"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from petseg import config  # noqa: E402
from petseg.config.layers import LOCAL_CONF  # noqa: E402
from petseg.data import decode, render  # noqa: E402
from petseg.model import (  # noqa: E402
    ENCODER_SKIPS,
    build_unet,
    custom_objects,
    make_optimizer,
    preprocess,
    preprocessing_for,
    resolved_width,
    segmentation_loss,
    segmentation_metrics,
    validate_unet_args,
)
from petseg.model.unet import FROM_SCRATCH_WIDTH  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _encoder_layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    return [layer for layer in model.layers if layer.name.startswith("block")]


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("n_depth", [1, 2, 3, 4, 5])
def test_output_shape_for_every_depth(size, n_depth):
    model = build_unet(image_size=size, n_depth=n_depth, seed=0)
    out = model(np.zeros((1, size, size, 3), np.float32), training=False)
    assert out.shape == (1, size, size, 3) and out.dtype == tf.float32
    # Only the blocks the depth needs are built, and the skip names resolve to layers.
    blocks = {layer.name.split("_")[0] for layer in _encoder_layers(model)}
    assert blocks == {f"block{b}" for b in range(1, n_depth + 1)}
    for name in ENCODER_SKIPS[:n_depth]:
        model.get_layer(name)


def test_head_returns_logits():
    model = build_unet(image_size=32, n_depth=2, seed=0)
    assert model.get_layer("head").activation is tf.keras.activations.linear
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    out = model(x, training=False).numpy()
    not_probabilities = (out < 0).any() or not np.allclose(out.sum(axis=-1), 1.0, atol=1e-3)
    assert not_probabilities


def test_head_is_float32_under_mixed_bfloat16():
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_unet(image_size=32, n_depth=2, seed=0)
        assert model.get_layer("decoder0_conv1").compute_dtype == "bfloat16"
        assert model.output.dtype == tf.float32
        assert model(np.zeros((1, 32, 32, 3), np.float32)).dtype == tf.float32
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="module")
def vgg16_h5(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "vgg16_random.h5"
    tf.keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(str(path))
    return path


def test_pretrained_h5_is_loaded_and_frozen_by_default(vgg16_h5):
    model = build_unet(image_size=32, n_depth=2, encoder_weights=str(vgg16_h5))
    source = tf.keras.applications.VGG16(include_top=False, weights=None)
    source.load_weights(str(vgg16_h5))
    for name in ("block1_conv1", "block2_conv2"):
        np.testing.assert_array_equal(model.get_layer(name).get_weights()[0], source.get_layer(name).get_weights()[0])
    assert not any(layer.trainable for layer in _encoder_layers(model))
    assert model.get_layer("decoder0_conv1").trainable
    # auto: pretrained VGG16 has no batch norm.
    assert not any(isinstance(layer, tf.keras.layers.BatchNormalization) for layer in _encoder_layers(model))

    unfrozen = build_unet(image_size=32, n_depth=2, encoder_weights=str(vgg16_h5), freeze_encoder=False)
    assert all(layer.trainable for layer in _encoder_layers(unfrozen))


def test_from_scratch_is_trainable_with_batch_norm():
    model = build_unet(image_size=32, n_depth=2, encoder_weights="none")
    assert all(layer.trainable for layer in _encoder_layers(model))
    assert isinstance(model.get_layer("block1_conv1_bn"), tf.keras.layers.BatchNormalization)
    # The skip name is the unit's activated output in the BN variant too.
    assert isinstance(model.get_layer("block1_conv1"), tf.keras.layers.ReLU)
    frozen = build_unet(image_size=32, n_depth=2, encoder_weights="none", freeze_encoder=True)
    assert not any(layer.trainable for layer in _encoder_layers(frozen))


def test_width_narrows_every_block_and_keeps_the_shape_and_skips():
    full = build_unet(image_size=32, n_depth=5, seed=0)
    half = build_unet(image_size=32, n_depth=5, seed=0, width=0.5)
    for name, channels in (("block1_conv1", 32), ("block3_conv3", 128), ("block5_conv3", 256), ("decoder0_conv2", 32)):
        assert half.get_layer(name).output_shape[-1] == channels
        assert full.get_layer(name).output_shape[-1] == 2 * channels
    assert half.output_shape == full.output_shape == (None, 32, 32, 3)
    assert half.count_params() < full.count_params() / 3.5  # parameters (and FLOPs) fall with width squared
    # Unset, the width is VGG16's for pretrained weights and the recipe's from scratch.
    assert resolved_width(None, encoder_weights="imagenet") == 1.0
    assert resolved_width(None, encoder_weights="none") == FROM_SCRATCH_WIDTH < 1.0
    assert resolved_width(0.25, encoder_weights="none") == 0.25


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        (dict(image_size=64, n_depth=0), ["n_depth=0", "1 to 5"]),
        (dict(image_size=64, n_depth=6), ["n_depth=6", "1 to 5"]),
        (dict(image_size=60, n_depth=4), ["image_size=60", "2**(n_depth-1) = 8", "56 or 64"]),
        (dict(image_size=64, n_depth=3, encoder_weights="/nonexistent/vgg16.h5"), ["/nonexistent/vgg16.h5", "does not exist"]),
        (dict(image_size=64, n_depth=3, encoder_weights="imagenet21k"), ["imagenet21k", "'imagenet', 'none'"]),
        (dict(image_size=64, n_depth=3, n_classes=1), ["n_classes=1", ">= 2"]),
        (dict(image_size=64, n_depth=3, freeze_encoder="maybe"), ["freeze_encoder='maybe'", "'auto', True or False"]),
        (dict(image_size=64, n_depth=3, width=0.0), ["width=0.0", "(0, 1]"]),
        (dict(image_size=64, n_depth=3, width=0.5, encoder_weights="imagenet"), ["width=0.5", "encoder_weights='none'"]),
        (dict(image_size=64, n_depth=3, batch_norm_momentum=1.0), ["batch_norm_momentum=1.0", "[0, 1)"]),
    ],
)
def test_validation_names_the_bad_value_and_the_fix(kwargs, expected):
    kwargs = {"encoder_weights": "none", **kwargs}
    with pytest.raises(ValueError) as excinfo:
        build_unet(**kwargs)
    for text in expected:
        assert text in str(excinfo.value)


def test_validation_needs_no_tensorflow():
    code = (
        "import sys; from petseg.model import validate_unet_args\n"
        "validate_unet_args(image_size=128, n_depth=5, encoder_weights='imagenet')\n"
        "assert 'tensorflow' not in sys.modules, 'petseg.model imported TensorFlow'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_keras_3_is_refused_with_the_fix():
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    code = "from petseg.model import build_unet; build_unet(image_size=32, n_depth=1)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr and "TF_USE_LEGACY_KERAS=1" in result.stderr


def test_preprocessing_choice():
    assert preprocessing_for("imagenet") == "vgg16_caffe"
    assert preprocessing_for("/models/vgg16.h5") == "vgg16_caffe"
    assert preprocessing_for("none") == "unit_scale"


def test_vgg16_caffe_matches_keras_preprocess_input():
    x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    expected = tf.keras.applications.vgg16.preprocess_input(x.astype(np.float32).copy())
    for given in (x, x.astype(np.float32), tf.constant(x)):
        got = preprocess(given, "vgg16_caffe")
        assert got.dtype == tf.float32
        np.testing.assert_allclose(got.numpy(), np.asarray(expected), rtol=0, atol=1e-4)


def test_unit_scale_range_and_graph_mode():
    x = np.array([[[[0, 127, 255]]]], np.uint8)
    got = preprocess(x, "unit_scale").numpy()
    np.testing.assert_allclose(got.ravel(), [-1.0, 127 / 127.5 - 1, 1.0], atol=1e-6)
    ds = tf.data.Dataset.from_tensor_slices(np.zeros((3, 4, 4, 3), np.uint8)).batch(2)
    batch = next(iter(ds.map(lambda b: preprocess(b, "unit_scale"))))
    assert batch.dtype == tf.float32 and float(tf.reduce_min(batch)) == -1.0


def test_unknown_preprocessing_lists_the_names():
    with pytest.raises(ValueError, match="'vgg16_caffe', 'unit_scale'"):
        preprocess(np.zeros((1, 2, 2, 3), np.uint8), "imagenet")


def test_loss_without_dice_is_sparse_cross_entropy_and_serializes():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, (2, 4, 4)).astype(np.uint8)
    logits = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    ce = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    np.testing.assert_allclose(float(segmentation_loss(dice_weight=0.0)(y, logits)), float(ce), rtol=1e-5)
    # Confident correct logits: cross-entropy and Dice both near 0.
    perfect = 20.0 * tf.one_hot(y, 3)
    assert float(segmentation_loss(dice_weight=1.0)(y, perfect)) < 1e-3
    loss = segmentation_loss(dice_weight=0.5, class_weights=[1.0, 1.0, 3.0])
    clone = type(loss).from_config(loss.get_config())
    assert clone.get_config() == loss.get_config()
    with pytest.raises(ValueError, match="class_weights"):
        segmentation_loss(class_weights=[1.0, 2.0])


def _tiny_pets(count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    pets = [render.synthetic_pet(i, seed=0, size=(96, 96)) for i in range(count)]
    x = np.stack([decode.resize_image(p.image, size) for p in pets])
    y = np.stack([decode.resize_mask(p.trimap - 1, size) for p in pets])
    return x, y


def test_loss_decreases_in_a_short_training():
    tf.keras.utils.set_random_seed(0)
    x, y = _tiny_pets(8, 32)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).map(lambda a, b: (preprocess(a, "unit_scale"), b))
    model = build_unet(image_size=32, n_depth=2, seed=0)
    model.compile(
        optimizer=make_optimizer(learning_rate=1e-3, warmup_steps=3, total_steps=30),
        loss=segmentation_loss(),
        metrics=segmentation_metrics(),
    )
    history = model.fit(ds.repeat(), steps_per_epoch=1, epochs=30, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    for name in ("iou_pet", "iou_background", "iou_border"):
        assert 0.0 <= history[name][-1] <= 1.0


def test_metrics_names_and_values():
    metrics = segmentation_metrics()
    assert [m.name for m in metrics] == ["pixel_accuracy", "mean_iou", "iou_pet", "iou_background", "iou_border"]
    y_true = np.array([[[0, 1], [2, 1]]], np.uint8)
    predicted = np.array([[[0, 1], [1, 1]]])
    logits = 5.0 * tf.one_hot(predicted, 3) - 2.0  # negative values: these are logits, not probabilities
    values = {}
    for metric in metrics:
        metric.update_state(y_true, logits)
        values[metric.name] = float(metric.result())
    assert values["pixel_accuracy"] == pytest.approx(0.75)
    assert values["iou_pet"] == pytest.approx(1.0)
    assert values["iou_background"] == pytest.approx(2 / 3)
    assert values["iou_border"] == pytest.approx(0.0)
    assert values["mean_iou"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError, match="one name per class"):
        segmentation_metrics(n_classes=2)


def test_learning_rate_warms_up_then_decays():
    optimizer = make_optimizer(learning_rate=1e-3, warmup_steps=10, total_steps=100)
    schedule = optimizer._learning_rate  # the schedule object; .learning_rate is its current value
    lr = [float(schedule(step)) for step in range(0, 101)]
    assert lr[0] == pytest.approx(1e-4)
    assert all(a < b for a, b in zip(lr[:10], lr[1:10]))
    assert lr[9] == pytest.approx(1e-3) and lr[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert lr[55] == pytest.approx(5e-4, rel=1e-3) and lr[100] == pytest.approx(0.0, abs=1e-9)
    restored = tf.keras.optimizers.Adam.from_config(optimizer.get_config(), custom_objects=custom_objects())
    assert float(restored._learning_rate(5)) == pytest.approx(lr[5])
    with pytest.raises(ValueError, match="warmup_steps=200"):
        make_optimizer(learning_rate=1e-3, warmup_steps=200, total_steps=100)


#: The shipped recipes, as config layers and overrides: base.yaml's (the tutorial's VGG16 U-Net, at the
#: 128 px the bundle trains; the locations only so that the train job's config is complete) and
#: local.yaml's from-scratch demo.
RECIPES = {
    "tutorial": ((), ("data.image_size=128", "data.dataset=file:///tmp/pets", "train.output_dir=file:///tmp/run")),
    "local demo": ((LOCAL_CONF,), ()),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_validate_unet_args_accepts_the_recipe_values(recipe):
    """The model section of a shipped recipe, in the form the config stores it (strings for the auto
    flags), passes; the same call with an image size its depth cannot halve evenly is refused, so the
    pass is a decision on these values and not a check that never fails."""
    conf_files, overrides = RECIPES[recipe]
    cfg = config.load(conf_files=conf_files, overrides=overrides, job="train")
    m = cfg.model
    values = dict(image_size=cfg.data.image_size, n_depth=m.n_depth, encoder_weights=m.encoder_weights,
                  freeze_encoder=m.freeze_encoder, encoder_batch_norm=m.encoder_batch_norm, width=m.width,
                  batch_norm_momentum=m.batch_norm_momentum)
    assert validate_unet_args(**values) is None
    odd = values["image_size"] + 1
    with pytest.raises(ValueError, match=f"image_size={odd} is not divisible by 2\\*\\*\\(n_depth-1\\)"):
        validate_unet_args(**{**values, "image_size": odd})


def test_loading_a_model_keeps_tensorflow_start_up_chatter_off_the_console(exported_run):
    """What an inference or evaluation task does in a fresh Python worker, whose stderr is the console on a
    local master: load the model and predict. TensorFlow's start-up lines stay off stderr; other lines do not."""
    code = (
        "import sys, numpy as np; from petseg.model import artifact; "
        "print('before the load', file=sys.stderr, flush=True); "
        f"loaded = artifact.load({str(exported_run)!r}); "
        "loaded.predict_labels(np.zeros((1, 32, 32, 3), np.uint8), batch_size=1); "
        "print('after the load', file=sys.stderr)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**env, "TF_USE_LEGACY_KERAS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    noise = ("oneDNN custom operations", "Could not find cuda drivers", "failed call to cuInit", "absl::InitializeLog",
             "To enable the following instructions")
    assert [n for n in noise if n in done.stderr] == [], done.stderr
    assert "before the load" in done.stderr and "after the load" in done.stderr


def test_inference_mode_scores_the_training_images_as_training_does():
    """After a few epochs, the model in inference mode fits the images it trains on as well as in training.

    BatchNormalization normalises a training batch by its own statistics but an inference batch by
    moving averages: if those lag the weights (a momentum too slow for the steps taken, as with
    Keras's 0.99 over a small dataset's few steps per epoch), validation trails training badly.
    """
    tf.keras.utils.set_random_seed(0)
    x, y = _tiny_pets(64, 32)
    data = tf.data.Dataset.from_tensor_slices((x, y)).map(lambda a, b: (preprocess(a, "unit_scale"), b))
    model = build_unet(image_size=32, n_depth=3, seed=0)
    model.compile(optimizer=make_optimizer(learning_rate=1e-3, warmup_steps=8, total_steps=80),
                  loss=segmentation_loss(), metrics=segmentation_metrics())
    # 5 epochs of 8 steps of batch 8: the first epochs of a from-scratch run on a small set of real
    # photos. Measured: inference mode 0.43 against 0.87 with momentum 0.99, 0.89 with 0.9.
    fitted = model.fit(data.shuffle(64, seed=0).batch(8).repeat(), steps_per_epoch=8, epochs=5, verbose=0).history
    training_mode = fitted["pixel_accuracy"][-1]
    inference_mode = model.evaluate(data.batch(8), verbose=0, return_dict=True)["pixel_accuracy"]
    assert training_mode > 0.6, fitted
    assert inference_mode > training_mode - 0.05, (inference_mode, fitted)
