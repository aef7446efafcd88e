"""The training job: config checks, executors through the runner, progress, resume, two workers."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from petseg import config
from petseg.config import ConfigError
from petseg.data.reader import row_groups_per_split
from petseg.ingest.convert import run_ingest
from petseg.model import artifact
from petseg.train import TrainError, run_train

TINY = ["data.image_size=32", "model.n_depth=2", "model.encoder_weights=none", "train.batch_size=8",
        "train.epochs=2", "train.preview_images=2", "train.learning_rate=0.002"]


def train_config(tmp_path: Path, dataset: str, *extra: str) -> config.Config:
    return config.load(overrides=[f"data.dataset={dataset}", f"train.output_dir={tmp_path / 'run'}", *TINY, *extra],
                       job="train")


@pytest.fixture(scope="module")
def tiny_dataset(spark, tmp_path_factory):
    out = tmp_path_factory.mktemp("train-data") / "pets"
    data = config.load(overrides=["data.source=synthetic", f"data.dataset={out}", "data.synthetic_count=40",
                                  "data.image_size=32", "data.min_row_groups_per_split=2"]).data
    run_ingest(spark, data=data)
    return data.dataset


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.batch_size=9", r"train.batch_size=9 is not allowed; use a multiple of the 2 worker"),
        ("model.n_depth=4", r"image_size.*32.*n_depth=4|divisible"),
        ("model.n_depth=6", r"n_depth"),
        ("model.encoder_weights=/no/such/weights.h5", r"does not exist"),
        ("train.stop_after_epoch=5", r"train.stop_after_epoch=5 is not allowed"),
    ],
)
def test_bad_training_config_fails_before_spark(tmp_path, override, message):
    overrides = [f"data.dataset={tmp_path}", f"train.output_dir={tmp_path}", "data.image_size=36", *TINY[1:], override]
    if override.startswith("model.n_depth=4"):
        overrides = [o for o in overrides if not o.startswith("data.image_size")] + ["data.image_size=36"]
    with pytest.raises(ConfigError, match=message):
        config.load(overrides=overrides, job="train")


def test_train_on_executors_streams_progress_and_writes_outputs(spark, tiny_dataset, tmp_path):
    cfg = train_config(tmp_path, tiny_dataset, "train.num_slots=1")
    result = run_train(spark, cfg=cfg)
    assert result.workers == 1 and [h["epoch"] for h in result.history] == [1, 2]
    assert {"loss", "val_pixel_accuracy", "val_mean_iou", "val_iou_pet", "val_iou_background", "val_iou_border"} <= set(
        result.history[-1]
    )
    messages = [r["message"] for r in result.progress]
    assert any(m.startswith("epoch 1/2 ") for m in messages) and any(m.startswith("epoch 2/2 ") for m in messages)
    run = tmp_path / "run"
    meta = artifact.resolve(str(run)).metadata
    assert meta["image_size"] == 32 and meta["classes"] == ["pet", "background", "border"]
    assert meta["preprocessing"] == "unit_scale" and meta["n_depth"] == 2
    assert meta["versions"]["tensorflow"].startswith("2.21")
    assert json.loads((run / "history.json").read_text()) == result.history
    for png in ("curves.png", "predictions.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    assert (run / "model" / "saved_model.pb").exists()


def test_stop_and_resume_continues_at_the_next_epoch(spark, tiny_dataset, tmp_path):
    first = train_config(tmp_path, tiny_dataset, "train.local_mode=true", "train.stop_after_epoch=1")
    with pytest.raises(RuntimeError, match="stopped after epoch 1 as configured"):
        run_train(spark, cfg=first)
    assert [json.loads(l)["epoch"] for l in (tmp_path / "run" / "history.jsonl").read_text().splitlines()] == [1]
    assert not (tmp_path / "run" / "model").exists()
    resumed = run_train(spark, cfg=train_config(tmp_path, tiny_dataset, "train.local_mode=true"))
    messages = [r["message"] for r in resumed.progress]
    assert "resuming from the backup at epoch 2" in messages
    assert not any(m.startswith("epoch 1/2") for m in messages)  # epoch 1 was not trained again
    assert [h["epoch"] for h in resumed.history] == [1, 2]


#: Start-up chatter that must not reach a job's console: TensorFlow's C++ lines, petastorm's pyarrow
#: warnings and prints, and the raw progress lines the driver already logs formatted.
NOISE = ("oneDNN custom operations", "Could not find cuda drivers", "failed call to cuInit",
         "absl::InitializeLog", "FutureWarning", "Cache cleanup complete", "petseg-progress")


def test_the_train_job_prints_each_epoch_once_no_noise_and_its_failure_last(tiny_dataset, tmp_path):
    """The console script on local[2], as a person runs it: the worker fails on purpose after epoch 1.

    On a local master the executors' output is the driver's console, so everything a worker
    prints, and everything the driver logs, lands in this process's stdout and stderr.
    """
    cmd = [sys.executable, "-m", "petseg.cli", "train", "spark.master=local[2]", f"data.dataset={tiny_dataset}",
           f"train.output_dir={tmp_path / 'run'}", *TINY, "train.num_slots=1", "train.stop_after_epoch=1"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYSPARK_PYTHON", "TF_CPP_MIN_LOG_LEVEL")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    console = done.stdout + done.stderr
    assert done.returncode == 1, console[-4000:]
    assert len(re.findall(r"epoch 1/2 loss=", console)) == 1, console[-4000:]
    assert "worker 1/1 reads 32 of 32 train rows" in console
    assert [noise for noise in NOISE if noise in console] == []
    assert "Traceback" in done.stderr and "StoppedAfterEpoch" in done.stderr  # the worker's error is shown
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("petseg: train failed: ") and "stopped after epoch 1 as configured" in last, last


def test_too_few_row_groups_and_missing_gpu_confs_fail_with_the_fix(spark, tiny_dataset, tmp_path):
    fewest = min(row_groups_per_split(tiny_dataset).values())
    workers = fewest + 1
    with pytest.raises(TrainError, match=rf"has {fewest} row group\(s\) but training uses {workers} workers.*"
                                         rf"min_row_groups_per_split>={workers}"):
        run_train(spark, cfg=train_config(tmp_path, tiny_dataset, f"train.num_slots={workers}",
                                          f"train.batch_size={8 * workers}"))
    with pytest.raises(TrainError, match=r"spark.executor.resource.gpu.amount, spark.task.resource.gpu.amount"):
        run_train(spark, cfg=train_config(tmp_path, tiny_dataset, "train.num_slots=1", "train.use_gpu=true"))
    with pytest.raises(TrainError, match="run `petseg ingest` first"):
        run_train(spark, cfg=train_config(tmp_path, str(tmp_path / "nothing"), "train.num_slots=1"))


TWO_WORKERS = textwrap.dedent(
    """
    import json, sys
    from petseg import config
    from petseg.session import get_or_create
    from petseg.train import run_train
    cfg = config.parse_job_arguments(sys.argv[1:], job="train")
    result = run_train(get_or_create(cfg.spark), cfg=cfg)
    print("RESULT " + json.dumps({"workers": result.workers, "progress": result.progress, "history": result.history}))
    """
)


FAKE_GPU_DISCOVERY = '#!/usr/bin/env bash\necho \'{"name": "gpu", "addresses": ["0", "1"]}\'\n'


@pytest.mark.slow
@pytest.mark.parametrize("use_gpu", [False, True], ids=["cpu", "gpu-scheduling"])
def test_two_workers_on_two_executor_processes(tiny_dataset, tmp_path, use_gpu):
    """local-cluster[2,1,2048]: two executor JVMs, one barrier task each, MultiWorkerMirroredStrategy.

    With use_gpu, Spark's GPU scheduling is real (a discovery script reports two fake GPUs per
    worker, each task gets one); TensorFlow then finds no CUDA device and trains on the CPU.
    """
    args = [f"data.dataset={tiny_dataset}", f"train.output_dir={tmp_path / 'run'}", *TINY, "train.num_slots=2",
            "spark.master=local-cluster[2,1,2048]", "train.epochs=1", f"train.use_gpu={str(use_gpu).lower()}"]
    if use_gpu:
        script = tmp_path / "fake_gpus.sh"
        script.write_text(FAKE_GPU_DISCOVERY)
        script.chmod(0o755)
        gpu_conf = tmp_path / "gpu.yaml"
        gpu_conf.write_text(
            "spark:\n  conf:\n"
            "    spark.worker.resource.gpu.amount: '1'\n"
            f"    spark.worker.resource.gpu.discoveryScript: {script}\n"
            f"    spark.executor.resource.gpu.discoveryScript: {script}\n"
            "    spark.executor.resource.gpu.amount: '1'\n"
            "    spark.task.resource.gpu.amount: '1'\n"
        )
        args += ["--conf", str(gpu_conf)]
    env = {k: v for k, v in os.environ.items() if k != "PYSPARK_PYTHON"}
    done = subprocess.run([sys.executable, "-c", TWO_WORKERS, *args], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    assert result["workers"] == 2 and len(result["history"]) == 1
    shards = {r["rank"]: set(r["shard_ids"]) for r in result["progress"] if "shard_ids" in r}
    devices = {r["rank"]: r["cuda_visible_devices"] for r in result["progress"] if "shard_ids" in r}
    assert devices == ({0: "0", 1: "0"} if use_gpu else {0: "", 1: ""})  # the runner's assignment per task
    assert set(shards) == {0, 1}
    assert shards[0] and shards[1] and not shards[0] & shards[1]  # each worker reads its own rows
    assert len(shards[0] | shards[1]) == 32  # and together they cover the train split
    saved = list((tmp_path / "run").rglob("saved_model.pb"))
    assert saved == [tmp_path / "run" / "model" / "saved_model.pb"]  # exactly one exported model


def test_mixed_precision_and_xla_options_train(spark, tiny_dataset, tmp_path):
    cfg = train_config(tmp_path, tiny_dataset, "train.local_mode=true", "train.epochs=1", "train.preview_images=0",
                       "model.mixed_precision=mixed_bfloat16", "model.jit_compile=true")
    result = run_train(spark, cfg=cfg)
    assert result.history[0]["loss"] > 0 and "val_pixel_accuracy" in result.final_metrics
    meta = artifact.resolve(str(tmp_path / "run")).metadata
    assert meta["training"]["model"]["mixed_precision"] == "mixed_bfloat16"


@pytest.mark.slow
def test_demo_learns(tmp_path):
    """The README's demo (conf/local.yaml) end to end: it must visibly learn, border class included."""
    env = {k: v for k, v in os.environ.items() if k != "PYSPARK_PYTHON"}
    cmd = [sys.executable, "-m", "petseg.cli", "demo", f"data.dataset={tmp_path / 'pets'}",
           f"train.output_dir={tmp_path / 'run'}", f"infer.output={tmp_path / 'masks'}",
           f"evaluate.output={tmp_path / 'eval'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    console = done.stdout + done.stderr  # executors' output included: the master is local
    assert [len(re.findall(rf"epoch {e}/20 loss=", console)) for e in range(1, 21)] == [1] * 20
    assert [noise for noise in NOISE if noise in console] == []
    final = json.loads((tmp_path / "run" / "history.json").read_text())[-1]
    assert final["val_pixel_accuracy"] >= 0.90, final
    assert min(final["val_iou_pet"], final["val_iou_background"], final["val_iou_border"]) > 0, final
    assert "train: 20 epochs on 2 worker(s)" in done.stdout
    assert "infer: 400 rows, segmented 400, failed 0" in done.stdout
    # The evaluation job measures the exported model over the whole test split, as training's
    # last validation pass did (on the same pixels, so the two agree closely).
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert abs(metrics["pixel_accuracy"] - final["val_pixel_accuracy"]) < 0.02, (metrics, final)
    assert "pixel accuracy" in done.stdout and (tmp_path / "eval" / "predictions.png").exists()


def test_mlflow_tracks_training_and_the_inference_that_uses_it(spark, tiny_dataset, tmp_path, monkeypatch):
    import mlflow

    from petseg.infer.job import run_infer

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps local file stores behind this switch
    tracking = [f"mlflow.tracking_uri=file://{tmp_path / 'mlruns'}", "mlflow.enabled=true", "mlflow.experiment=petseg-test"]
    result = run_train(spark, cfg=train_config(tmp_path, tiny_dataset, "train.local_mode=true", *tracking))
    model = artifact.resolve(str(tmp_path / "run"))
    client = mlflow.MlflowClient(tracking_uri=f"file://{tmp_path / 'mlruns'}")
    run = client.get_run(model.mlflow_run_id)  # the model's metadata names its run
    assert run.info.status == "FINISHED"
    assert run.data.params["model.n_depth"] == "2" and run.data.params["train.epochs"] == "2"
    history = client.get_metric_history(run.info.run_id, "val_pixel_accuracy")
    assert [m.step for m in history] == [1, 2]  # per epoch
    assert history[-1].value == pytest.approx(result.final_metrics["val_pixel_accuracy"])
    assert {"model", "petseg-model.json", "history.json", "curves.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "model/saved_model.pb" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    # The inference job records which model version it used.
    infer_cfg = config.load(overrides=[f"infer.model={tmp_path / 'run'}", f"infer.input={tiny_dataset}", "infer.limit=4",
                                       f"infer.output={tmp_path / 'masks'}", *tracking], job="infer")
    run_infer(spark, infer=infer_cfg.infer, tracking=infer_cfg.mlflow)
    [infer_run] = client.search_runs([run.info.experiment_id], "tags.`petseg.job` = 'infer'")
    assert infer_run.data.params["model_version"] == model.version
    assert infer_run.data.params["model_mlflow_run_id"] == run.info.run_id
    assert infer_run.data.metrics["segmented"] == 4
