"""The typed sections of petseg's configuration: one dataclass per YAML section, every key typed.

``conf/base.yaml`` gives every key its default; :mod:`petseg.config.layers` merges the layers into
these classes, and :mod:`petseg.config.checks` checks what types alone cannot.
"""

from __future__ import annotations

import difflib
import enum
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Mapping, Optional, TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from petseg.errors import ConfigError


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
    #: A Spark Connect URL (sc://host:port): infer and evaluate run through it, and master is ignored.
    remote: Optional[str] = MISSING
    app_name: str = MISSING
    #: Extra Spark confs, applied when petseg builds the session.
    conf: dict[str, str] = field(default_factory=dict)


#: The reference recipe's image side, what ingest writes when data.image_size is null.
RECIPE_IMAGE_SIZE = 128


@dataclass
class DataConfig:
    source: Source = MISSING
    input: Optional[str] = MISSING
    dataset: Optional[str] = MISSING
    rejects: Optional[str] = MISSING
    #: null: ingest writes RECIPE_IMAGE_SIZE, training takes the dataset's stored size.
    image_size: Optional[int] = MISSING
    image_codec: Codec = MISSING
    #: Larger images (width x height) are refused by every stage before decoding.
    max_image_pixels: int = MISSING
    synthetic_count: int = MISSING
    synthetic_seed: int = MISSING
    synthetic_test_fraction: float = MISSING
    tfds_name: str = MISSING
    tfds_download: bool = MISSING
    rowgroup_size_mb: int = MISSING
    min_row_groups_per_split: int = MISSING
    partitions: Optional[int] = MISSING
    max_files_per_task: int = MISSING
    max_mb_per_task: int = MISSING


class InputFormat(str, enum.Enum):
    auto = "auto"
    petastorm = "petastorm"
    parquet = "parquet"
    table = "table"
    images = "images"


class InferMode(str, enum.Enum):
    batch = "batch"
    incremental = "incremental"
    stream = "stream"


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
    #: null: 1.0 when pretrained, the from-scratch recipe's width (petseg.model.unet) otherwise; resolved by checks
    width: Optional[float] = MISSING
    batch_norm_momentum: float = MISSING


@dataclass
class AugmentConfig:
    flip: bool = MISSING
    max_zoom: float = MISSING
    colour: float = MISSING


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
    max_restarts: int = MISSING
    augment: AugmentConfig = field(default_factory=AugmentConfig)


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
    arrow_batch_bytes: int = MISSING
    partitions: Optional[int] = MISSING
    limit: Optional[int] = MISSING
    model_resolution: bool = MISSING
    mode: InferMode = MISSING
    #: incremental, stream: the query's checkpoint; null: <output>/_checkpoint for a folder output
    checkpoint: Optional[str] = MISSING
    trigger_interval: str = MISSING
    preview_images: int = MISSING


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
    registry_uri: Optional[str] = MISSING
    experiment: Optional[str] = MISSING
    registered_model_name: Optional[str] = MISSING


@dataclass
class Config:
    spark: SparkConfig = field(default_factory=SparkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


def to_dict(cfg: Config | Any) -> dict[str, Any]:
    """A plain, picklable dict of a config (or one section), enums as their string values."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # type: ignore[return-value]


#: A section's class, for :func:`from_dict`.
Section = TypeVar("Section")


def from_dict(section: type[Section], values: Any, *, key: str) -> Section:
    """A typed section rebuilt from the plain dict :func:`to_dict` made of it (in a job file, say).

    Rebuilt as loading a config builds it: every key checked against the section's class, values
    converted to the declared types (enums from their string values).

    Parameters
    ----------
    section
        The section's class, e.g. :class:`ModelConfig`.
    values
        The section's keys and values, as :func:`to_dict` gives them; every key must be there.
    key
        The section's name, for messages: ``model``.

    Returns
    -------
    Section
        An instance of ``section``.

    Raises
    ------
    ConfigError
        When ``values`` is not a mapping, holds a key the section lacks, lacks one of its keys or holds
        a value of the wrong type; naming the key and the value. :func:`to_dict` of this petseg's
        section gives none of these: the values were written by another petseg version.
    """
    same_petseg = ("install the same petseg version where the config is written (the driver) and where it is "
                   "read (every executor)")
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section {key!r} is {values!r}, not a mapping of its keys to their values; "
                          f"{same_petseg}")
    try:
        rebuilt = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(section), values))
    except ConfigKeyError as exc:
        full_key = f"{key}.{exc.full_key}"
        holder = _section_holding(section, str(exc.full_key))
        known = [f.name for f in fields(holder)]
        close = difflib.get_close_matches(str(exc.key), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        value: Any = values
        for part in str(exc.full_key).split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        raise ConfigError(f"unknown config key {full_key!r} (set to {value!r}){hint}: {holder.__name__} has only "
                          f"{', '.join(known)}; {same_petseg}") from None
    except MissingMandatoryValue as exc:
        raise ConfigError(f"config key {key}.{exc.full_key} is missing from section {key!r}; {same_petseg}") from None
    except OmegaConfBaseException as exc:
        first_line = str(getattr(exc, "msg", exc)).splitlines()[0]  # omegaconf appends its own key/type block
        raise ConfigError(f"bad value for config key '{key}.{exc.full_key}': {first_line}; {same_petseg}") from None
    assert isinstance(rebuilt, section)
    return rebuilt


def _section_holding(section: type, dotted: str) -> type:
    """The (nested) section class that holds the dotted key ``dotted``: AugmentConfig for ``augment.flipp``."""
    for part in dotted.split(".")[:-1]:
        nested = {f.name: f.default_factory for f in fields(section)}.get(part)
        if not (isinstance(nested, type) and is_dataclass(nested)):
            break
        section = nested
    return section


#: What a credential's conf key holds: ``fs.s3a.secret.key``, ``fs.s3a.access.key``,
#: ``fs.azure.account.key.<account>``, ``fs.azure.sas.<container>.<account>``, ``*password*``, ``*token*``,
#: ``*.private.key*``, ``*credential*``; and keys named only by what they unlock: ``fs.s3a.encryption.key``,
#: ``fs.gs.encryption.key``, ``*connection_string`` (an Azure connection string carries the account key),
#: ``*api_key`` / ``*apikey``. A plain ``key`` (``infer.key_column``) is not one, and neither is a key about
#: encryption keys (``spark.io.encryption.keySizeBits``, ``fs.s3a.encryption.algorithm``): the encryption
#: key must end its word.
_SECRET_KEY = re.compile(
    r"secret|passw(or)?d|token|credential|private[._]?key|access[._]?key|account[._]key|(^|[._])sas([._]|$)"
    r"|encryption[._-]key([._-]|$)|connection[._-]?string|api[._-]?key",
    re.IGNORECASE,
)
#: What a redacted value reads as.
REDACTED = "<redacted>"


def is_secret_key(key: str) -> bool:
    """Whether a (dotted) config or Spark conf key names a credential, whose value must not be shipped or logged."""
    return bool(_SECRET_KEY.search(key))


def redact_secrets(values: Any, *, prefix: str = "") -> Any:
    """A copy of a nested dict (a config as :func:`to_dict` gives it) with every credential's value redacted.

    Keys are judged by their full dotted path (``spark.conf.fs.s3a.secret.key``), by :func:`is_secret_key`.
    """
    if not isinstance(values, dict):
        return values
    redacted = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        redacted[key] = REDACTED if is_secret_key(path) and value is not None else redact_secrets(value, prefix=path)
    return redacted
