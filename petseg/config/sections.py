"""petseg's configuration: typed schema, YAML layers, dotted overrides, validation.

This is the one module of the library that reads the command line or the environment, and the one
that sets environment variables for Spark and TensorFlow. Everything else receives a :class:`Config`
(or a section of it) as an argument.

Layers, later wins: ``conf/base.yaml`` (every default) < ``--conf FILE`` (each in order, e.g.
``conf/local.yaml``) < ``key=value`` overrides. Unknown keys and bad values raise
:class:`ConfigError` naming the key, the bad value and what is allowed, before any Spark work.
"""

from __future__ import annotations

import enum
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from petseg.errors import ConfigError

#: The folder holding base.yaml and the overlays; inside the package so that a wheel carries it.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
BASE_CONF = CONF_DIR / "base.yaml"
LOCAL_CONF = CONF_DIR / "local.yaml"

#: tf-keras (Keras 2) must be selected before TensorFlow is first imported: Keras 3 fails in model.fit
#: under MultiWorkerMirroredStrategy with two workers.
LEGACY_KERAS_ENV = "TF_USE_LEGACY_KERAS"
#: URL schemes the dataset writer and the Petastorm reader both understand.
DATASET_SCHEMES = ("file", "hdfs", "viewfs", "s3a", "s3", "gs", "abfss", "dbfs")


class Source(str, enum.Enum):
    synthetic = "synthetic"
    oxford = "oxford"
    tfds = "tfds"


class Codec(str, enum.Enum):
    raw = "raw"
    jpeg = "jpeg"
    png = "png"


@dataclass
class SparkConfig:
    #: null leaves the master to spark-submit or the cluster (Databricks, YARN, Kubernetes).
    master: Optional[str] = MISSING
    app_name: str = MISSING
    #: Extra Spark confs, applied when petseg builds the session.
    conf: dict[str, str] = field(default_factory=dict)


@dataclass
class DataConfig:
    source: Source = MISSING
    input: Optional[str] = MISSING
    dataset: Optional[str] = MISSING
    rejects: Optional[str] = MISSING
    image_size: int = MISSING
    image_codec: Codec = MISSING
    synthetic_count: int = MISSING
    synthetic_seed: int = MISSING
    synthetic_test_fraction: float = MISSING
    tfds_name: str = MISSING
    tfds_download: bool = MISSING
    rowgroup_size_mb: int = MISSING
    min_row_groups_per_split: int = MISSING
    partitions: Optional[int] = MISSING


class InputFormat(str, enum.Enum):
    auto = "auto"
    petastorm = "petastorm"
    parquet = "parquet"
    table = "table"
    images = "images"


class Precision(str, enum.Enum):
    float32 = "float32"
    mixed_float16 = "mixed_float16"
    mixed_bfloat16 = "mixed_bfloat16"


@dataclass
class ModelConfig:
    n_depth: int = MISSING
    #: imagenet | none | a local .h5 path
    encoder_weights: str = MISSING
    #: auto | true | false
    freeze_encoder: str = MISSING
    #: auto | true | false (auto: the VGG16-BN variant when training from scratch)
    encoder_batch_norm: str = MISSING
    mixed_precision: Precision = MISSING
    jit_compile: bool = MISSING
    dice_weight: float = MISSING


@dataclass
class TrainConfig:
    num_slots: int = MISSING
    use_gpu: bool = MISSING
    local_mode: bool = MISSING
    epochs: int = MISSING
    batch_size: int = MISSING
    learning_rate: float = MISSING
    warmup_epochs: float = MISSING
    output_dir: Optional[str] = MISSING
    seed: int = MISSING
    shuffle_buffer: int = MISSING
    preview_images: int = MISSING
    stop_after_epoch: Optional[int] = MISSING


@dataclass
class InferConfig:
    model: Optional[str] = MISSING
    input: Optional[str] = MISSING
    input_format: InputFormat = MISSING
    image_column: str = MISSING
    key_column: Optional[str] = MISSING
    output: Optional[str] = MISSING
    batch_size: int = MISSING
    arrow_batch_rows: int = MISSING
    partitions: Optional[int] = MISSING
    limit: Optional[int] = MISSING
    model_resolution: bool = MISSING


@dataclass
class EvaluateConfig:
    model: Optional[str] = MISSING
    dataset: Optional[str] = MISSING
    split: str = MISSING
    output: Optional[str] = MISSING
    batch_size: int = MISSING
    preview_images: int = MISSING


@dataclass
class MlflowConfig:
    enabled: bool = MISSING
    tracking_uri: Optional[str] = MISSING
    experiment: Optional[str] = MISSING


@dataclass
class Config:
    spark: SparkConfig = field(default_factory=SparkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


def load(
    *, conf_files: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = (), job: str = "ingest"
) -> Config:
    """Build and validate a :class:`Config` from base.yaml, overlay files and dotted overrides.

    Parameters
    ----------
    conf_files
        YAML files merged over base.yaml, in order.
    overrides
        ``key=value`` strings such as ``data.image_size=64``.

    Raises
    ------
    ConfigError
        On an unknown key, a value of the wrong type or range, or a missing file.
    """
    layers = [OmegaConf.structured(Config), _load_yaml(BASE_CONF)]
    layers += [_load_yaml(Path(f)) for f in conf_files]
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value, e.g. data.image_size=64")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _explain(exc) from None
    assert isinstance(cfg, Config)
    validate(cfg, job=job)
    return cfg


#: Which config sections each job reads, so that e.g. ``petseg train`` needs no ingest input.
JOB_SECTIONS = {
    "ingest": ("data",),
    "train": ("model", "train"),
    "infer": ("infer",),
    "evaluate": ("evaluate",),
    "demo": ("data", "model", "train", "infer", "evaluate"),
}


def validate(cfg: Config, *, job: str = "ingest") -> None:
    """Check values that types alone cannot; raise :class:`ConfigError` naming the key and the fix."""
    sections = JOB_SECTIONS.get(job, tuple(JOB_SECTIONS["demo"]))
    if {"data", "train"} & set(sections):
        _require(bool(cfg.data.dataset), "data.dataset", cfg.data.dataset, "a dataset URL such as file:///tmp/pets")
        cfg.data.dataset = normalize_url(str(cfg.data.dataset), key="data.dataset")
    _require(cfg.data.image_size >= 8, "data.image_size", cfg.data.image_size, "an integer >= 8 (the recipe uses 128)")
    if "data" in sections:
        _validate_data(cfg)
    if "model" in sections:
        _validate_model(cfg)
    if "train" in sections:
        _validate_train(cfg)
    if "infer" in sections:
        _validate_infer(cfg)
    if "evaluate" in sections:
        _validate_evaluate(cfg)
    if cfg.mlflow.enabled and {"train", "infer"} & set(sections):
        import importlib.util

        _require(
            importlib.util.find_spec("mlflow") is not None,
            "mlflow.enabled",
            True,
            "false, or install MLflow first (pip install 'petseg[mlflow]'; Databricks runtimes have it)",
        )


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    _require(d.rowgroup_size_mb >= 1, "data.rowgroup_size_mb", d.rowgroup_size_mb, "an integer >= 1")
    _require(
        d.min_row_groups_per_split >= 1, "data.min_row_groups_per_split", d.min_row_groups_per_split, "an integer >= 1"
    )
    _require(d.partitions is None or d.partitions >= 1, "data.partitions", d.partitions, "null or an integer >= 1")
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
    d.rejects = normalize_url(d.rejects, key="data.rejects") if d.rejects else d.dataset.rstrip("/") + "_rejects"
    if d.input and d.source is Source.oxford:
        d.input = normalize_url(d.input, key="data.input")


def _validate_model(cfg: Config) -> None:
    m = cfg.model
    for key in ("freeze_encoder", "encoder_batch_norm"):
        value = str(getattr(m, key)).lower()
        _require(value in ("auto", "true", "false"), f"model.{key}", getattr(m, key), "auto, true or false")
        setattr(m, key, value)
    _require(m.dice_weight >= 0, "model.dice_weight", m.dice_weight, "a number >= 0 (0 = cross-entropy only)")
    from petseg.model.unet import validate_unet_args  # no TensorFlow import

    try:
        validate_unet_args(image_size=cfg.data.image_size, n_depth=m.n_depth, encoder_weights=m.encoder_weights)
    except ValueError as exc:
        raise ConfigError(f"model/data config: {exc}") from None


def _validate_train(cfg: Config) -> None:
    t = cfg.train
    _require(t.num_slots >= 1, "train.num_slots", t.num_slots, "an integer >= 1 (workers, or GPUs with use_gpu)")
    _require(t.epochs >= 1, "train.epochs", t.epochs, "an integer >= 1")
    _require(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "a positive number such as 1e-3")
    _require(t.warmup_epochs >= 0, "train.warmup_epochs", t.warmup_epochs, "a number >= 0")
    _require(t.shuffle_buffer >= 1, "train.shuffle_buffer", t.shuffle_buffer, "an integer >= 1")
    _require(t.preview_images >= 0, "train.preview_images", t.preview_images, "an integer >= 0")
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
    t.output_dir = normalize_url(t.output_dir, key="train.output_dir")


def _validate_infer(cfg: Config) -> None:
    i = cfg.infer
    _require(bool(i.model), "infer.model", i.model, "a training run's train.output_dir (or its model/ folder)")
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
    _require(i.limit is None or i.limit >= 1, "infer.limit", i.limit, "null or an integer >= 1")
    _require(i.partitions is None or i.partitions >= 1, "infer.partitions", i.partitions, "null or an integer >= 1")
    i.model = normalize_url(str(i.model), key="infer.model")
    if i.input_format is InputFormat.table or (i.input_format is InputFormat.auto and is_table_name(str(i.input))):
        i.input_format = InputFormat.table
    else:
        i.input = normalize_url(str(i.input), key="infer.input")
    if not is_table_name(str(i.output)):
        i.output = normalize_url(str(i.output), key="infer.output")


def _validate_evaluate(cfg: Config) -> None:
    e = cfg.evaluate
    _require(bool(e.model), "evaluate.model", e.model, "a training run's train.output_dir (or its model/ folder)")
    _require(bool(e.dataset), "evaluate.dataset", e.dataset, "the URL of a dataset written by `petseg ingest`")
    _require(bool(e.output), "evaluate.output", e.output, "a folder URL or path for metrics.json and predictions.png")
    _require(e.split in ("train", "test"), "evaluate.split", e.split, "train or test")
    _require(e.batch_size >= 1, "evaluate.batch_size", e.batch_size, "an integer >= 1")
    _require(e.preview_images >= 0, "evaluate.preview_images", e.preview_images, "an integer >= 0 (0: no PNG grid)")
    e.model = normalize_url(str(e.model), key="evaluate.model")
    e.dataset = normalize_url(str(e.dataset), key="evaluate.dataset")
    e.output = normalize_url(str(e.output), key="evaluate.output")


_TABLE_PART = r"(`[^`/]+`|[A-Za-z_]\w*)"
_TABLE_NAME = re.compile(rf"^{_TABLE_PART}(\.{_TABLE_PART}){{0,2}}$")


def is_table_name(value: str) -> bool:
    """Whether ``value`` names a catalog table (``name``, ``schema.name``, ``catalog.schema.name``).

    Anything with a slash or a URL scheme is a path; write ``./masks`` for a relative folder.
    """
    return "/" not in value and bool(_TABLE_NAME.match(value))


def normalize_url(url: str, *, key: str) -> str:
    """Turn a user's path into a URL both Spark and Petastorm open.

    Plain paths become absolute ``file://`` URLs; Databricks ``dbfs:/x`` and Unity Catalog
    ``/Volumes/...`` paths go through their local FUSE mounts (``file:///dbfs/x``,
    ``file:///Volumes/...``), which Petastorm's pyarrow reader can open and Spark can write.
    """
    if url.startswith("dbfs:/"):
        return "file:///dbfs/" + url[len("dbfs:/") :].lstrip("/")
    if "://" not in url:
        # Not Path.as_uri(): it percent-encodes, and Hadoop would then look for a file named
        # "%2A.jpg" instead of expanding the glob "*.jpg".
        return "file://" + str(Path(url).expanduser().absolute())
    scheme = url.split("://", 1)[0].lower()
    if scheme not in DATASET_SCHEMES:
        raise ConfigError(
            f"{key}={url!r} has the unsupported scheme {scheme!r}; use one of {', '.join(DATASET_SCHEMES)} "
            "or a plain local path"
        )
    return url


def to_dict(cfg: Config | Any) -> dict[str, Any]:
    """A plain, picklable dict of a config (or one section), enums as their string values."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # type: ignore[return-value]


# --------------------------------------------------------------------------- command line and environment

JOBS = ("ingest", "train", "infer", "evaluate", "demo")


@dataclass(frozen=True)
class Invocation:
    job: str
    config: Config


def parse_command_line(argv: Sequence[str] | None = None, *, jobs: Sequence[str] = JOBS) -> Invocation:
    """Parse ``petseg <job> [--conf FILE ...] [key=value ...]`` (``sys.argv[1:]`` when argv is None).

    ``demo`` implies ``--conf`` of the packaged local.yaml overlay, so it runs on a laptop as is.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: petseg {{{','.join(jobs)}}} [--conf FILE ...] [key=value ...]"
    if not args or args[0] in ("-h", "--help"):
        raise ConfigError(usage)
    job, rest = args[0], args[1:]
    if job not in jobs:
        raise ConfigError(f"unknown job {job!r}; choose one of {', '.join(jobs)}. {usage}")
    return Invocation(job=job, config=parse_job_arguments(rest, local=(job == "demo"), job=job))


def parse_job_arguments(args: Sequence[str], *, local: bool = False, job: str = "ingest") -> Config:
    """Parse ``[--conf FILE ...] [key=value ...]`` as the jobs/ entry points receive them."""
    conf_files: list[str] = [str(LOCAL_CONF)] if local else []
    overrides: list[str] = []
    it = iter(args)
    for arg in it:
        if arg == "--conf":
            value = next(it, None)
            if value is None:
                raise ConfigError("--conf needs a YAML file, e.g. --conf conf/local.yaml")
            conf_files.append(value)
        elif arg.startswith("--conf="):
            conf_files.append(arg.split("=", 1)[1])
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}; options are --conf FILE, then key=value overrides")
        else:
            overrides.append(arg)
    return load(conf_files=conf_files, overrides=overrides, job=job)


def training_process_environment(*, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for an isolated training process: this one's (TF_CONFIG and CUDA_VISIBLE_DEVICES
    from the runner included), with tf-keras selected."""
    env = dict(os.environ)
    env[LEGACY_KERAS_ENV] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO/WARNING lines would bury the epochs
    env.update(extra or {})
    return env


def visible_gpus() -> str | None:
    """CUDA_VISIBLE_DEVICES as the runner set it for this worker (None when unset)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def prepare_process_environment(*, master: str | None) -> None:
    """Set the variables Spark and TensorFlow read at start-up, before either starts in this process.

    TF_USE_LEGACY_KERAS selects tf-keras; PYSPARK_PYTHON makes local executors run this interpreter
    (else they run ``python3`` from PATH, which lacks petseg's packages). Values a user set are kept.
    """
    os.environ.setdefault(LEGACY_KERAS_ENV, "1")
    if master is None or master.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


# --------------------------------------------------------------------------- helpers


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML file to --conf")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections (spark:, data:, ...)")
    return loaded


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed; use {allowed}")


def _section_keys(key: str) -> list[str]:
    node: Any = OmegaConf.structured(Config)
    for part in key.split(".")[:-1]:
        if part not in node:
            return list(OmegaConf.structured(Config).keys())
        node = node[part]
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _explain(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    if isinstance(exc, ConfigKeyError):
        allowed = _section_keys(key)
        return ConfigError(f"unknown config key {key!r}; allowed keys here: {', '.join(allowed)}")
    if isinstance(exc, MissingMandatoryValue):
        return ConfigError(f"config key {key!r} has no value; set it in a --conf file or as {key}=...")
    if isinstance(exc, ValidationError):
        hint = ""
        node_cls = _field_type(key)
        if isinstance(node_cls, type) and issubclass(node_cls, enum.Enum):
            hint = f"; allowed values: {', '.join(m.value for m in node_cls)}"
        elif node_cls is not None:
            hint = f"; expected {getattr(node_cls, '__name__', node_cls)}"
        first_line = str(exc.msg).splitlines()[0]  # omegaconf appends its own key/type block
        return ConfigError(f"bad value for config key {key!r}: {first_line}{hint}")
    return ConfigError(f"config error at {key!r}: {getattr(exc, 'msg', exc)}")


def _field_type(key: str) -> Any:
    import dataclasses
    import typing

    cls: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = hints[part]
        args = [a for a in typing.get_args(cls) if a is not type(None)]
        if typing.get_origin(cls) is typing.Union and len(args) == 1:
            cls = args[0]
    return cls
