"""Per-worker tf.data pipelines over a shard of an ingested Petastorm dataset."""

from __future__ import annotations

from typing import TYPE_CHECKING

from petseg.data.reader import SplitReader

if TYPE_CHECKING:
    import tensorflow as tf


def random_flip(image: "tf.Tensor", mask: "tf.Tensor", *, seed: int | None = None) -> tuple["tf.Tensor", "tf.Tensor"]:
    """Flip image and mask left-right together, on one shared random draw (as the TF tutorial does)."""
    import tensorflow as tf

    flip = tf.random.uniform((), seed=seed) > 0.5
    # Width is axis 1 of both an (H, W, 3) image and an (H, W) mask.
    return tf.cond(flip, lambda: (tf.reverse(image, [1]), tf.reverse(mask, [1])), lambda: (image, mask))


def make_dataset(
    reader: SplitReader,
    *,
    batch_size: int,
    preprocessing: str,
    training: bool,
    shuffle_buffer: int = 512,
    seed: int | None = None,
) -> "tf.data.Dataset":
    """Batches of ``(preprocessed float32 image, int32 mask)`` from a Petastorm reader.

    The reader decides what this worker sees (its shard, repeated or not); this adds the per-example
    work: optional shuffle and flip for training, the model's preprocessing, batching, prefetch.
    Batches are full (drop_remainder) so every worker takes the same number of equal steps.
    """
    import tensorflow as tf

    from petseg.data.reader import make_tf_dataset
    from petseg.model.preprocessing import preprocess

    ds = make_tf_dataset(reader)
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed).map(lambda i, m: random_flip(i, m, seed=seed), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda i, m: (preprocess(i, preprocessing), tf.cast(m, tf.int32)), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    # Petastorm already gave this worker its own row groups; TF must not shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)
