"""Inference's CPU cost per photo by stage, and the model's work per image, for sizing a GPU node. Prints JSON.

One process pinned to one core runs each of inference's per-photo steps, as
:func:`petseg.model.segment.segment_stream` does them, over the same synthetic 500x375 JPEGs as
``bench/infer.py``, and times each in CPU seconds (``time.process_time``):

* read: the file's bytes (:func:`petseg.io.fs.read_file`);
* decode: JPEG to RGB at the reduced DCT scale that keeps both sides >= the model's size, EXIF
  orientation applied (:func:`petseg.data.decode.decode_rgb`);
* resize: to the model's size (:func:`petseg.data.decode.resize_image`);
* predict_cpu: the recipe's U-Net (VGG16-BN encoder, n_depth 5, random weights) on one thread,
  batches of ``--batch``, and its argmax, per image;
* upsample: the model-size labels back to the photo's size (:func:`petseg.data.decode.resize_mask`);
  the labels are each photo's true trimap at the model's size, since an untrained model's noisy
  masks upsample alike but encode far slower and larger than a trained model's;
* encode: the mask as PNG and the class fractions (:func:`petseg.model.segment.encode_mask`,
  :func:`~petseg.model.segment.class_fractions`);
* write: the masks of a batch into Parquet with the path (pyarrow, in this process: Spark's own
  write and its Arrow exchange are measured by the whole job's CPU accounting in ``bench/infer.py``).

at 128 and 256 pixels, and counts the model's multiply-adds per image from its convolution layers
(2 FLOPs each). bench/README.md turns these into the CPU cores one GPU needs.

    python bench/stages.py [--photos 200] [--batch 32] [--sizes 128 256]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

from petseg import env

N_DEPTH = 5


def cpu_ms(step: Callable[[], object], *, repeats: int) -> float:
    """CPU milliseconds of one call of ``step``, the best of ``repeats`` (the machine is shared)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        step()
        best = min(best, time.process_time() - start)
    return best * 1000


def conv_flops(model) -> int:
    """FLOPs of one image through ``model``'s convolutions (2 per multiply-add): what a GPU must do."""
    import tensorflow as tf

    total = 0
    for layer in model.layers:
        if isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.Conv2DTranspose)):
            kh, kw, *_ = layer.kernel.shape
            _, height, width, out_channels = layer.output.shape
            in_channels = layer.input.shape[-1]
            if isinstance(layer, tf.keras.layers.Conv2DTranspose):  # each input pixel scatters a kernel
                _, height, width, _ = layer.input.shape
            total += 2 * height * width * kh * kw * in_channels * out_channels
    return int(total)


def stage_costs(photos: list[bytes], trimaps: list, *, size: int, batch: int, repeats: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tensorflow as tf

    from petseg.data.decode import decode_rgb, resize_image, resize_mask
    from petseg.io.fs import read_file
    from petseg.model import build_unet
    from petseg.model.preprocessing import preprocess
    from petseg.model.segment import class_fractions, encode_mask

    n = len(photos)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, data in enumerate(photos):
            files.append(os.path.join(tmp, f"pet_{i:05d}.jpg"))
            Path(files[-1]).write_bytes(data)
        read = cpu_ms(lambda: [read_file(f) for f in files], repeats=repeats) / n
        rgb = [decode_rgb(data, min_side=size) for data in photos]
        decode = cpu_ms(lambda: [decode_rgb(data, min_side=size) for data in photos], repeats=repeats) / n
        images = np.stack([resize_image(image, size) for image in rgb])
        resize = cpu_ms(lambda: [resize_image(image, size) for image in rgb], repeats=repeats) / n
        shapes = [trimap.shape for trimap in trimaps]

        model = build_unet(image_size=size, n_depth=N_DEPTH, encoder_weights="none", encoder_batch_norm=True)
        predict_fn = tf.function(lambda x: tf.argmax(model(x, training=False), axis=-1, output_type=tf.int32))
        inputs = preprocess(images, "unit_scale")
        predict_fn(inputs[:batch])  # trace

        def predict() -> None:
            for first in range(0, n, batch):
                predict_fn(inputs[first:first + batch]).numpy()

        predict_cpu = cpu_ms(predict, repeats=1) / n
        labels = [resize_mask(trimap, size) for trimap in trimaps]
        masks = [resize_mask(label, shape) for label, shape in zip(labels, shapes)]
        upsample = cpu_ms(lambda: [resize_mask(label, shape) for label, shape in zip(labels, shapes)],
                          repeats=repeats) / n
        pngs = [encode_mask(mask) for mask in masks]
        encode = cpu_ms(lambda: [(encode_mask(mask), class_fractions(mask, 3)) for mask in masks], repeats=repeats) / n
        table = pa.table({"path": files, "mask_png": pngs})
        write = cpu_ms(lambda: pq.write_table(table, os.path.join(tmp, "masks.parquet")), repeats=repeats) / n
    costs = {"read": read, "decode": decode, "resize": resize, "predict_cpu": predict_cpu, "upsample": upsample,
             "encode": encode, "write": write}
    around = sum(v for k, v in costs.items() if k != "predict_cpu")
    return {
        "image_size": size,
        "cpu_ms_per_photo": {k: round(v, 3) for k, v in costs.items()},
        "cpu_ms_per_photo_around_the_model": round(around, 3),
        "decode_share_of_around": round((decode + resize) / around, 2),
        "model_gflops_per_image": round(conv_flops(model) / 1e9, 2),
        "mask_png_bytes": round(sum(map(len, pngs)) / n),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--repeats", type=int, default=5, help="best of this many for the cheap stages")
    args = parser.parse_args()
    env.prepare_process_environment(master="local[1]")  # TF_USE_LEGACY_KERAS before TensorFlow
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from petseg.data import render
    from petseg.model.artifact import versions

    pets = [render.synthetic_pet(i, seed=0, size=(500, 375)) for i in range(args.photos)]
    photos = [render.encode_jpeg(pet.image) for pet in pets]
    trimaps = [pet.trimap - 1 for pet in pets]  # trimap values 1..3 as the model's labels 0..2
    print(json.dumps({
        "bench": "stages", "photo_size": "500x375 jpeg", "photos": args.photos, "batch": args.batch, "cores": 1,
        "stack": versions(),
        "sizes": [stage_costs(photos, trimaps, size=size, batch=args.batch, repeats=args.repeats)
                  for size in args.sizes],
    }))


if __name__ == "__main__":
    main()
