"""Inference and evaluation through a real Spark Connect server on Spark 4, from the second environment.

``make spark4-env`` builds .venv-spark4 (pyspark 4.0 with Spark Connect, numpy 2, TensorFlow, no
petastorm), and tools/connect_server.py starts a local Connect server from it, whose Python workers
run that environment. The dataset is ingested and the
classic-mode outputs are computed by this (main, Spark 3.5) environment: what comes back through
Connect must equal them.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, data_config, load_job_config, needs_spark4, run_spark4

from petseg import config
from petseg.data import decode
from petseg.model import registry

pytestmark = needs_spark4


def register(run: Path, *, store: str, name: str, alias: str) -> None:
    """Log ``run`` as training does, as version 1 of ``name`` in the MLflow ``store``, and point ``alias`` at it."""
    import mlflow

    from petseg.model.pyfunc import log_model

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    try:
        with mlflow.start_run() as active:
            log_model(run, run_id=active.info.run_id, registered_model_name=name)
        mlflow.MlflowClient(tracking_uri=store).set_registered_model_alias(name, alias, "1")
    finally:
        mlflow.set_tracking_uri(before)


@pytest.fixture(scope="module")
def connect_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("connect-server")
    started = run_spark4("python", "tools/connect_server.py", "start", "--dir", str(folder), "--master", "local[2]")
    assert started.returncode == 0, started.stderr[-3000:]
    url = started.stdout.strip().splitlines()[-1]
    assert url.startswith("sc://127.0.0.1:")
    pid = json.loads((folder / "server.json").read_text())["pids"][0]
    try:
        yield url
    finally:
        stopped = run_spark4("python", "tools/connect_server.py", "stop", "--dir", str(folder))
        assert stopped.returncode == 0, stopped.stderr[-2000:]
        left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _group(p) == pid]
        assert not left, f"processes of the Connect server's group are left: {[p.name for p in left]}"
        assert not (folder / "server.json").exists()


def _group(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def test_infer_and_evaluate_through_spark_connect_equal_classic_mode(spark, exported_run, tmp_path, connect_url,
                                                                     monkeypatch):
    from petseg.evaluate import run_evaluate
    from petseg.infer.job import run_infer
    from petseg.ingest.convert import run_ingest

    data = data_config(source="synthetic", dataset=str(tmp_path / "pets"), synthetic_count=16, synthetic_seed=8,
                       image_size=32, min_row_groups_per_split=2)
    run_ingest(spark, data=data)
    common = [f"infer.model={exported_run}", f"infer.input={tmp_path / 'pets'}", "infer.model_resolution=true"]
    classic = load_job_config("infer", *common, f"infer.output={tmp_path / 'classic'}")
    run_infer(spark, infer=classic.infer)
    evaluate = [f"evaluate.model={exported_run}", f"evaluate.dataset={tmp_path / 'pets'}", "evaluate.preview_images=2"]
    classic_eval = run_evaluate(spark, evaluate=load_job_config(
        "evaluate", *evaluate, f"evaluate.output={tmp_path / 'classic-eval'}").evaluate)
    inferred = run_spark4("petseg", "infer", f"spark.remote={connect_url}", *common, f"infer.output={tmp_path / 'connect'}")
    assert inferred.returncode == 0, inferred.stderr[-3000:]
    assert "infer: 16 rows, segmented 16, failed 0" in inferred.stdout
    evaluated = run_spark4("petseg", "evaluate", f"spark.remote={connect_url}", *evaluate,
                           f"evaluate.output={tmp_path / 'connect-eval'}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]

    # The same model by its registered alias, as the serverless job names it: pinned to version 1.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file://{tmp_path / 'mlruns'}"
    register(exported_run, store=store, name="petseg-connect", alias="champion")
    by_alias = run_spark4("petseg", "infer", f"spark.remote={connect_url}", *common[1:], "infer.model=models:/petseg-connect@champion",
                          f"mlflow.tracking_uri={store}", f"infer.output={tmp_path / 'connect-alias'}")
    # The client's and the server's workers fetched it into this machine's temporary folder.
    shutil.rmtree(registry.cache_folder(registry.pin("models:/petseg-connect/1", tracking_uri=store)), ignore_errors=True)
    assert by_alias.returncode == 0, by_alias.stderr[-3000:]
    assert "model:  models:/petseg-connect/1 for models:/petseg-connect@champion" in by_alias.stdout

    def rows(folder):
        return {r["id"]: r for r in spark.read.parquet(str(tmp_path / folder)).collect()}

    want = rows("classic")
    for folder, model_uri in [("connect", str(exported_run)), ("connect-alias", "models:/petseg-connect/1")]:
        got = rows(folder)
        assert set(got) == set(want) and len(got) == 16
        for key, row in want.items():
            other = got[key]
            assert other["error"] is None and other["model_version"] == row["model_version"]
            assert other["model_uri"] == (row["model_uri"] if folder == "connect" else model_uri)
            assert (other["height"], other["width"]) == (row["height"], row["width"])
            for column in ("mask_png", "mask_model_png"):
                np.testing.assert_array_equal(decode.decode_label_mask(other[column]),
                                              decode.decode_label_mask(row[column]))
            for name in decode.CLASSES:
                assert other[f"fraction_{name}"] == pytest.approx(row[f"fraction_{name}"])
    metrics = json.loads((tmp_path / "connect-eval" / "metrics.json").read_text())
    assert metrics["images"] == classic_eval.images
    assert metrics["metrics"]["confusion"] == classic_eval.metrics.confusion
    assert (tmp_path / "connect-eval" / "predictions.png").stat().st_size > 0
    # Published atomically through pyarrow on the client: no temporary folder is left beside them.
    assert sorted(p.name for p in tmp_path.iterdir() if "petseg-" in p.name) == []


def test_ingest_and_train_over_spark_connect_fail_at_once_saying_they_need_a_classic_cluster(tmp_path):
    for job in ("ingest", "train", "demo"):
        with pytest.raises(config.ConfigError, match=rf"`petseg {job}` needs a classic \(dedicated\) cluster"):
            config.load(overrides=["spark.remote=sc://127.0.0.1:15002", f"data.dataset={tmp_path / 'pets'}",
                                   f"train.output_dir={tmp_path / 'run'}"], job=job)
    with pytest.raises(config.ConfigError, match="spark.remote='local' .*a Spark Connect URL such as sc://host:15002"):
        config.load(overrides=["spark.remote=local", f"infer.model={tmp_path}", f"infer.input={tmp_path}",
                               f"infer.output={tmp_path / 'o'}"], job="infer")


def test_the_console_script_names_the_classic_cluster_for_ingest_over_connect(tmp_path):
    done = subprocess.run([sys.executable, "-m", "petseg.cli", "ingest", "spark.remote=sc://127.0.0.1:15002",
                           f"data.dataset={tmp_path / 'pets'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("petseg: ingest failed: spark.remote='sc://127.0.0.1:15002'")
