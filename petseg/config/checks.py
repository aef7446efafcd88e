"""Checks of a merged configuration that types alone cannot make, for the job about to run.

Every failure raises :class:`~petseg.errors.ConfigError` naming the key, the bad value and what is
allowed; locations are normalised here, once, by the rules of :mod:`petseg.io.urls`, into a new
config: the one checked is left as it was.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from petseg import env
from petseg.config.sections import (
    RECIPE_IMAGE_SIZE,
    Config,
    DataConfig,
    EvaluateConfig,
    InferConfig,
    InferMode,
    InputFormat,
    ModelConfig,
    Source,
    TrainConfig,
)
from petseg.errors import ConfigError
from petseg.io.urls import (
    is_local,
    is_mlflow_uri,
    is_plain_path,
    is_table_name,
    normalize_url,
    on_shared_mount,
    overlap,
    petastorm_url,
)

#: Which config sections each job reads, so that e.g. ``petseg train`` needs no ingest input.
JOB_SECTIONS = {
    "ingest": ("data",),
    "train": ("model", "train"),
    "infer": ("infer",),
    "evaluate": ("evaluate",),
    "demo": ("data", "model", "train", "infer", "evaluate"),
}


def validate(cfg: Config, *, job: str = "ingest") -> Config:
    """Check the values of the sections ``job`` reads that types alone cannot, and normalise them.

    Parameters
    ----------
    cfg
        A config as the layers merge it; left unchanged.
    job
        The job about to run (:data:`JOB_SECTIONS`): which sections are checked.

    Returns
    -------
    Config
        A new config, the sections checked normalised: locations as URLs, ``data.rejects`` and
        ``data.image_size`` filled in, ``model.width`` resolved. Sections left as they were are shared
        with ``cfg``.

    Raises
    ------
    ConfigError
        Naming the key, the bad value and what is allowed.
    """
    sections = JOB_SECTIONS.get(job, tuple(JOB_SECTIONS["demo"]))
    if cfg.spark.remote is not None:
        _validate_remote(cfg.spark.remote, job=job)
    data = cfg.data
    if {"data", "train"} & set(sections):
        _require(bool(data.dataset), "data.dataset", data.dataset, "a dataset URL such as file:///tmp/pets")
        data = replace(data, dataset=petastorm_url(_location(cfg, str(data.dataset), key="data.dataset"),
                                                   key="data.dataset"))
    if data.image_size is None and "data" in sections:
        # Ingest writes the recipe's size; training reads the dataset's.
        data = replace(data, image_size=RECIPE_IMAGE_SIZE)
    _require(
        data.image_size is None or data.image_size >= 8,
        "data.image_size",
        data.image_size,
        "an integer >= 8 (the recipe uses 128), or null",
    )
    _validate_max_image_pixels(data.max_image_pixels)  # every stage decodes images
    if "data" in sections:
        data = _validate_data(cfg, data)
    normalised = replace(
        cfg,
        data=data,
        model=_validate_model(cfg.model, data=data) if "model" in sections else cfg.model,
        train=_validate_train(cfg, cfg.train) if "train" in sections else cfg.train,
        infer=_validate_infer(cfg, cfg.infer) if "infer" in sections else cfg.infer,
        evaluate=_validate_evaluate(cfg, cfg.evaluate) if "evaluate" in sections else cfg.evaluate,
    )
    if normalised.mlflow.enabled and {"train", "infer"} & set(sections):
        _require(_has_mlflow(), "mlflow.enabled", True,
                 "false, or install MLflow first (pip install 'petseg[mlflow]'; Databricks runtimes have it)")
    _refuse_overlaps(normalised, sections)
    name = normalised.mlflow.registered_model_name
    if "train" in sections and name is not None:
        _require(bool(name.strip()), "mlflow.registered_model_name", name,
                 "a registered model name (catalog.schema.model in Unity Catalog), or null")
        _require(normalised.mlflow.enabled, "mlflow.registered_model_name", name,
                 "null, or set mlflow.enabled=true as well: the model is registered from its training run")
    return normalised


def _has_mlflow() -> bool:
    import importlib.util

    return importlib.util.find_spec("mlflow") is not None


def _model_location(cfg: Config, value: str, *, key: str) -> str:
    """A model's path as a URL (:func:`_location`), or an MLflow URI as given; MLflow must be installed
    for those, which are checked against the servers when the job starts."""
    if not is_mlflow_uri(value):
        return _location(cfg, value, key=key)
    _require(_has_mlflow(), key, value,
             "a run folder, or install MLflow to read models:/ and runs:/ URIs (pip install 'petseg[mlflow]')")
    return value


#: The jobs that run over Spark Connect. Ingest's sources build RDDs and its petastorm writer needs the
#: JVM gateway; training runs MirroredStrategyRunner's RDD barrier stage: none exists over Connect.
CONNECT_JOBS = ("infer", "evaluate")


#: Why the other jobs cannot run over Spark Connect.
_CLASSIC_ONLY = {
    "ingest": "ingest's sources build RDDs and petastorm's writer needs the JVM gateway",
    "train": "training runs MirroredStrategyRunner's RDD barrier stage",
    "demo": "the demo ingests through RDDs and trains in an RDD barrier stage",
}


def _validate_remote(remote: str, *, job: str) -> None:
    _require(remote.startswith("sc://"), "spark.remote", remote, "a Spark Connect URL such as sc://host:15002, or null")
    if job not in CONNECT_JOBS:
        raise ConfigError(
            f"spark.remote={remote!r}: `petseg {job}` needs a classic (dedicated) cluster: "
            f"{_CLASSIC_ONLY.get(job, 'it is not one of ' + ', '.join(CONNECT_JOBS))}, which Spark Connect does not "
            "offer. Unset spark.remote and run it on a classic cluster (Databricks Runtime 15.4, 16.4 or 17.3 LTS ML, "
            f"dedicated access mode); over Spark Connect petseg runs {' and '.join(CONNECT_JOBS)}"
        )


def remote_is_this_machine(remote: str) -> bool:
    """Whether a Spark Connect URL names a server on this machine (its executors share this disk)."""
    host = remote[len("sc://"):].split("/", 1)[0].split(":", 1)[0]
    return host in ("localhost", "127.0.0.1", "::1", "[::1]")


def _validate_data(cfg: Config, d: DataConfig) -> DataConfig:
    """``d`` checked, its rejects and Oxford input as URLs; ``cfg`` gives where the job runs."""
    _require(d.rowgroup_size_mb >= 1, "data.rowgroup_size_mb", d.rowgroup_size_mb, "an integer >= 1")
    _require(
        d.min_row_groups_per_split >= 1, "data.min_row_groups_per_split", d.min_row_groups_per_split, "an integer >= 1"
    )
    _require(d.partitions is None or d.partitions >= 1, "data.partitions", d.partitions, "null or an integer >= 1")
    _require(d.max_files_per_task >= 1, "data.max_files_per_task", d.max_files_per_task, "an integer >= 1")
    _require(d.max_mb_per_task >= 1, "data.max_mb_per_task", d.max_mb_per_task, "an integer >= 1")
    _require(
        0.0 < d.synthetic_test_fraction < 1.0,
        "data.synthetic_test_fraction",
        d.synthetic_test_fraction,
        "a number strictly between 0 and 1",
    )
    if d.source is Source.synthetic:
        _require(d.synthetic_count >= 2, "data.synthetic_count", d.synthetic_count, "an integer >= 2 (one per split)")
    else:
        _require(
            bool(d.input),
            "data.input",
            d.input,
            "the Oxford-IIIT Pet folder (source=oxford) or a TFDS data_dir (source=tfds)",
        )
    rejects = _location(cfg, d.rejects, key="data.rejects") if d.rejects else str(d.dataset).rstrip("/") + "_rejects"
    d = replace(d, rejects=rejects)
    if d.input and d.source is Source.oxford:
        d = replace(d, input=_location(cfg, d.input, key="data.input"))
    elif d.input:
        require_shared_storage(cfg, d.input, key="data.input")  # a TFDS data_dir, opened by every executor
    return d


def _validate_model(m: ModelConfig, *, data: DataConfig) -> ModelConfig:
    """``m`` checked against the (normalised) ``data`` section, its switches lower-cased and its width resolved."""
    for key in ("freeze_encoder", "encoder_batch_norm"):
        value = str(getattr(m, key)).lower()
        _require(value in ("auto", "true", "false"), f"model.{key}", getattr(m, key), "auto, true or false")
        m = replace(m, **{key: value})
    _require(m.dice_weight >= 0, "model.dice_weight", m.dice_weight, "a number >= 0 (0 = cross-entropy only)")
    from petseg.model.unet import resolved_width, validate_unet_args  # no TensorFlow import

    # Resolved here, once: training builds with it, and the run's metadata records the width built.
    m = replace(m, width=resolved_width(m.width, encoder_weights=m.encoder_weights))
    try:
        # Unset, the size is the dataset's, checked against n_depth when training opens it.
        image_size = data.image_size or 2 ** (min(max(m.n_depth, 1), 5) - 1)
        validate_unet_args(image_size=image_size, n_depth=m.n_depth, encoder_weights=m.encoder_weights,
                           width=m.width,
                           batch_norm_momentum=m.batch_norm_momentum)
    except ValueError as exc:
        raise ConfigError(f"model/data config: {exc}") from None
    return m


def _validate_train(cfg: Config, t: TrainConfig) -> TrainConfig:
    """``t`` checked, its output folder as a URL; ``cfg`` gives where the job runs."""
    _require(t.num_slots >= 1, "train.num_slots", t.num_slots, "an integer >= 1 (workers, or GPUs with use_gpu)")
    _require(t.epochs >= 1, "train.epochs", t.epochs, "an integer >= 1")
    _require(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "a positive number such as 1e-3")
    # A warm-up longer than the run would train at a fraction of the learning rate and never decay.
    _require(
        0 <= t.warmup_epochs <= t.epochs,
        "train.warmup_epochs",
        t.warmup_epochs,
        f"a number of epochs between 0 and train.epochs={t.epochs}",
    )
    _require(t.shuffle_buffer >= 1, "train.shuffle_buffer", t.shuffle_buffer, "an integer >= 1")
    a = t.augment
    _require(a.max_zoom >= 1.0, "train.augment.max_zoom", a.max_zoom, "a number >= 1 (1: no zoom; 1.5 zooms up to 1.5x)")
    _require(0.0 <= a.colour <= 1.0, "train.augment.colour", a.colour, "a strength in [0, 1] (0: no colour change)")
    _require(t.preview_images >= 0, "train.preview_images", t.preview_images, "an integer >= 0")
    _require(t.max_restarts >= 0, "train.max_restarts", t.max_restarts, "an integer >= 0 (0: no restarts by petseg)")
    workers = 1 if t.local_mode else t.num_slots
    _require(
        t.batch_size >= workers and t.batch_size % workers == 0,
        "train.batch_size",
        t.batch_size,
        f"a multiple of the {workers} worker(s) (train.batch_size is global; each worker gets batch_size / workers),"
        f" e.g. {max(workers, (t.batch_size // workers) * workers) or workers}",
    )
    _require(
        t.stop_after_epoch is None or 1 <= t.stop_after_epoch <= t.epochs,
        "train.stop_after_epoch",
        t.stop_after_epoch,
        f"null or an epoch between 1 and train.epochs={t.epochs}",
    )
    _require(bool(t.output_dir), "train.output_dir", t.output_dir, "a folder URL or path for the run's outputs")
    t = replace(t, output_dir=_location(cfg, str(t.output_dir), key="train.output_dir"))
    # Workers save the model and its backups with TensorFlow's file APIs, through the local file system.
    _require(
        is_local(t.output_dir),
        "train.output_dir",
        t.output_dir,
        "a folder on the local file system that every worker sees: a shared mount (NFS, /dbfs/..., /Volumes/..., "
        "dbfs:/...) as a path or file:// URL; TensorFlow writes the model and its backups as local files",
    )
    return t


#: What infer.model and evaluate.model take.
_MODEL_VALUES = ("a training run's train.output_dir (or its model/ folder), or an MLflow model: models:/<name>/<version>, "
                 "models:/<name>@<alias>, runs:/<run id>/model")


def _validate_infer(cfg: Config, i: InferConfig) -> InferConfig:
    """``i`` checked, its locations as URLs and a table input's format settled; ``cfg`` gives where the job runs."""
    _require(bool(i.model), "infer.model", i.model, _MODEL_VALUES)
    _require(
        bool(i.input), "infer.input", i.input, "a Petastorm or Parquet dataset URL, a catalog table, or a folder/glob of images"
    )
    _require(bool(i.output), "infer.output", i.output, "a folder URL or path for Parquet, or a catalog table name")
    _require(bool(i.image_column), "infer.image_column", i.image_column, "the name of the encoded-image column")
    _require(i.batch_size >= 1, "infer.batch_size", i.batch_size, "an integer >= 1 (images per model call)")
    _require(
        i.arrow_batch_rows >= i.batch_size,
        "infer.arrow_batch_rows",
        i.arrow_batch_rows,
        f"an integer >= infer.batch_size={i.batch_size} (rows handed to the UDF at once)",
    )
    _require(i.arrow_batch_bytes >= 1, "infer.arrow_batch_bytes", i.arrow_batch_bytes,
             "an integer >= 1 (bytes of encoded images per UDF batch)")
    _require(i.limit is None or i.limit >= 1, "infer.limit", i.limit, "null or an integer >= 1")
    _require(i.partitions is None or i.partitions >= 1, "infer.partitions", i.partitions, "null or an integer >= 1")
    i = replace(i, model=_model_location(cfg, str(i.model), key="infer.model"))
    if i.input_format is InputFormat.table or (i.input_format is InputFormat.auto and is_table_name(str(i.input))):
        i = replace(i, input_format=InputFormat.table)
    else:
        i = replace(i, input=_location(cfg, str(i.input), key="infer.input"))
    if not is_table_name(str(i.output)):
        i = replace(i, output=_location(cfg, str(i.output), key="infer.output"))
    _require(i.preview_images >= 0, "infer.preview_images", i.preview_images, "an integer >= 0 (0: no preview)")
    _require(
        not i.preview_images or not is_table_name(str(i.output)),
        "infer.preview_images", i.preview_images, f"0 with a table infer.output={i.output!r} (the preview goes beside a folder)",
    )
    if i.mode is not InferMode.batch:
        _require(i.limit is None, "infer.limit", i.limit, f"null with infer.mode={i.mode.value} (a limit is for batch runs)")
        _require(
            i.checkpoint is not None or not is_table_name(str(i.output)),
            "infer.checkpoint", i.checkpoint,
            f"a folder URL or path for the query's checkpoint: infer.output={i.output!r} is a table",
        )
        if i.checkpoint is not None:
            i = replace(i, checkpoint=_location(cfg, str(i.checkpoint), key="infer.checkpoint"))
    _require(
        bool(re.fullmatch(r"\d+(\.\d+)?\s*(ms|milliseconds?|s|seconds?|minutes?|hours?)", i.trigger_interval.strip())),
        "infer.trigger_interval", i.trigger_interval, "a duration such as '30 seconds' or '5 minutes'",
    )
    return i


def _validate_evaluate(cfg: Config, e: EvaluateConfig) -> EvaluateConfig:
    """``e`` checked, its locations as URLs; ``cfg`` gives where the job runs."""
    _require(bool(e.model), "evaluate.model", e.model, _MODEL_VALUES)
    _require(bool(e.dataset), "evaluate.dataset", e.dataset, "the URL of a dataset written by `petseg ingest`")
    _require(bool(e.output), "evaluate.output", e.output, "a folder URL or path for metrics.json and predictions.png")
    _require(e.split in ("train", "test"), "evaluate.split", e.split, "train or test")
    _require(e.batch_size >= 1, "evaluate.batch_size", e.batch_size, "an integer >= 1")
    _require(e.preview_images >= 0, "evaluate.preview_images", e.preview_images, "an integer >= 0 (0: no PNG grid)")
    return replace(
        e,
        model=_model_location(cfg, str(e.model), key="evaluate.model"),
        dataset=_location(cfg, str(e.dataset), key="evaluate.dataset"),
        output=_location(cfg, str(e.output), key="evaluate.output"),
    )


def _stage_locations(cfg: Config, section: str) -> tuple[dict[str, str], dict[str, str]]:
    """The folders a stage reads (inputs, the model) and those it writes, by key, as validated URLs."""
    if section == "data":
        inputs = {} if cfg.data.source is Source.synthetic else {"data.input": normalize_url(str(cfg.data.input),
                                                                                              key="data.input")}
        return inputs, {"data.dataset": str(cfg.data.dataset), "data.rejects": str(cfg.data.rejects)}
    if section == "train":
        return {"data.dataset": str(cfg.data.dataset)}, {"train.output_dir": str(cfg.train.output_dir)}
    if section == "infer":
        i = cfg.infer
        inputs = {"infer.model": str(i.model)} if not is_mlflow_uri(str(i.model)) else {}
        if i.input_format is not InputFormat.table:
            inputs["infer.input"] = str(i.input)
        outputs = {} if is_table_name(str(i.output)) else {"infer.output": str(i.output)}
        if i.checkpoint is not None:
            outputs["infer.checkpoint"] = str(i.checkpoint)
        return inputs, outputs
    if section == "evaluate":
        e = cfg.evaluate
        inputs = {"evaluate.dataset": str(e.dataset)}
        if not is_mlflow_uri(str(e.model)):
            inputs["evaluate.model"] = str(e.model)
        return inputs, {"evaluate.output": str(e.output)}
    return {}, {}


def _refuse_overlaps(cfg: Config, sections: tuple[str, ...]) -> None:
    """Refuse an output that is, contains or lies inside one of its stage's inputs or other outputs.

    Every output is published by replacing its folder whole, so an output over an input (a photo
    folder, a training run given as the model) would delete it, and two outputs in one folder would
    delete each other. Checked before Spark starts. The one nesting allowed is a streaming query's
    checkpoint inside its own output folder, where petseg puts it by default.
    """
    for section in sections:
        inputs, outputs = _stage_locations(cfg, section)
        for out_key, out in outputs.items():
            for other_key, other in [*inputs.items(), *outputs.items()]:
                if other_key == out_key:
                    continue
                relation = overlap(out, other)
                if relation is None or (out_key, other_key, relation) == ("infer.checkpoint", "infer.output", "lies inside"):
                    continue
                if (out_key, other_key, relation) == ("infer.output", "infer.checkpoint", "contains"):
                    continue
                what = "an input" if other_key in inputs else "another output"
                said = "is the same folder as" if relation == "is" else relation
                raise ConfigError(
                    f"{out_key}={out!r} {said} {other_key}={other!r}, {what} of the same job: petseg replaces "
                    f"{out_key}'s folder whole when it publishes, which would delete or mix with {other_key}; choose "
                    f"another {out_key}, one that neither is, holds nor lies inside {other_key}"
                )


def runs_on_one_machine(master: str | None) -> bool:
    """Whether executors share the driver's disk: ``local[...]`` and ``local-cluster[...]`` masters, or no
    master where pyspark's default (``local[*]``) applies, i.e. outside spark-submit and Databricks."""
    if master is None:
        return not env.spark_master_chosen_elsewhere()
    return master.startswith("local")


def require_shared_storage(cfg: Config, value: str, *, key: str) -> None:
    """Refuse a plain local path when executors may run on other machines.

    A path without a scheme names the driver's own disk (a relative one resolves against the driver's
    working directory, ``/databricks/driver`` in a Databricks job): executors elsewhere would write to
    their own disks and the driver would publish an empty folder. Databricks' ``/dbfs`` and
    ``/Volumes`` mounts are the same on every node; an explicit ``file://`` URL is the user saying
    that the folder is a mount every node shares (NFS).

    Raises
    ------
    ConfigError
        Naming ``key``, the value and the forms that work.
    """
    master, remote = cfg.spark.master, cfg.spark.remote
    one_machine = remote_is_this_machine(remote) if remote else runs_on_one_machine(master)
    if one_machine or not is_plain_path(value):
        return
    resolved = normalize_url(value, key=key)
    path = resolved[len("file://"):]
    if value.startswith("/") and on_shared_mount(path):
        return
    launcher = (f"spark.remote={remote!r}" if remote else f"spark.master={master!r}" if master is not None
                else "spark.master is null and spark-submit or Databricks chooses it, which")
    raise ConfigError(
        f"{key}={value!r} is a path on the driver's own disk ({path}), but {launcher} may run executors on other "
        "machines, each writing to and reading from its own disk; use storage every node sees (hdfs://, s3a://, "
        f"gs://, abfss://, dbfs:/ or /Volumes/...), write file://{path} if that folder is a mount every node "
        "shares (NFS), or set spark.master=local[*] to run on this machine"
    )


def _location(cfg: Config, value: str, *, key: str) -> str:
    """``value`` as the URL every stage uses, after :func:`require_shared_storage`."""
    require_shared_storage(cfg, value, key=key)
    return normalize_url(value, key=key)


def _validate_max_image_pixels(value: int) -> None:
    from PIL import Image

    # Pillow refuses larger images itself (DecompressionBombError), whatever petseg allows.
    most = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    _require(
        value >= 1 and (most is None or value <= most),
        "data.max_image_pixels",
        value,
        f"an integer from 1 to {most} (Pillow's own limit), in pixels (width x height)",
    )


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed; use {allowed}")
