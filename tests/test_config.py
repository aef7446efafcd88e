import os
import re
import sys

import pytest

from petseg import config
from petseg.config import ConfigError
from petseg.io import urls


def test_base_and_local_layers():
    base = config.load(overrides=["data.dataset=/tmp/x", "data.input=/data/pets"])
    assert base.data.image_size == 128 and base.data.source is config.Source.oxford
    assert base.spark.master is None
    assert base.data.dataset == "file:///tmp/x" and base.data.rejects == "file:///tmp/x_rejects"
    local = config.parse_job_arguments(["data.image_size=64"], local=True)
    assert local.spark.master == "local[*]" and local.data.source is config.Source.synthetic
    assert local.data.image_size == 64
    # Overlays add Spark confs without dropping the base ones.
    assert local.spark.conf["spark.executorEnv.TF_USE_LEGACY_KERAS"] == "1"
    assert local.spark.conf["spark.sql.shuffle.partitions"] == "4"


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.imagesize=64", r"unknown config key 'data.imagesize'; did you mean 'data.image_size'\? allowed keys here: "
                              r"source, input, dataset"),
        ("nope.x=1", r"unknown config key 'nope"),
        ("data.image_size=big", r"bad value for config key 'data.image_size'.*'big'.*expected int"),
        ("data.source=kaggle", r"'data.source'.*kaggle.*allowed values: synthetic, oxford, tfds"),
        ("data.image_codec=webp", r"allowed values: raw, jpeg, png"),
        ("data.image_size=4", r"data.image_size=4 is not allowed; use an integer >= 8"),
        ("data.synthetic_test_fraction=1.5", r"strictly between 0 and 1"),
        ("data.dataset=ftp://host/x", r"unsupported scheme 'ftp'; use one of file, hdfs"),
        ("data.image_size", r"not of the form key=value"),
    ],
)
def test_bad_config_names_key_value_and_fix(override, message):
    args = ["data.dataset=/tmp/x", "data.source=synthetic", override]
    with pytest.raises(ConfigError, match=message):
        config.load(overrides=args)


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.width=0.5", r"width=0.5 needs encoder_weights='none'"),
        ("model.batch_norm_momentum=1.5", r"batch_norm_momentum=1.5 is not allowed; use a number in \[0, 1\)"),
        ("train.augment.max_zoom=0.5", r"train.augment.max_zoom=0.5 is not allowed; use a number >= 1"),
        ("train.augment.colour=2", r"train.augment.colour=2.0 is not allowed; use a strength in \[0, 1\]"),
    ],
)
def test_bad_recipe_keys_are_refused_before_training(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(overrides=["data.dataset=/tmp/x", "train.output_dir=/tmp/run", override], job="train")


def test_an_unset_width_is_resolved_once_for_training():
    args = ["data.dataset=/tmp/x", "train.output_dir=/tmp/run"]
    assert config.load(overrides=[*args, "model.encoder_weights=none"], job="train").model.width == 0.5
    assert config.load(overrides=args, job="train").model.width == 1.0  # pretrained: VGG16's own
    assert config.load(overrides=[*args, "model.encoder_weights=none", "model.width=0.25"], job="train").model.width == 0.25


def test_oxford_needs_input_and_files_must_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"data.input=None is not allowed; use the Oxford-IIIT Pet folder"):
        config.load(overrides=["data.dataset=/tmp/x"])
    with pytest.raises(ConfigError, match="does not exist; pass an existing YAML file"):
        config.load(conf_files=[tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  image_size: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        config.load(conf_files=[bad])
    with pytest.raises(ConfigError, match=r"data.dataset=None is not allowed; use a dataset URL"):
        config.load(overrides=["data.source=synthetic"])


def test_validate_returns_a_normalised_config_and_leaves_the_one_it_checks_unchanged():
    import copy

    from omegaconf import OmegaConf

    overrides = ["spark.master=local[2]", "data.source=synthetic", "data.dataset=/d/pets", "model.encoder_weights=none",
                 "model.freeze_encoder=AUTO", "train.output_dir=/runs/r1", "infer.input=main.raw.photos",
                 "infer.output=/m", "evaluate.output=/e"]
    merged = OmegaConf.merge(OmegaConf.structured(config.Config), OmegaConf.load(config.BASE_CONF),
                             OmegaConf.from_dotlist(overrides))
    raw = OmegaConf.to_object(merged)
    before = copy.deepcopy(raw)
    checked = config.validate(raw, job="demo")
    assert raw == before  # not one section of the caller's config changed
    assert (raw.data.dataset, raw.data.rejects, raw.data.image_size) == ("/d/pets", None, None)
    assert (raw.model.width, raw.model.freeze_encoder) == (None, "AUTO")
    assert checked.data.dataset == "file:///d/pets" and checked.data.rejects == "file:///d/pets_rejects"
    assert checked.data.image_size == 128
    assert checked.model.width == 0.5 and checked.model.freeze_encoder == "auto"
    assert checked.train.output_dir == "file:///runs/r1"
    assert checked.infer.model == "file:///runs/r1" and checked.infer.input_format is config.InputFormat.table
    assert checked.infer.output == "file:///m"
    assert checked.evaluate.dataset == "file:///d/pets" and checked.evaluate.output == "file:///e"
    assert config.validate(checked, job="demo") == checked  # normalising twice changes nothing
    # load hands on what validate returns.
    assert config.load(overrides=overrides, job="demo") == checked


def test_url_normalisation():
    assert urls.normalize_url("dbfs:/ml/pets", key="k") == "file:///dbfs/ml/pets"
    assert urls.normalize_url("/Volumes/main/pets/raw", key="k") == "file:///Volumes/main/pets/raw"
    assert urls.normalize_url("s3a://bucket/pets", key="k") == "s3a://bucket/pets"
    assert urls.normalize_url("/photos/*.jpg", key="k") == "file:///photos/*.jpg"  # a glob stays a glob
    assert urls.normalize_url("rel/dir", key="k").startswith("file:///") and urls.normalize_url("rel/dir", key="k").endswith("/rel/dir")


def test_command_line():
    inv = config.parse_command_line(["ingest", "--conf", str(config.LOCAL_CONF), "data.synthetic_count=10"])
    assert inv.job == "ingest" and inv.config.data.synthetic_count == 10
    with pytest.raises(ConfigError, match="unknown job 'trian'; did you mean 'train'. choose one of ingest, train, infer, "
                                          "evaluate, demo"):
        config.parse_command_line(["trian"])
    with pytest.raises(ConfigError, match="unknown option '--verbose'"):
        config.parse_command_line(["demo", "--verbose"])
    with pytest.raises(ConfigError, match="usage: petseg"):
        config.parse_command_line([])


def test_infer_and_evaluate_sections():
    # Each job needs only its own keys; the stages chain by default (evaluate.model -> infer.model ->
    # train.output_dir, evaluate.dataset -> data.dataset), so one config can drive the whole pipeline.
    cfg = config.load(overrides=["train.output_dir=/runs/r1", "data.dataset=/d/pets", "data.source=synthetic",
                                 "infer.input=main.raw.photos",
                                 "infer.output=main.seg.masks", "evaluate.output=/e"], job="demo")
    assert cfg.infer.model == cfg.evaluate.model == "file:///runs/r1"
    assert cfg.evaluate.dataset == "file:///d/pets"
    assert cfg.infer.input_format is config.InputFormat.table and cfg.infer.output == "main.seg.masks"
    only_infer = config.load(overrides=["infer.model=/r", "infer.input=/photos/*.jpg", "infer.output=./masks"], job="infer")
    assert only_infer.infer.input == "file:///photos/*.jpg" and only_infer.infer.output.endswith("/masks")
    with pytest.raises(ConfigError, match="infer.input=None is not allowed"):
        config.load(overrides=["infer.model=/r", "infer.output=/o"], job="infer")
    with pytest.raises(ConfigError, match="infer.arrow_batch_rows=8 is not allowed; use an integer >= infer.batch_size=32"):
        config.load(overrides=["infer.model=/r", "infer.input=/i", "infer.output=/o", "infer.arrow_batch_rows=8"], job="infer")
    with pytest.raises(ConfigError, match="'infer.input_format'.*allowed values: auto, petastorm, parquet, table, images"):
        config.load(overrides=["infer.input_format=csv"], job="infer")
    with pytest.raises(ConfigError, match="evaluate.split='val' is not allowed; use train or test"):
        config.load(overrides=["evaluate.model=/r", "evaluate.dataset=/d", "evaluate.output=/o", "evaluate.split=val"],
                    job="evaluate")
    assert [urls.is_table_name(v) for v in ("t", "s.t", "c.s.t", "`my-cat`.s.t", "./t", "/t", "s3://b/t")] == [
        True, True, True, True, False, False, False]


@pytest.mark.parametrize("master,expected", [("local[2]", sys.executable), ("local-cluster[2,1,1024]", sys.executable),
                                             ("yarn", None), ("spark://host:7077", None)])
def test_executors_python_is_this_interpreter_for_local_masters_only(monkeypatch, master, expected):
    from petseg import env

    monkeypatch.delenv("PYSPARK_PYTHON", raising=False)
    env.prepare_process_environment(master=master)
    assert os.environ.get("PYSPARK_PYTHON") == expected


@pytest.mark.parametrize("launcher,expected", [(None, sys.executable), ("PYSPARK_GATEWAY_PORT", None),
                                               ("DATABRICKS_RUNTIME_VERSION", None)])
def test_a_null_master_outside_a_launcher_is_pysparks_local_default_and_runs_this_interpreter(monkeypatch, launcher,
                                                                                              expected):
    """`.venv/bin/petseg ingest` from a shell without the venv: pyspark's default local[*] session, whose workers
    would otherwise run the `python3` on PATH (no pandas); under spark-submit or Databricks the cluster decides."""
    from petseg import env

    for name in ("PYSPARK_PYTHON", "PYSPARK_GATEWAY_PORT", "DATABRICKS_RUNTIME_VERSION"):
        monkeypatch.delenv(name, raising=False)
    if launcher:
        monkeypatch.setenv(launcher, "1")
    env.prepare_process_environment(master=None)
    assert os.environ.get("PYSPARK_PYTHON") == expected
    monkeypatch.setenv("PYSPARK_PYTHON", "/opt/python/bin/python3")  # the user's choice wins
    env.prepare_process_environment(master=None)
    assert os.environ["PYSPARK_PYTHON"] == "/opt/python/bin/python3"


def test_a_spark_conf_override_keeps_its_dotted_key_whole():
    cfg = config.load(overrides=["spark.conf.spark.driver.memory=1g", "spark.conf.spark.sql.shuffle.partitions=8",
                                 "data.source=synthetic", "data.dataset=/tmp/pets"])
    assert cfg.spark.conf["spark.driver.memory"] == "1g" and cfg.spark.conf["spark.sql.shuffle.partitions"] == "8"
    assert "spark" not in cfg.spark.conf  # not spark -> driver -> memory


def test_help_lists_the_stages_and_each_stages_keys_from_base_yaml(capsys):
    from petseg.cli import main
    from petseg.config.describe import STAGES, all_keys, key_docs

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {stage}" in out for stage in STAGES) and "petseg <stage> --help" in out
    assert main(["infer", "--help", "infer.modle=x"]) == 0  # help wins over anything else on the line
    out = capsys.readouterr().out
    assert re.search(r"^  infer\.model +\$\{train\.output_dir\}  # The training run to use: ", out, re.M)
    assert "data.max_image_pixels" in out and "train.epochs" not in out
    # Every key of the schema has its default in base.yaml, where help reads it.
    documented = key_docs(config.BASE_CONF.read_text())
    assert [k for k in all_keys() if k != "spark.conf" and k not in documented] == []


def test_print_config_shows_the_resolved_config_with_secrets_redacted_and_runs_nothing(capsys):
    from petseg.cli import main

    assert main(["ingest", "data.source=synthetic", "data.dataset=/tmp/pets", "spark.conf.fs.s3a.secret.key=abc",
                 "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "dataset: file:///tmp/pets" in out and "rejects: file:///tmp/pets_rejects" in out
    assert "fs.s3a.secret.key: <redacted>" in out and "abc" not in out


@pytest.mark.parametrize("args,message", [
    (["infer", "infer.modle=x"], r"petseg: infer failed: unknown config key 'infer.modle'; did you mean "
                                 r"'infer.mode' or 'infer.model'\?"),
    (["ingset"], r"petseg: command line failed: unknown job 'ingset'; did you mean 'ingest'\?"),
    (["infer", "--verbose"], r"unknown option '--verbose'; options are --conf FILE, --print-config and --help"),
    ([], r"usage: petseg .*; petseg --help lists the stages"),
])
def test_a_misspelt_key_job_or_option_gets_the_nearest_and_exit_2(capsys, args, message):
    from petseg.cli import main

    assert main(args) == 2
    assert re.search(message, capsys.readouterr().err)
