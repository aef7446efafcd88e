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
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

#: The folder holding base.yaml and the overlays; inside the package so that a wheel carries it.
CONF_DIR = Path(__file__).resolve().parent / "conf"
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
    dataset: str = MISSING
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


@dataclass
class Config:
    spark: SparkConfig = field(default_factory=SparkConfig)
    data: DataConfig = field(default_factory=DataConfig)


class ConfigError(ValueError):
    """A configuration that petseg cannot run; the message names the key, the value and the fix."""


def load(*, conf_files: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = ()) -> Config:
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
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check values that types alone cannot; raise :class:`ConfigError` naming the key and the fix."""
    d = cfg.data
    _require(d.image_size >= 8, "data.image_size", d.image_size, "an integer >= 8 (the recipe uses 128)")
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
    _require(bool(d.dataset), "data.dataset", d.dataset, "an output URL such as file:///tmp/pets")
    d.dataset = normalize_url(d.dataset, key="data.dataset")
    d.rejects = normalize_url(d.rejects, key="data.rejects") if d.rejects else d.dataset.rstrip("/") + "_rejects"
    if d.input and d.source is Source.oxford:
        d.input = normalize_url(d.input, key="data.input")


def normalize_url(url: str, *, key: str) -> str:
    """Turn a user's path into a URL both Spark and Petastorm open.

    Plain paths become absolute ``file://`` URLs; Databricks ``dbfs:/x`` and Unity Catalog
    ``/Volumes/...`` paths go through their local FUSE mounts (``file:///dbfs/x``,
    ``file:///Volumes/...``), which Petastorm's pyarrow reader can open and Spark can write.
    """
    if url.startswith("dbfs:/"):
        return "file:///dbfs/" + url[len("dbfs:/") :].lstrip("/")
    if "://" not in url:
        return Path(url).expanduser().absolute().as_uri()
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


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# --------------------------------------------------------------------------- command line and environment

JOBS = ("ingest", "demo")


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
    return Invocation(job=job, config=parse_job_arguments(rest, local=(job == "demo")))


def parse_job_arguments(args: Sequence[str], *, local: bool = False) -> Config:
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
    return load(conf_files=conf_files, overrides=overrides)


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
