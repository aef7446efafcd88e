"""petseg's configuration: typed sections, YAML layers with ``key=value`` overrides, and checks.

``petseg.config.load`` is the way in: every job receives the :class:`Config` it returns (or a
section of it) as an argument, and nothing else in petseg reads configuration.
"""

from petseg.config.checks import JOB_SECTIONS, validate
from petseg.config.layers import (
    BASE_CONF,
    CONF_DIR,
    JOBS,
    LOCAL_CONF,
    Invocation,
    load,
    parse_command_line,
    parse_job_arguments,
)
from petseg.config.sections import (
    REDACTED,
    Codec,
    Config,
    DataConfig,
    EvaluateConfig,
    InferConfig,
    InferMode,
    InputFormat,
    MlflowConfig,
    ModelConfig,
    Precision,
    Source,
    SparkConfig,
    TrainConfig,
    is_secret_key,
    redact_secrets,
    to_dict,
)
from petseg.errors import ConfigError

__all__ = [
    "BASE_CONF", "CONF_DIR", "JOBS", "JOB_SECTIONS", "LOCAL_CONF", "Codec", "Config", "ConfigError", "DataConfig",
    "EvaluateConfig", "InferConfig", "InferMode", "InputFormat", "Invocation", "MlflowConfig", "ModelConfig", "Precision", "Source",
    "REDACTED", "SparkConfig", "TrainConfig", "is_secret_key", "load", "parse_command_line", "parse_job_arguments",
    "redact_secrets", "to_dict", "validate",
]
