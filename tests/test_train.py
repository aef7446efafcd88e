"""The training job: config checks, executors through the runner, progress, resume, two workers."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import load_job_config, synthetic_dataset

from petseg import config
from petseg.config import ConfigError
from petseg.data.reader import row_groups_per_split, rows_per_shard
from petseg.errors import InputError
from petseg.evaluate import run_evaluate
from petseg.model import artifact
from petseg.train import TrainError, TrainStopped, run_train

TINY = ["data.image_size=32", "model.n_depth=2", "model.encoder_weights=none", "train.batch_size=8",
        "train.epochs=2", "train.preview_images=2", "train.learning_rate=0.002"]


def train_config(tmp_path: Path, dataset: str, *extra: str) -> config.Config:
    return config.load(overrides=[f"data.dataset={dataset}", f"train.output_dir={tmp_path / 'run'}", *TINY, *extra],
                       job="train")


def sections(cfg: config.Config) -> dict:
    """What run_train takes of a whole config: its data, model, train and mlflow sections."""
    return {"data": cfg.data, "model": cfg.model, "train": cfg.train, "tracking": cfg.mlflow}


@pytest.fixture(scope="module")
def tiny_dataset(spark, tmp_path_factory):
    return synthetic_dataset(spark, tmp_path_factory.mktemp("train-data"), synthetic_count=40, image_size=32,
                             min_row_groups_per_split=2)


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
    overrides = [f"data.dataset={tmp_path}/pets", f"train.output_dir={tmp_path}/run", "data.image_size=36", *TINY[1:], override]
    if override.startswith("model.n_depth=4"):
        overrides = [o for o in overrides if not o.startswith("data.image_size")] + ["data.image_size=36"]
    with pytest.raises(ConfigError, match=message):
        config.load(overrides=overrides, job="train")


def _job_file(tmp_path: Path) -> tuple[config.Config, dict]:
    """A config and the job file its training's workers would read, through JSON as they read it."""
    from petseg.train.launch import TrainingSections, training_spec

    cfg = train_config(tmp_path, str(tmp_path / "pets"))
    sent = TrainingSections(data=cfg.data, model=cfg.model, train=cfg.train)
    spec = training_spec(sent, stats={"train": (10, 2), "test": (4, 2)})
    return cfg, json.loads(json.dumps({**spec, "rank": 0, "workers": 1, "work_dir": str(tmp_path / "work")}))


def test_the_worker_types_its_job_files_sections_again(tmp_path):
    from petseg.train.loop import job_sections

    cfg, spec = _job_file(tmp_path)
    assert set(spec["config"]) == {"data", "model", "train"}
    data, model, train = job_sections(spec)
    assert (data, model, train) == (cfg.data, cfg.model, cfg.train)
    assert model.mixed_precision is config.Precision.float32 and train.augment == cfg.train.augment


@pytest.mark.parametrize(
    "section,change,message",
    [
        ("model", {"dice_wieght": 2.0}, r"unknown config key 'model.dice_wieght' \(set to 2.0\) \(did you mean "
                                        r"'dice_weight'\?\): ModelConfig has only n_depth, "),
        ("train", {"augment": {"flip": True, "max_zoom": 1.0, "colour": 0.0, "hue": 0.1}},
         r"unknown config key 'train.augment.hue' \(set to 0.1\): AugmentConfig has only flip, max_zoom, colour"),
        ("train", {"epochs": "two"}, r"bad value for config key 'train.epochs': Value 'two'"),
        ("data", {"source": "kaggle"}, r"bad value for config key 'data.source': Invalid value 'kaggle'"),
    ],
)
def test_a_job_file_this_petseg_cannot_type_fails_the_worker_before_tensorflow_starts(tmp_path, section, change,
                                                                                     message):
    cfg, spec = _job_file(tmp_path)
    spec["config"][section].update(change)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({**spec, "result_file": str(tmp_path / "result.json")}))
    code = ("import sys\nfrom petseg.errors import ConfigError\nfrom petseg.train.loop import main\n"
            f"try:\n    main({str(job)!r})\nexcept ConfigError as exc:\n"
            "    print('tensorflow' in sys.modules, exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    started_tensorflow, _, error = done.stdout.strip().partition(" ")
    assert started_tensorflow == "False" and re.search(message, error), error
    assert "install the same petseg version" in error and not (tmp_path / "result.json").exists()


def test_train_on_executors_streams_progress_and_writes_outputs(spark, tiny_dataset, tmp_path):
    cfg = train_config(tmp_path, tiny_dataset, "train.num_slots=1")
    result = run_train(spark, **sections(cfg))
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


def history_records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]


def epochs_recorded(folder: Path) -> list[int]:
    return [record["epoch"] for record in history_records(folder)]


def test_stop_and_resume_continues_at_the_next_epoch_and_a_failed_save_keeps_the_backup(spark, tiny_dataset, tmp_path):
    first = train_config(tmp_path, tiny_dataset, "train.local_mode=true", "train.stop_after_epoch=1")
    with pytest.raises(TrainStopped, match="stopped after epoch 1 as configured.*re-run without train.stop_after_epoch"):
        run_train(spark, **sections(first))
    partial = tmp_path / "run.petseg-partial"
    assert epochs_recorded(partial) == [1] and not (tmp_path / "run").exists()  # nothing published yet
    epoch_1 = history_records(partial)[0]
    # The resumed run trains epoch 2 and saves the model, then cannot write its outputs: a folder
    # stands where history.json goes, as an unwritable target would.
    (partial / "history.json").mkdir()
    resume = train_config(tmp_path, tiny_dataset, "train.local_mode=true")
    with pytest.raises(RuntimeError, match=r"training worker 0 of 1 failed \(exit code 1\): IsADirectoryError"):
        run_train(spark, **sections(resume))
    trained = history_records(partial)
    assert trained[0] == epoch_1 and [h["epoch"] for h in trained] == [1, 2]  # epoch 1 was not trained again
    assert latest_backup(partial), "the backup was deleted before the run's outputs were written"
    # The next attempt (a re-run, or a restart: the same resume) trains no epoch again: it saves.
    (partial / "history.json").rmdir()
    resumed = run_train(spark, **sections(resume))
    messages = [r["message"] for r in resumed.progress]
    assert "resuming from the backup: all 2 epochs are trained" in messages, messages
    assert not any(m.startswith("epoch ") for m in messages), messages
    assert resumed.note.startswith("resuming the unfinished run") and resumed.history == trained
    assert epochs_recorded(tmp_path / "run") == [1, 2] and not (tmp_path / "run" / "backup").exists()
    assert not partial.exists() and artifact.resolve(str(tmp_path / "run")).version == resumed.run_id


def test_a_rerun_into_the_same_folder_reports_only_its_own_epochs(spark, tiny_dataset, tmp_path):
    """A shorter run after a longer one into one folder (every scheduled Databricks run) is its own run."""
    longer = run_train(spark, **sections(train_config(tmp_path, tiny_dataset, "train.local_mode=true")))
    assert [h["epoch"] for h in longer.history] == [1, 2]
    # Stopped, then re-run with another config: the unfinished run is discarded, not resumed.
    with pytest.raises(TrainStopped):
        run_train(spark, **sections(train_config(tmp_path, tiny_dataset, "train.local_mode=true", "train.epochs=3",
                                                 "train.stop_after_epoch=1")))
    assert artifact.resolve(str(tmp_path / "run")).version == longer.run_id  # the finished run is untouched
    shorter = run_train(spark, **sections(train_config(tmp_path, tiny_dataset, "train.local_mode=true",
                                                       "train.epochs=1")))
    assert shorter.note.startswith("discarded the unfinished run") and "train.epochs: 3 -> 1" in shorter.note
    assert [h["epoch"] for h in shorter.history] == [1]
    run = tmp_path / "run"
    meta = artifact.resolve(str(run)).metadata
    assert meta["run_id"] == shorter.run_id != longer.run_id
    assert meta["final_metrics"] == shorter.history[-1] == json.loads((run / "history.json").read_text())[-1]
    assert epochs_recorded(run) == [1] and not (tmp_path / "run.petseg-partial").exists()
    # A folder that is not a petseg run is never replaced.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    cfg = config.load(overrides=[f"data.dataset={tiny_dataset}", f"train.output_dir={tmp_path / 'mine'}", *TINY,
                                 "train.local_mode=true"], job="train")
    with pytest.raises(InputError, match="is not a folder petseg wrote as a run .*point train.output_dir at a new or empty folder"):
        run_train(spark, **sections(cfg))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # A second run into a folder another run is training into waits for it, rather than share its backup.
    (tmp_path / "run.petseg-lock").write_text(json.dumps({"host": "h", "pid": 1, "id": "x", "refreshed": time.time()}))
    cfg = config.load(overrides=[f"data.dataset={tiny_dataset}", f"train.output_dir={tmp_path / 'run'}", *TINY,
                                 "train.local_mode=true"], job="train")
    with pytest.raises(InputError, match=r"train.output_dir=.*run' is being written by another job"):
        run_train(spark, **sections(cfg))
    assert not (tmp_path / "run.petseg-partial").exists()


@pytest.fixture(scope="module")
def uneven_dataset(spark, tmp_path_factory):
    """10 test rows in row groups of 2, 3, 2 and 3: two workers' test shards hold 4 and 6 rows."""
    dataset = synthetic_dataset(spark, tmp_path_factory.mktemp("uneven-data"), synthetic_count=50, image_size=32,
                                min_row_groups_per_split=3)
    assert rows_per_shard(dataset, split="test", shard_count=2) == [4, 6]
    return dataset


def test_validation_scores_every_test_row_once_and_equals_evaluate(spark, uneven_dataset, tmp_path):
    """Two workers with unequal test shards: the last validation is the evaluation job's, figure for figure."""
    result = run_train(spark, **sections(train_config(tmp_path, uneven_dataset, "train.num_slots=2",
                                                      "train.preview_images=0")))
    assert result.workers == 2
    evaluation = run_evaluate(spark, evaluate=load_job_config(
        "evaluate", f"evaluate.model={tmp_path / 'run'}", f"evaluate.dataset={uneven_dataset}",
        f"evaluate.output={tmp_path / 'eval'}", "evaluate.preview_images=0", "evaluate.batch_size=4").evaluate)
    assert evaluation.images == 10
    final, measured = result.final_metrics, evaluation.metrics
    assert final["val_pixel_accuracy"] == pytest.approx(measured.pixel_accuracy, abs=1e-4)
    assert final["val_mean_iou"] == pytest.approx(measured.mean_iou, abs=1e-4)
    for name, iou in measured.iou.items():
        assert final[f"val_iou_{name}"] == pytest.approx(iou or 0.0, abs=1e-4), name


def training_processes() -> dict[int, int]:
    """pid -> rank of every training process petseg's tasks started on this machine."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
            job = re.search(rb"from petseg.train.loop import main; main\('([^']+)'\)", b" ".join(args))
            if job:
                found[int(cmdline.parent.name)] = json.loads(Path(job.group(1).decode()).read_text())["rank"]
        except (OSError, ValueError):
            continue  # the process ended while we looked
    return found


def latest_backup(partial: Path) -> str:
    """The checkpoint BackupAndRestore last finished writing (its manager writes this file last)."""
    try:
        return (partial / "backup" / "chief" / "checkpoint").read_text().splitlines()[0]
    except (OSError, IndexError):
        return ""


def kill_worker_1_at_the_next_backup(partial: Path) -> list[int]:
    """Start a thread that SIGKILLs worker 1's training process once a new epoch backup is written."""
    killed: list[int] = []
    before = latest_backup(partial)

    def watch() -> None:
        deadline = time.monotonic() + 600
        while not killed and time.monotonic() < deadline:
            if latest_backup(partial) not in ("", before):
                for pid, rank in training_processes().items():
                    if rank == 1:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def test_a_killed_worker_leaves_no_process_and_restarts_resume_from_the_backup(spark, uneven_dataset, tmp_path, caplog):
    partial = tmp_path / "run.petseg-partial"
    cfg = train_config(tmp_path, uneven_dataset, "train.num_slots=2", "train.epochs=3", "train.preview_images=0")
    # Without restarts the run fails, and the other worker's process ends with its task, at once.
    killed = kill_worker_1_at_the_next_backup(partial)
    with pytest.raises(Exception, match=r"training worker 1 of 2 failed \(exit code -9\)"):
        run_train(spark, **sections(cfg))
    assert killed, "the test never found worker 1's training process"
    assert re.search(r"training failed: training worker 1 of 2 failed \(exit code -9\), with no restart left "
                     r"\(train.max_restarts=0\)\..*re-run the job to resume it, or set train.max_restarts=N", caplog.text)
    deadline = time.monotonic() + 20
    while training_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert training_processes() == {}, "a training process outlived its task"
    # With a restart allowed, the same run resumes from its backup, survives a second kill and finishes.
    killed = kill_worker_1_at_the_next_backup(partial)
    restarted = config.load(overrides=[f"data.dataset={uneven_dataset}", f"train.output_dir={tmp_path / 'run'}", *TINY,
                                       "train.num_slots=2", "train.epochs=3", "train.preview_images=0",
                                       "train.max_restarts=1"], job="train")
    result = run_train(spark, **sections(restarted))
    assert killed and result.note.startswith("resuming the unfinished run")
    messages = [r["message"] for r in result.progress]
    assert [m for m in messages if m.startswith("resuming from the backup")] == [
        "resuming from the backup at epoch 2", "resuming from the backup at epoch 3"], messages
    assert [m.split()[1] for m in messages if m.startswith("epoch ")] == ["2/3", "3/3"]  # each epoch trained once
    assert [h["epoch"] for h in result.history] == [1, 2, 3] and epochs_recorded(tmp_path / "run") == [1, 2, 3]
    assert training_processes() == {}


def test_stop_after_epoch_holds_on_executors_with_restarts(spark, tiny_dataset, tmp_path):
    """A stop is not a failure to retry: with restarts allowed the run still ends after the epoch."""
    with pytest.raises(TrainStopped, match="stopped after epoch 1"):
        run_train(spark, **sections(train_config(tmp_path, tiny_dataset, "train.num_slots=1", "train.max_restarts=2",
                                                 "train.stop_after_epoch=1", "train.preview_images=0")))
    assert epochs_recorded(tmp_path / "run.petseg-partial") == [1]
    assert training_processes() == {}


#: Start-up chatter that must not reach a job's console: TensorFlow's C++ lines, petastorm's pyarrow
#: warnings and prints, and the raw progress lines the driver already logs formatted.
NOISE = ("oneDNN custom operations", "Could not find cuda drivers", "failed call to cuInit",
         "absl::InitializeLog", "FutureWarning", "Cache cleanup complete", "petseg-progress",
         "Unable to restore custom metric")


def test_the_train_job_prints_each_epoch_once_no_noise_and_its_failure_last(tiny_dataset, tmp_path):
    """The console script on local[2], as a person runs it: the run stops on purpose after epoch 1.

    On a local master the executors' output is the driver's console, so everything a worker
    prints, and everything the driver logs, lands in this process's stdout and stderr.
    """
    cmd = [sys.executable, "-m", "petseg.cli", "train", "spark.master=local[2]", f"data.dataset={tiny_dataset}",
           f"train.output_dir={tmp_path / 'run'}", *TINY, "train.num_slots=1", "train.stop_after_epoch=1"]
    # As a fresh shell has it: petseg sets these for its own child processes, and this test process
    # has them from the session fixture; inherited, they would hide the driver's own warnings.
    env = {k: v for k, v in os.environ.items() if k not in ("PYSPARK_PYTHON", "TF_CPP_MIN_LOG_LEVEL", "PYTHONWARNINGS")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    console = done.stdout + done.stderr
    assert done.returncode == 1, console[-4000:]
    assert len(re.findall(r"epoch 1/2 loss=", console)) == 1, console[-4000:]
    assert "worker 1/1 reads 32 of 32 train rows" in console
    assert [noise for noise in NOISE if noise in console] == []
    assert "failed (exit code" not in console  # a stop is a clean end of every worker, not a crash to retry
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("petseg: train failed: ") and "stopped after epoch 1 as configured" in last, last


def test_too_few_row_groups_and_missing_gpu_confs_fail_with_the_fix(spark, tiny_dataset, tmp_path):
    from petseg.session import GpuSchedulingError

    fewest = min(row_groups_per_split(tiny_dataset).values())
    workers = fewest + 1
    with pytest.raises(TrainError, match=rf"has {fewest} row group\(s\) but training uses {workers} workers.*"
                                         rf"min_row_groups_per_split>={workers}"):
        run_train(spark, **sections(train_config(tmp_path, tiny_dataset, f"train.num_slots={workers}",
                                                 f"train.batch_size={8 * workers}")))
    with pytest.raises(GpuSchedulingError, match=r"spark.executor.resource.gpu.amount, spark.task.resource.gpu.amount"):
        run_train(spark, **sections(train_config(tmp_path, tiny_dataset, "train.num_slots=1", "train.use_gpu=true")))
    with pytest.raises(TrainError, match="run `petseg ingest` first"):
        run_train(spark, **sections(train_config(tmp_path, str(tmp_path / "nothing"), "train.num_slots=1")))


TWO_WORKERS = textwrap.dedent(
    """
    import json, sys
    from petseg import config
    from petseg.session import get_or_create
    from petseg.train import run_train
    cfg = config.parse_job_arguments(sys.argv[1:], job="train")
    result = run_train(get_or_create(**config.to_dict(cfg.spark)), data=cfg.data, model=cfg.model, train=cfg.train,
                       tracking=cfg.mlflow)
    print("RESULT " + json.dumps({"workers": result.workers, "progress": result.progress, "history": result.history}))
    """
)


FAKE_GPU_DISCOVERY = '#!/usr/bin/env bash\necho \'{"name": "gpu", "addresses": ["0", "1"]}\'\n'


@pytest.mark.slow
@pytest.mark.parametrize("use_gpu", [False, True], ids=["cpu-killed-and-restarted", "gpu-scheduling"])
def test_two_workers_on_two_executor_processes(tiny_dataset, tmp_path, use_gpu):
    """local-cluster[2,1,2048]: two executor JVMs, one barrier task each, MultiWorkerMirroredStrategy.

    With use_gpu, Spark's GPU scheduling is real (a discovery script reports two fake GPUs per
    worker, each task gets one); TensorFlow then finds no CUDA device and trains on the CPU.
    Without, worker 1's training process is killed in epoch 2: Spark, although it may retry a task
    4 times, does not retry the barrier stage, and train.max_restarts=1 resumes the run from epoch
    1's backup (one variant only: each restart starts TensorFlow again on both executors).
    """
    restart = not use_gpu
    args = [f"data.dataset={tiny_dataset}", f"train.output_dir={tmp_path / 'run'}", *TINY, "train.num_slots=2",
            "spark.master=local-cluster[2,1,2048]", f"train.epochs={2 if restart else 1}",
            f"train.use_gpu={str(use_gpu).lower()}"]
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
    killed: list[int] = []
    if restart:
        retries = tmp_path / "retries.yaml"
        retries.write_text("spark:\n  conf:\n    spark.task.maxFailures: '4'\n")
        args += ["train.max_restarts=1", "--conf", str(retries)]
        killed = kill_worker_1_at_the_next_backup(tmp_path / "run.petseg-partial")
    env = {k: v for k, v in os.environ.items() if k != "PYSPARK_PYTHON"}
    done = subprocess.run([sys.executable, "-c", TWO_WORKERS, *args], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    assert result["workers"] == 2 and [h["epoch"] for h in result["history"]] == ([1, 2] if restart else [1])
    shards = {r["rank"]: r["shard_rows"] for r in result["progress"] if "shard_rows" in r}
    devices = {r["rank"]: r["cuda_visible_devices"] for r in result["progress"] if "shard_rows" in r}
    assert devices == ({0: "0", 1: "0"} if use_gpu else {0: "", 1: ""})  # the runner's assignment per task
    assert set(shards) == {0, 1} and shards[0] and shards[1]  # each worker reads rows of its own
    assert shards[0] + shards[1] == 32  # and together they cover the train split
    assert all(len(json.dumps(r)) < 1000 for r in result["progress"])  # counts, not ids, go to the driver
    saved = list((tmp_path / "run").rglob("saved_model.pb"))
    assert saved == [tmp_path / "run" / "model" / "saved_model.pb"]  # exactly one exported model
    if restart:
        assert killed, "the test never found worker 1's training process"
        # One kill, one restart by petseg: Spark retried nothing itself.
        assert re.findall(r"training failed: training worker 1 of 2 failed \(exit code -9\)\. Spark does not retry "
                          r"a failed barrier stage.*; restart (\d) of 1 resumes", done.stderr) == ["1"], done.stderr[-4000:]
        messages = [r["message"] for r in result["progress"]]
        resumed = [m for m in messages if m.startswith("resuming from the backup")]
        assert resumed == ["resuming from the backup at epoch 2"], messages
        assert [m.split()[1] for m in messages if m.startswith("epoch ")] == ["1/2", "2/2"]  # each epoch trained once
        assert epochs_recorded(tmp_path / "run") == [1, 2] and not (tmp_path / "run" / "backup").exists()
        assert training_processes() == {}


def test_mixed_precision_and_xla_options_train(spark, tiny_dataset, tmp_path):
    cfg = train_config(tmp_path, tiny_dataset, "train.local_mode=true", "train.epochs=1", "train.preview_images=0",
                       "model.mixed_precision=mixed_bfloat16", "model.jit_compile=true")
    result = run_train(spark, **sections(cfg))
    assert result.history[0]["loss"] > 0 and "val_pixel_accuracy" in result.final_metrics
    meta = artifact.resolve(str(tmp_path / "run")).metadata
    assert meta["training"]["model"]["mixed_precision"] == "mixed_bfloat16"
    # The policy reached the layers: the convolutions computed in bfloat16 (their weights stay float32).
    convs = [layer for layer in artifact.load(str(tmp_path / "run")).model.layers if "conv" in layer.name]
    assert convs and {(layer.compute_dtype, layer.dtype) for layer in convs} == {("bfloat16", "float32")}


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
    assert "ingest: read 400, written 400, rejected 0" in done.stdout and (tmp_path / "pets" / "_common_metadata").exists()
    assert "train: 20 epochs on 2 worker(s)" in done.stdout
    assert "infer: 400 rows, segmented 400, failed 0" in done.stdout
    # The evaluation job measures the exported model over the whole test split, as training's
    # last validation pass did: the same pixels, the same model, the same figures.
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["pixel_accuracy"] == pytest.approx(final["val_pixel_accuracy"], abs=1e-4), (metrics, final)
    assert metrics["mean_iou"] == pytest.approx(final["val_mean_iou"], abs=1e-4), (metrics, final)
    assert "pixel accuracy" in done.stdout and (tmp_path / "eval" / "predictions.png").exists()


def test_mlflow_tracks_training_and_the_inference_that_uses_it(spark, tiny_dataset, tmp_path, monkeypatch):
    import mlflow

    from petseg.infer.job import run_infer

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps local file stores behind this switch
    tracking = [f"mlflow.tracking_uri=file://{tmp_path / 'mlruns'}", "mlflow.enabled=true", "mlflow.experiment=petseg-test"]
    result = run_train(spark, **sections(train_config(tmp_path, tiny_dataset, "train.local_mode=true", *tracking)))
    model = artifact.resolve(str(tmp_path / "run"))
    client = mlflow.MlflowClient(tracking_uri=f"file://{tmp_path / 'mlruns'}")
    run = client.get_run(model.mlflow_run_id)  # the model's metadata names its run
    assert run.info.status == "FINISHED"
    assert run.data.params["model.n_depth"] == "2" and run.data.params["train.epochs"] == "2"
    history = client.get_metric_history(run.info.run_id, "val_pixel_accuracy")
    assert [m.step for m in history] == [1, 2]  # per epoch
    assert history[-1].value == pytest.approx(result.final_metrics["val_pixel_accuracy"])
    assert {"petseg-model.json", "history.json", "curves.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # The model is an MLflow model of the run (tests/test_registry.py uses it by name).
    assert result.mlflow_model == f"runs:/{run.info.run_id}/model" and result.registered_model is None
    assert [m.name for m in client.search_logged_models([run.info.experiment_id])] == ["model"]
    # The inference job records which model version it used.
    infer_cfg = config.load(overrides=[f"infer.model={tmp_path / 'run'}", f"infer.input={tiny_dataset}", "infer.limit=4",
                                       f"infer.output={tmp_path / 'masks'}", *tracking], job="infer")
    run_infer(spark, infer=infer_cfg.infer, tracking=infer_cfg.mlflow)
    [infer_run] = client.search_runs([run.info.experiment_id], "tags.`petseg.job` = 'infer'")
    assert infer_run.data.params["model_version"] == model.version
    assert infer_run.data.params["model_mlflow_run_id"] == run.info.run_id
    assert infer_run.data.metrics["segmented"] == 4


def test_two_trainings_into_one_folder_each_segment_with_their_own_model_and_version(spark, tiny_dataset, tmp_path):
    """A notebook: train, infer, retrain into the same folder, infer again in one session. Spark reuses
    its Python workers, and with them any model they cached; each inference must use the run it names."""
    from conftest import assert_masks_are_a_fresh_predict, write_pet_photos

    from petseg.infer.job import run_infer
    from petseg.model import custom_objects, keras_module

    photos = tmp_path / "photos"
    pets = write_pet_photos(photos)
    run = tmp_path / "run"
    versions = []
    for seed in (1, 2):
        trained = run_train(spark, **sections(train_config(tmp_path, tiny_dataset, "train.local_mode=true",
                                                           "train.epochs=1", f"train.seed={seed}",
                                                           "train.preview_images=0")))
        output = tmp_path / f"masks{seed}"
        cfg = load_job_config("infer", f"infer.model={run}", f"infer.input={photos}", f"infer.output={output}",
                              "infer.partitions=2")
        report = run_infer(spark, infer=cfg.infer)
        assert report.model_version == trained.run_id and report.segmented == 4
        meta = artifact.resolve(str(run))
        model = keras_module().models.load_model(str(meta.model_dir), compile=False, custom_objects=custom_objects())
        assert_masks_are_a_fresh_predict(spark, output, model=model, pets=pets, preprocessing=meta.preprocessing,
                                         version=trained.run_id)
        versions.append(trained.run_id)
    assert versions[0] != versions[1]
