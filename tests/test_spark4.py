"""The Spark 4 line, from its own environment: the whole pipeline, and datasets crossing both ways.

.venv-spark4 (make spark4-env) is Databricks Runtime 17.3 LTS ML's stack: Python 3.12, pyspark 4.0 on a
classic session, pyarrow 21, numpy 2, tf-keras, spark-tensorflow-distributor, and no petastorm, which
cannot even be imported there. Each stage runs as a user runs it, the console script in a process of
that environment; what it writes is read back here, on Spark 3.5 with petastorm 0.13.1, and what this
environment's petastorm writes is read there.
"""

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import data_config, load_job_config, needs_spark4, run_spark4

from petseg.data import render
from petseg.data.reader import first_rows, open_split, open_split_arrays, split_stats
from petseg.data.unischema import stored_fields

pytestmark = needs_spark4

#: How both environments ingest the same Oxford-layout photos (:func:`oxford`) at 32x32.
PETS = ("data.source=oxford", "data.image_size=32", "data.min_row_groups_per_split=2")
LOCAL = "spark.master=local[2]"


@pytest.fixture(scope="module")
def oxford(tmp_path_factory) -> Path:
    """32 synthetic pets in the Oxford release's layout, 16 per split: the same JPEG and PNG files for
    both environments, so that their datasets can be compared row by row."""
    root = tmp_path_factory.mktemp("oxford")
    render.write_oxford_layout(root, count=32, seed=5, test_fraction=0.5, size=(64, 48))
    return root


def _ingested_here(spark, oxford: Path, dataset: Path, *, writer: str | None = None):
    from petseg.ingest.convert import run_ingest

    data = data_config(source="oxford", input=str(oxford), dataset=str(dataset), image_size=32,
                       min_row_groups_per_split=2)
    return data.dataset, run_ingest(spark, data=data, writer=writer)


def _ok(done, *expected: str) -> str:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    for line in expected:
        assert line in done.stdout, done.stdout[-3000:]
    return done.stdout


def test_the_environment_is_databricks_spark_4_line_without_petastorm():
    probe = run_spark4("python", "-c", textwrap.dedent("""
        import importlib.util, json, platform, numpy, pyarrow, pyspark, spark_tensorflow_distributor
        print(json.dumps([platform.python_version(), pyspark.__version__, pyarrow.__version__, numpy.__version__,
                          importlib.util.find_spec("petastorm") is None]))
    """))
    python, spark, arrow, numpy_version, no_petastorm = json.loads(_ok(probe))
    assert python.startswith("3.12.") and spark.startswith("4.0.") and numpy_version.startswith("2.")
    assert int(arrow.split(".")[0]) >= 19 and no_petastorm


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, oxford):
    """ingest -> train (two workers under MirroredStrategyRunner) -> infer -> evaluate, each a `petseg`
    command of the Spark 4 environment on classic local[2]; the folder and each command's output."""
    root = tmp_path_factory.mktemp("spark4")
    pets, run = root / "pets", root / "run"
    out = {"root": root, "oxford": oxford}
    out["ingest"] = _ok(run_spark4("petseg", "ingest", LOCAL, *PETS, f"data.input={oxford}", f"data.dataset={pets}"),
                        "ingest: read 32, written 32, rejected 0",
                        "writer:  petseg's own (Petastorm's format, petastorm not used)")
    out["train"] = _ok(run_spark4("petseg", "train", LOCAL, f"data.dataset={pets}", "model.n_depth=2",
                                  "model.encoder_weights=none", "train.num_slots=2", "train.epochs=2",
                                  "train.batch_size=8", "train.preview_images=2", f"train.output_dir={run}"),
                       "train: 2 epochs on 2 worker(s)")
    out["infer"] = _ok(run_spark4("petseg", "infer", LOCAL, f"infer.model={run}", f"infer.input={pets}",
                                  f"infer.output={root / 'masks'}"),
                       "infer: 32 rows, segmented 32, failed 0")
    out["evaluate"] = _ok(run_spark4("petseg", "evaluate", LOCAL, f"evaluate.model={run}", f"evaluate.dataset={pets}",
                                     f"evaluate.output={root / 'eval'}"),
                          "pixel accuracy")
    return out


def test_the_whole_pipeline_runs_on_spark_4(pipeline):
    root = pipeline["root"]
    metadata = json.loads((root / "run" / "petseg-model.json").read_text())
    assert metadata["training"]["workers"] == 2 and metadata["image_size"] == 32
    assert (root / "run" / "predictions.png").stat().st_size > 0
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 16 and np.sum(metrics["metrics"]["confusion"]) == 16 * 32 * 32


def test_a_dataset_written_on_spark_4_reads_here_with_petastorm_and_equals_this_stacks(spark, pipeline, tmp_path):
    """petastorm 0.13.1's make_reader and petseg's readers read it; its rows are the ones petastorm's own
    writer gives here for the same photos."""
    theirs = (pipeline["root"] / "pets").as_uri()
    ours, _ = _ingested_here(spark, pipeline["oxford"], tmp_path / "pets", writer="petastorm")
    stats = split_stats(theirs)
    assert stats == split_stats(ours) and {split: rows for split, (rows, _) in stats.items()} == {"train": 16, "test": 16}
    assert stored_fields(theirs) == stored_fields(ours)

    def rows(url: str, split: str) -> dict:
        with open_split(url, split=split, fields=("id", "image", "mask", "height", "width"), workers_count=1) as reader:
            return {r.id: r for r in reader}

    for split in ("train", "test"):
        got, want = rows(theirs, split), rows(ours, split)
        assert got.keys() == want.keys()
        for key, row in want.items():
            np.testing.assert_array_equal(got[key].image, row.image)
            np.testing.assert_array_equal(got[key].mask, row.mask)
            assert (got[key].height, got[key].width) == (row.height, row.width)
    with open_split_arrays(theirs, split="train", shard=1, shard_count=2) as reader:
        assert sum(len(images) for images, _ in reader) == reader.rows_per_epoch > 0
    assert first_rows(theirs, split="test", count=2)[1].shape == (2, 32, 32, 3)
    # The model trained there, evaluated here on the dataset ingested there: Spark 4's figures.
    from petseg.evaluate import run_evaluate

    run = pipeline["root"] / "run"
    here = run_evaluate(spark, evaluate=load_job_config("evaluate", f"evaluate.model={run}", f"evaluate.dataset={theirs}",
                                                        f"evaluate.output={tmp_path / 'eval'}").evaluate)
    there = json.loads((pipeline["root"] / "eval" / "metrics.json").read_text())
    assert here.images == there["images"] and here.metrics.confusion == there["metrics"]["confusion"]


def test_a_dataset_petastorm_wrote_here_trains_and_evaluates_on_spark_4(spark, oxford, tmp_path):
    dataset, report = _ingested_here(spark, oxford, tmp_path / "pets")
    assert report.writer == "petastorm"
    read = run_spark4("python", "-c", textwrap.dedent(f"""
        import json
        from petseg.data.reader import first_rows, open_split_arrays
        from petseg.train.launch import stored_image_size
        with open_split_arrays({dataset!r}, split="train") as reader:
            rows = sum(len(images) for images, _ in reader)
        ids, images, masks = first_rows({dataset!r}, split="test", count=3)
        print(json.dumps([stored_image_size({dataset!r}), rows, list(images.shape), list(masks.shape)]))
    """))
    assert json.loads(_ok(read).splitlines()[-1]) == [32, 16, [3, 32, 32, 3], [3, 32, 32]]
    run = tmp_path / "run"
    _ok(run_spark4("petseg", "train", LOCAL, f"data.dataset={dataset}", "model.n_depth=2",
                   "model.encoder_weights=none", "train.local_mode=true", "train.epochs=1", "train.batch_size=8",
                   "train.preview_images=0", f"train.output_dir={run}"),
        "train: 1 epochs on 1 worker(s)")
    _ok(run_spark4("petseg", "evaluate", LOCAL, f"evaluate.model={run}", f"evaluate.dataset={dataset}",
                   f"evaluate.output={tmp_path / 'eval'}"), "pixel accuracy")
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["images"] == 16


def test_the_demo_runs_on_spark_4(tmp_path: Path):
    _ok(run_spark4("petseg", "demo", LOCAL, f"data.dataset={tmp_path / 'pets'}", "data.synthetic_count=12",
                   "train.epochs=1", f"train.output_dir={tmp_path / 'run'}", f"infer.output={tmp_path / 'masks'}",
                   f"evaluate.output={tmp_path / 'eval'}"),
        "ingest: read 12, written 12, rejected 0", "infer: 12 rows, segmented 12, failed 0", "mean IoU")
