"""Per-worker tf.data pipelines over a shard of an ingested Petastorm dataset."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from petseg.data.reader import ArrayReader

if TYPE_CHECKING:
    import tensorflow as tf


def make_dataset(
    reader: ArrayReader,
    *,
    batch_size: int,
    preprocessing: str,
    training: bool,
    shuffle_buffer: int = 512,
    seed: int | None = None,
    augmentation: Mapping[str, Any] | None = None,
) -> "tf.data.Dataset":
    """Batches of ``(preprocessed float32 image, int32 mask)`` from a reader of the worker's shard.

    The reader decides what this worker sees (its shard, repeated or not); this adds the per-example
    work: for training a shuffle and :func:`petseg.train.augment.augment` with ``augmentation`` (its
    keyword arguments, the config's ``train.augment``; None: its defaults, a flip only), the model's preprocessing,
    batching, prefetch. Batches are full (drop_remainder) so every worker takes the same number of
    equal steps.
    """
    import tensorflow as tf

    from petseg.data.reader import make_tf_dataset
    from petseg.model.preprocessing import preprocess
    from petseg.train.augment import augment

    ds = make_tf_dataset(reader)
    if training:
        options = dict(augmentation or {})
        ds = ds.shuffle(shuffle_buffer, seed=seed).map(lambda i, m: augment(i, m, seed=seed, **options),
                                                       num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda i, m: (preprocess(i, preprocessing), tf.cast(m, tf.int32)), num_parallel_calls=tf.data.AUTOTUNE)
    return _batched(ds, batch_size)


def make_validation_dataset(
    reader: ArrayReader, *, batch_size: int, preprocessing: str, steps: int, weight: float
) -> "tf.data.Dataset":
    """Exactly ``steps`` batches of ``(image, mask, weight)`` per iteration: one epoch of the shard, each row once.

    Keras's ``evaluate`` iterates its validation data anew at every epoch and stops after
    ``validation_steps``; with workers whose shards differ in size, any fixed step count over
    endless shards scores some rows twice and others never. Here every iteration reads the
    reader's next epoch (each row with ``weight``) and fills the last batches with blank images of
    weight 0, so all workers take the same ``steps`` and every test row counts exactly once.
    """
    import tensorflow as tf

    from petseg.data.reader import make_tf_dataset
    from petseg.model.preprocessing import preprocess

    padding = steps * batch_size - reader.rows_per_epoch
    if padding < 0:
        raise ValueError(f"steps={steps} x batch_size={batch_size} cannot hold the shard's {reader.rows_per_epoch} rows; "
                         "use at least ceil(rows / batch_size) steps")
    ds = make_tf_dataset(reader, epoch_per_iteration=True).map(lambda i, m: (i, m, tf.constant(weight, tf.float32)))
    if padding:
        blank = (tf.zeros(reader.image_shape, tf.uint8), tf.zeros(reader.mask_shape, tf.uint8),
                 tf.constant(0.0, tf.float32))
        ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding))
    ds = ds.map(lambda i, m, w: (preprocess(i, preprocessing), tf.cast(m, tf.int32), w),
                num_parallel_calls=tf.data.AUTOTUNE)
    return _batched(ds, batch_size)


def _batched(ds: "tf.data.Dataset", batch_size: int) -> "tf.data.Dataset":
    import tensorflow as tf

    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    # The reader already gave this worker its own row groups; TF must not shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)
