"""The evaluation job: confusion matrices summed across tasks equal a numpy computation on the same data."""

import json

import numpy as np
import pytest
from conftest import data_config, load_job_config

from petseg.errors import InputError
from petseg.evaluate import Metrics, confusion_matrix, run_evaluate


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
    cfg = load_job_config("evaluate", f"evaluate.model={exported_run}", f"evaluate.dataset={tmp_path}",
                          f"evaluate.output={tmp_path / 'e'}")
    with pytest.raises(InputError, match="has no split=test folder; point it at a dataset written by `petseg ingest`"):
        run_evaluate(spark, evaluate=cfg.evaluate)
    cfg = load_job_config("evaluate", f"evaluate.model={tmp_path / 'nope'}", f"evaluate.dataset={tmp_path}",
                          f"evaluate.output={tmp_path / 'e'}")
    with pytest.raises(InputError, match="does not exist"):
        run_evaluate(spark, evaluate=cfg.evaluate)
