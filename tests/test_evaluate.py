"""The evaluation job: confusion matrices summed across tasks equal a numpy computation on the same data."""

import json

import numpy as np
import pytest
from conftest import data_config, load_job_config

from petseg.errors import InputError
from petseg.evaluate import Metrics, confusion_matrix, run_evaluate
from petseg.io import publish
from petseg.io.fs import ArrowStorage


def test_metrics_from_a_confusion_matrix():
    true = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    cm = confusion_matrix(true, pred, 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    m = Metrics.from_confusion(cm, ["pet", "background", "border"])
    assert m.pixel_accuracy == pytest.approx(4 / 6)
    assert m.iou == pytest.approx({"pet": 1 / 3, "background": 2 / 3, "border": 1 / 2})
    assert m.mean_iou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    # A class absent from truth and prediction has no IoU and does not drag the mean down.
    assert Metrics.from_confusion(np.diag([5, 5, 0]), ["a", "b", "c"]).iou["c"] is None


def test_job_equals_numpy_on_the_same_data(spark, exported_run, tmp_path):
    from petseg.data.reader import open_split
    from petseg.ingest.convert import run_ingest
    from petseg.model import artifact

    data = data_config(source="synthetic", dataset=str(tmp_path / "pets"), synthetic_count=30, synthetic_seed=8,
                       synthetic_test_fraction=0.5, image_size=32, min_row_groups_per_split=3)
    run_ingest(spark, data=data)
    cfg = load_job_config("evaluate", f"evaluate.model={exported_run}", f"evaluate.dataset={data.dataset}",
                          f"evaluate.output={tmp_path / 'eval'}", "evaluate.batch_size=4", "evaluate.preview_images=3")
    report = run_evaluate(spark, evaluate=cfg.evaluate)
    with open_split(data.dataset, split="test", fields=("image", "mask"), workers_count=1) as reader:
        rows = list(reader)
    labels = artifact.load(str(exported_run)).predict_labels(np.stack([r.image for r in rows]), batch_size=16)
    expected = sum(np.histogram2d(r.mask.ravel(), p.ravel(), bins=3, range=[[0, 3], [0, 3]])[0] for r, p in zip(rows, labels))
    assert report.images == len(rows) and np.array_equal(report.metrics.confusion, expected.astype(int))
    assert report.pixels == len(rows) * 32 * 32
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["metrics"]["confusion"] == report.metrics.confusion and written["model_version"] == "run-under-test"
    assert (tmp_path / "eval" / "predictions.png").read_bytes()[:4] == b"\x89PNG"
    table = report.format()
    assert "mean IoU" in table and "pixel accuracy" in table and "border" in table


def test_job_errors(spark, exported_run, tmp_path):
    cfg = load_job_config("evaluate", f"evaluate.model={exported_run}", f"evaluate.dataset={tmp_path / 'd'}",
                          f"evaluate.output={tmp_path / 'e'}")
    with pytest.raises(InputError, match="has no split=test folder; point it at a dataset written by `petseg ingest`"):
        run_evaluate(spark, evaluate=cfg.evaluate)
    cfg = load_job_config("evaluate", f"evaluate.model={tmp_path / 'nope'}", f"evaluate.dataset={tmp_path / 'd'}",
                          f"evaluate.output={tmp_path / 'e'}")
    with pytest.raises(InputError, match="does not exist"):
        run_evaluate(spark, evaluate=cfg.evaluate)


def test_rows_over_the_pixel_limit_are_counted_not_fatal(spark, exported_run, tmp_path):
    """A labelled split whose images kept their original sizes (PNG), two of them over the limit, and one
    whose mask holds a label the model does not have."""
    import pandas as pd

    from petseg.data import decode, render

    pets = [render.synthetic_pet(i, seed=2, size=size) for i, size in enumerate([(40, 30), (36, 32), (100, 80), (90, 70)])]
    masks = [render.encode_png(decode.resize_mask(p.trimap - 1, 32)) for p in pets]
    frame = pd.DataFrame({"id": [f"p{i}" for i in range(len(pets) + 1)],
                          "image": [render.encode_png(p.image) for p in pets] + [render.encode_png(pets[0].image)],
                          "mask": masks + [render.encode_png(np.full((32, 32), 3, np.uint8))]})
    (tmp_path / "pets" / "split=test").mkdir(parents=True)
    frame.to_parquet(tmp_path / "pets" / "split=test" / "part-0.parquet")
    publish.write_manifest(ArrowStorage(), publish.Staged((tmp_path / "pets").as_uri()), kind="dataset")
    cfg = load_job_config("evaluate", f"evaluate.model={exported_run}", f"evaluate.dataset={tmp_path / 'pets'}",
                          f"evaluate.output={tmp_path / 'eval'}", "data.max_image_pixels=5000")
    report = run_evaluate(spark, evaluate=cfg.evaluate, max_image_pixels=cfg.data.max_image_pixels)
    failed = {"image_too_large": 2, "mask_values_out_of_range": 1}
    assert report.images == 2 and report.failed == failed
    assert report.pixels == 2 * 32 * 32  # only the usable rows are measured
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["failed"] == failed
    assert "failed  image_too_large" in report.format()
    with pytest.raises(InputError, match=r"no row of the test split .* could be evaluated \(failed: \{'image_too_large': 5\}\)"):
        run_evaluate(spark, evaluate=cfg.evaluate, max_image_pixels=1000)
