"""The pipeline where its users run it: spark-submit against a real standalone cluster on 127.0.0.1.

A Master and two Workers (one core each) from pyspark's own bin/spark-class; ingest -> train (two
executors, one barrier task each) -> infer -> evaluate, each a spark-submit of the jobs/ entry points.
Select it with ``-m cluster``.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "tools" / "standalone_cluster.py"
SPARK_SUBMIT = Path(sys.executable).parent / "spark-submit"


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    started = subprocess.run([sys.executable, str(CLUSTER), "start", "--dir", str(state), "--memory", "3g"],
                             capture_output=True, text=True, timeout=240)
    assert started.returncode == 0, started.stderr[-3000:]
    pids = json.loads((state / "cluster.json").read_text())["pids"]
    yield started.stdout.strip().splitlines()[-1], state
    subprocess.run([sys.executable, str(CLUSTER), "stop", "--dir", str(state)], check=True, timeout=120)
    for pid in pids:  # exactly the processes it started are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _submit(master: str, job: str | Path, *args: str, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable, TF_USE_LEGACY_KERAS="1")
    script = job if isinstance(job, Path) else ROOT / "jobs" / f"{job}.py"
    cmd = [str(SPARK_SUBMIT), "--master", master,
           "--conf", "spark.executor.cores=1", "--conf", "spark.executor.memory=1g",
           "--conf", "spark.executorEnv.TF_USE_LEGACY_KERAS=1", "--conf", "spark.ui.showConsoleProgress=false",
           *options, str(script), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, f"{job}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.mark.cluster
@pytest.mark.slow
def test_pipeline_through_spark_submit(standalone, tmp_path):
    master, state = standalone
    assert master.startswith("spark://127.0.0.1:")
    first_app = len(list((state / "worker-0").glob("app-*")))
    # file:// says these folders are shared: the cluster's workers run on this machine. Plain paths are
    # refused under spark-submit, whose master may put executors on other machines.
    pets, run, masks, ev = (f"file://{tmp_path / name}" for name in ("pets", "run", "masks", "eval"))
    ingest = _submit(master, "ingest", "data.source=synthetic", f"data.dataset={pets}", "data.synthetic_count=48",
                     "data.image_size=32", "data.min_row_groups_per_split=2")
    assert "ingest: read 48, written 48, rejected 0" in ingest.stdout
    train = _submit(master, "train", f"data.dataset={pets}", "data.image_size=32", "model.n_depth=2",
                    "model.encoder_weights=none", "train.num_slots=2", "train.epochs=2", "train.batch_size=8",
                    "train.preview_images=2", f"train.output_dir={run}")
    assert "train: 2 epochs on 2 worker(s)" in train.stdout
    # Each Worker daemon ran one executor of the training application with one barrier task, and
    # that task's training process was one of the two TensorFlow workers.
    train_app = sorted((state / "worker-0").glob("app-*"))[first_app + 1].name  # numbered in submission order
    ranks = []
    for worker in ("worker-0", "worker-1"):
        text = "".join(log.read_text() for log in (state / worker / train_app).glob("*/stderr"))
        assert len(set(re.findall(r"BarrierTaskContext: Task (\d+) .* entered the global sync", text))) == 1, worker
        ranks += sorted(set(re.findall(r"\[petseg worker (\d+)\]", text)))
    assert sorted(ranks) == ["0", "1"]
    infer = _submit(master, "infer", f"infer.model={run}", f"infer.input={pets}", f"infer.output={masks}")
    assert "infer: 48 rows, segmented 48, failed 0" in infer.stdout
    evaluate = _submit(master, "evaluate", f"evaluate.model={run}", f"evaluate.dataset={pets}",
                       f"evaluate.output={ev}")
    assert "pixel accuracy" in evaluate.stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["images"] > 0 and 0 <= metrics["metrics"]["pixel_accuracy"] <= 1


WHERE_PYTHON_RUNS = """
import json, sys
from pyspark.sql import SparkSession

def probe(_):
    import petastorm, petseg, pyspark, tensorflow
    yield json.dumps({"python": sys.executable, "petseg": petseg.__file__, "tensorflow": tensorflow.__version__})

spark = SparkSession.builder.getOrCreate()
print("PROBE " + json.dumps(sorted(set(spark.sparkContext.parallelize(range(2), 2).mapPartitions(probe).collect()))))
"""


@pytest.mark.cluster
@pytest.mark.slow
def test_package_builds_a_wheel_and_an_env_archive_the_executors_run(standalone, tmp_path):
    """`make package`, then executors on the standalone cluster run from the unpacked archive."""
    dist = tmp_path / "dist"
    built = subprocess.run(["make", "package", f"DIST={dist}", f"PACK_ENV={tmp_path / 'pack-env'}",
                            f"VENV={Path(sys.executable).parent.parent}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=1200)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    wheels = list(dist.glob("petseg-*-py3-none-any.whl"))
    archive = dist / "petseg-env.tar.gz"
    assert len(wheels) == 1 and archive.stat().st_size > 0
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
        entry_points = wheel.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {"petseg/conf/base.yaml", "petseg/conf/local.yaml", "petseg/cli.py"} <= names
    assert "petseg = petseg.cli:run" in entry_points
    # Each copy of the environment is ~3 GB unpacked: drop the build's own before the cluster unpacks
    # the archive (once in the driver's temp dir, once per executor), and run one executor only.
    shutil.rmtree(tmp_path / "pack-env")
    # --archives env.tar.gz#env with the executors' Python at ./env/bin/python, as on a cluster whose
    # nodes lack the libraries.
    master, state = standalone
    script = tmp_path / "where_python_runs.py"
    script.write_text(WHERE_PYTHON_RUNS)
    apps_before = set(state.glob("worker-*/app-*"))
    try:
        done = _submit(master, script, options=("--archives", f"{archive}#env", "--conf", "spark.cores.max=1",
                                                "--conf", "spark.pyspark.python=./env/bin/python",
                                                "--conf", "spark.pyspark.driver.python=" + sys.executable))
    finally:
        # Standalone workers keep an application's work dirs after it ends; an executor that failed to
        # start is relaunched with a fresh copy each time, so remove them whether or not it ran.
        for app in set(state.glob("worker-*/app-*")) - apps_before:
            shutil.rmtree(app, ignore_errors=True)
    seen = [json.loads(p) for p in json.loads(next(l for l in done.stdout.splitlines() if l.startswith("PROBE "))[6:])]
    assert seen and all(p["python"].endswith("/env/bin/python") for p in seen), seen
    assert all("/env/lib/python3.11/site-packages/petseg/" in p["petseg"] for p in seen), seen
