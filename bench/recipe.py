"""A training recipe on real photos: petseg's ingest, train (through the runner) and evaluate. Prints JSON.

Synthetic pets are far easier than real ones, so a from-scratch recipe is chosen on real photos in
the Oxford-IIIT layout (images/, annotations/trimaps/, trainval.txt, test.txt), e.g. a development
set kept outside the repository. Everything runs as `petseg ingest/train/evaluate` would: the oxford
source, MirroredStrategyRunner on local cores, the evaluation job on the exported model. It prints
the settings, the minutes each stage took, every epoch's training and validation figures, and the
evaluation's; the run folder (curves.png, predictions.png) stays in --out to be looked at.

    python bench/recipe.py --data DIR [--out build/bench-recipe] [--workers 1] [key=value ...]
    python bench/recipe.py --data DIR train.epochs=12 train.batch_size=8 model.n_depth=5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from petseg import config

#: The per-epoch figures reported: how well it fits (pixel_accuracy) and how well it generalises.
FIGURES = ("loss", "pixel_accuracy", "val_loss", "val_pixel_accuracy", "val_mean_iou",
           "val_iou_pet", "val_iou_background", "val_iou_border", "seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="an Oxford-IIIT layout folder of real photos")
    parser.add_argument("--out", default="build/bench-recipe", help="dataset, run and evaluation folders")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="training workers (train.num_slots)")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. train.epochs=12")
    args = parser.parse_args()

    out = Path(args.out).resolve()
    cfg = config.load(overrides=[
        f"spark.master=local[{args.cores}]",
        "data.source=oxford", f"data.input={Path(args.data).resolve()}", f"data.dataset={out / 'pets'}",
        "data.image_size=128", "model.encoder_weights=none", f"train.num_slots={args.workers}",
        f"train.output_dir={out / 'run'}", f"evaluate.model={out / 'run'}", f"evaluate.dataset={out / 'pets'}",
        f"evaluate.output={out / 'eval'}", f"infer.input={out / 'pets'}", f"infer.output={out / 'masks'}",
        *args.overrides,
    ], job="demo")
    from petseg.evaluate import run_evaluate
    from petseg.ingest import run_ingest
    from petseg.session import get_or_create
    from petseg.train import run_train

    spark = get_or_create(**config.to_dict(cfg.spark))
    spark.sparkContext.setLogLevel("ERROR")
    minutes = {}
    start = time.perf_counter()
    ingest = run_ingest(spark, data=cfg.data)
    minutes["ingest"] = (time.perf_counter() - start) / 60
    start = time.perf_counter()
    trained = run_train(spark, data=cfg.data, model=cfg.model, train=cfg.train, tracking=cfg.mlflow)
    minutes["train"] = (time.perf_counter() - start) / 60
    start = time.perf_counter()
    evaluation = run_evaluate(spark, evaluate=cfg.evaluate, max_image_pixels=cfg.data.max_image_pixels)
    minutes["evaluate"] = (time.perf_counter() - start) / 60
    spark.stop()

    metrics = evaluation.metrics
    print(json.dumps({
        "bench": "recipe",
        "data": str(Path(args.data).resolve()),
        "written": dict(ingest.written),
        "settings": {"model": config.to_dict(cfg.model), "train": config.to_dict(cfg.train),
                     "image_size": cfg.data.image_size, "workers": trained.workers},
        "minutes": {k: round(v, 2) for k, v in minutes.items()},
        "epochs": [{"epoch": h["epoch"], **{k: h[k] for k in FIGURES if k in h}} for h in trained.history],
        "evaluate": {"images": evaluation.images, "pixel_accuracy": round(metrics.pixel_accuracy, 4),
                     "mean_iou": round(metrics.mean_iou, 4),
                     "iou": {k: None if v is None else round(v, 4) for k, v in metrics.iou.items()}},
        "run": trained.model_dir.rsplit("/", 1)[0],
    }))


if __name__ == "__main__":
    main()
