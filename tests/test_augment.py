"""Training augmentation: image and mask move together, the mask keeps exact class ids, colour touches the image only."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from petseg.train.augment import augment  # noqa: E402


def _labelled_example(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A mask of blocks of two classes and an image whose every pixel shows its class as a grey level.

    Two classes, so that a bilinear blend across an edge is nearest to one of the two sides' levels.
    """
    rng = np.random.default_rng(0)
    mask = np.kron(rng.integers(0, 2, (8, 8)), np.ones((size // 8, size // 8))).astype(np.uint8)
    image = np.repeat((mask * 100)[..., None], 3, axis=-1).astype(np.uint8)
    return image, mask


@pytest.mark.parametrize("seed", range(6))
def test_flip_and_zoom_move_image_and_mask_together(seed):
    image, mask = _labelled_example()
    x, y = augment(tf.constant(image), tf.constant(mask), flip=True, max_zoom=2.0, colour=0.0, seed=seed)
    x, y = x.numpy(), y.numpy()
    assert x.shape == image.shape and x.dtype == np.float32
    assert y.shape == mask.shape and y.dtype == np.uint8 and set(np.unique(y)) <= {0, 1, 2}
    # The class nearest to the image's grey level is the mask's, except where bilinear sampling blends
    # across a block edge; and the two line up best as they are, not shifted by a pixel any way.
    shown = np.round(x[..., 0] / 100.0).astype(int)

    def agreement(dy: int, dx: int) -> float:
        return float((np.roll(shown, (dy, dx), (0, 1)) == y)[2:-2, 2:-2].mean())

    aligned = agreement(0, 0)
    shifted = max(agreement(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
    assert aligned > 0.99 and aligned > shifted + 0.01, (aligned, shifted)
    # It zoomed: neither the mask nor its mirror.
    assert not np.array_equal(y, mask) and not np.array_equal(y, mask[:, ::-1])


def test_flip_only_is_an_exact_mirror_or_the_original():
    image, mask = _labelled_example()
    seen = set()
    for seed in range(8):
        x, y = augment(tf.constant(image), tf.constant(mask), flip=True, max_zoom=1.0, colour=0.0, seed=seed)
        mirrored = np.array_equal(y.numpy(), mask[:, ::-1])
        assert mirrored or np.array_equal(y.numpy(), mask)
        assert np.array_equal(x.numpy(), (image[:, ::-1] if mirrored else image).astype(np.float32))
        seen.add(mirrored)
    assert seen == {True, False}


def test_colour_changes_the_image_within_range_and_never_the_mask():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (32, 32), dtype=np.uint8)
    x, y = augment(tf.constant(image), tf.constant(mask), flip=False, max_zoom=1.0, colour=1.0, seed=3)
    assert np.array_equal(y.numpy(), mask)
    assert 0.0 <= x.numpy().min() and x.numpy().max() <= 255.0
    assert np.abs(x.numpy() - image).mean() > 2.0


def test_in_a_tf_data_map_each_example_draws_anew():
    image, mask = _labelled_example(32)
    ds = tf.data.Dataset.from_tensors((image, mask)).repeat(8)
    ds = ds.map(lambda i, m: augment(i, m, flip=True, max_zoom=1.5, colour=0.5, seed=0))
    masks = [y.numpy() for _, y in ds]
    assert len({m.tobytes() for m in masks}) > 4
