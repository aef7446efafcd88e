"""What the driver refuses before Spark starts, where executors would otherwise fail late or lose work."""

import pytest

from petseg import cli, config
from petseg.errors import ConfigError

TRAIN = ["data.image_size=32", "model.n_depth=2", "model.encoder_weights=none", "train.batch_size=8", "train.epochs=2"]
CLUSTER = "spark.master=spark://head:7077"


def _train(*overrides: str) -> config.Config:
    return config.load(overrides=[*TRAIN, *overrides], job="train")


def sections(cfg: config.Config) -> dict:
    """What run_train takes of a whole config: its data, model, train and mlflow sections."""
    return {"data": cfg.data, "model": cfg.model, "train": cfg.train, "tracking": cfg.mlflow}


@pytest.mark.parametrize(
    "job,key,overrides",
    [
        ("ingest", "data.dataset", ["data.source=synthetic", "data.dataset=build/pets"]),
        ("ingest", "data.rejects", ["data.source=synthetic", "data.dataset=s3a://b/pets", "data.rejects=/tmp/rejects"]),
        ("ingest", "data.input", ["data.source=oxford", "data.dataset=s3a://b/pets", "data.input=/data/oxford"]),
        ("train", "train.output_dir", [*TRAIN, "data.dataset=hdfs://nn/pets", "train.output_dir=runs/r1"]),
        ("infer", "infer.output", ["infer.model=/dbfs/runs/r1", "infer.input=s3a://b/pets", "infer.output=./masks"]),
        ("infer", "infer.model", ["infer.model=runs/r1", "infer.input=s3a://b/pets", "infer.output=main.seg.masks"]),
        ("evaluate", "evaluate.output", ["evaluate.model=/Volumes/c/s/v/r1", "evaluate.dataset=gs://b/pets",
                                         "evaluate.output=eval"]),
    ],
)
def test_a_driver_local_path_is_refused_for_a_cluster_master(job, key, overrides):
    with pytest.raises(ConfigError, match=rf"^{key}=.* is a path on the driver's own disk .*spark://head:7077.*"
                                          r"write file://.* if that folder is a mount every node shares"):
        config.load(overrides=[CLUSTER, *overrides], job=job)


def test_shared_storage_explicit_file_urls_and_local_masters_are_allowed(tmp_path):
    cfg = _train(CLUSTER, "data.dataset=dbfs:/pets", "train.output_dir=/Volumes/main/petseg/v/runs/r1")
    assert cfg.data.dataset == "file:///dbfs/pets" and cfg.train.output_dir == "file:///Volumes/main/petseg/v/runs/r1"
    cfg = _train(CLUSTER, "data.dataset=/dbfs/pets", f"train.output_dir=file://{tmp_path}/run")  # the user's NFS
    assert cfg.train.output_dir == f"file://{tmp_path}/run"
    for master in ("local[2]", "local-cluster[2,1,1024]"):
        cfg = _train(f"spark.master={master}", "data.dataset=build/pets", "train.output_dir=build/run")
        assert cfg.data.dataset.startswith("file:///") and cfg.data.dataset.endswith("/build/pets")


def test_a_null_master_is_a_cluster_under_databricks_or_spark_submit(monkeypatch):
    """Databricks runs a wheel task in /databricks/driver: a relative path there is the driver's disk."""
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION", raising=False)
    assert _train("data.dataset=build/pets", "train.output_dir=build/run").train.output_dir.endswith("/build/run")
    for variable, value in (("DATABRICKS_RUNTIME_VERSION", "15.4"), ("PYSPARK_GATEWAY_PORT", "40123")):
        with monkeypatch.context() as m:
            m.setenv(variable, value)
            with pytest.raises(ConfigError, match=r"^data.dataset='build/pets' .*spark.master is null and "
                                                  r"spark-submit or Databricks chooses it"):
                _train("data.dataset=build/pets", "train.output_dir=/Volumes/c/s/v/run")
            assert _train("data.dataset=/Volumes/c/s/v/pets", "train.output_dir=dbfs:/runs/r1").train.output_dir == (
                "file:///dbfs/runs/r1"
            )


def test_the_cli_fails_with_one_line_naming_the_key_before_spark_starts(capsys):
    status = cli.main(["train", CLUSTER, *TRAIN, "data.dataset=hdfs://nn/pets", "train.output_dir=runs/r1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0].startswith("petseg: train failed: train.output_dir='runs/r1' is a path on the driver's own disk")


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.output_dir=hdfs://nn/runs/r1",
         r"train.output_dir='hdfs://nn/runs/r1' is not allowed; use a folder on the local file system that every worker"),
        ("train.output_dir=s3a://bucket/runs/r1", r"train.output_dir='s3a://bucket/runs/r1' is not allowed"),
        ("train.warmup_epochs=3", r"train.warmup_epochs=3.0 is not allowed; use a number of epochs between 0 and "
                                  r"train.epochs=2"),
    ],
)
def test_what_the_workers_would_refuse_fails_on_the_driver(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _train(f"data.dataset={tmp_path}/pets", f"train.output_dir={tmp_path}/run", override)


@pytest.fixture(scope="module")
def small_dataset(spark, tmp_path_factory):
    from conftest import synthetic_dataset

    # 40: divisible by 2 (n_depth 2) but not by 16 (n_depth 5).
    return synthetic_dataset(spark, tmp_path_factory.mktemp("preflight"), synthetic_count=24, image_size=40,
                             min_row_groups_per_split=2)


def _train_on(dataset: str, tmp_path, *overrides: str) -> config.Config:
    base = [o for o in TRAIN if not o.startswith("data.image_size")]
    return config.load(overrides=[*base, f"data.dataset={dataset}", f"train.output_dir={tmp_path}/run",
                                  "train.local_mode=true", *overrides], job="train")


def test_training_takes_the_stored_image_size_and_refuses_another(spark, small_dataset, tmp_path):
    from petseg.train import TrainError, run_train

    with pytest.raises(TrainError, match=r"data.image_size=64 but the dataset at .* stores 40x40 images; leave "
                                         r"data.image_size unset"):
        run_train(spark, **sections(_train_on(small_dataset, tmp_path, "data.image_size=64")))
    with pytest.raises(TrainError, match=r"stores 40x40 images: image_size=40 is not divisible .* n_depth=5"):
        run_train(spark, **sections(_train_on(small_dataset, tmp_path, "model.n_depth=5")))


def test_reading_the_stored_image_size_prints_no_petastorm_warnings(small_dataset):
    import warnings

    from petseg.train.launch import stored_image_size

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # as a fresh shell's python shows each FutureWarning
        assert stored_image_size(small_dataset) == 40
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_imagenet_weights_that_cannot_be_fetched_fail_on_the_driver_before_any_spark_job(spark, small_dataset,
                                                                                         tmp_path, monkeypatch):
    """No cached weights and no way out: the fetch fails, and no barrier stage starts."""
    from petseg.train import TrainError, run_train

    # On any machine, with internet or Keras's cache or not: an empty home (Keras caches in
    # ~/.keras/models) and a proxy on a closed loopback port, which refuses at once.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)

    cfg = _train_on(small_dataset, tmp_path, "model.encoder_weights=imagenet", "train.local_mode=false",
                    "train.num_slots=1")
    assert cfg.data.image_size is None  # unset: training takes the dataset's 40
    context = spark.sparkContext
    context.setJobGroup("petseg-imagenet-preflight", "run_train with unreachable ImageNet weights")
    try:
        with pytest.raises(TrainError, match=r"encoder_weights='imagenet' could not be downloaded .*copy "
                                             r"vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 into"):
            run_train(spark, **sections(cfg))
    finally:
        context.setLocalProperty("spark.jobGroup.id", None)
    assert list(context.statusTracker().getJobIdsForGroup("petseg-imagenet-preflight")) == []


def test_ingest_first_is_said_only_when_there_is_no_dataset(spark, tmp_path):
    from petseg.train import TrainError, run_train

    cfg = _train_on(str(tmp_path / "pets"), tmp_path)
    with pytest.raises(TrainError, match=r"there is no dataset at data.dataset=.*run `petseg ingest` first"):
        run_train(spark, **sections(cfg))
    cfg = _train_on("abfss://pets@account.dfs.core.windows.net/pets", tmp_path)
    with pytest.raises(TrainError, match=r"adlfs package, which is not installed .*pip install 'petseg\[azure\]'") as err:
        run_train(spark, **sections(cfg))
    assert "ingest" not in str(err.value)
