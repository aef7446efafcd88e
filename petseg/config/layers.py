"""Building a :class:`~petseg.config.sections.Config` from layers, and parsing the command line.

Layers, later wins: ``conf/base.yaml`` (every default) < ``--conf FILE`` (each in order, e.g.
``conf/local.yaml``) < ``key=value`` overrides. Unknown keys and bad values raise
:class:`~petseg.errors.ConfigError` naming the key, the bad value and what is allowed, before any
Spark work. This is the one module of the library that reads the command line.
"""

from __future__ import annotations

import difflib
import enum
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from petseg.config.checks import validate
from petseg.config.sections import Config
from petseg.errors import ConfigError

#: The folder holding base.yaml and the overlays; inside the package so that a wheel carries it.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
BASE_CONF = CONF_DIR / "base.yaml"
LOCAL_CONF = CONF_DIR / "local.yaml"
#: Overrides under this prefix set one Spark conf each, whatever dots its key holds.
SPARK_CONF_PREFIX = "spark.conf."


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
    # A Spark conf's own key holds dots (spark.conf.spark.driver.memory=1g): one key, not a path.
    spark_confs = {o.split("=", 1)[0][len(SPARK_CONF_PREFIX):]: o.split("=", 1)[1]
                   for o in overrides if o.startswith(SPARK_CONF_PREFIX)}
    try:
        layers.append(OmegaConf.from_dotlist([o for o in overrides if not o.startswith(SPARK_CONF_PREFIX)]))
        layers.append(OmegaConf.create({"spark": {"conf": spark_confs}}))
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _explain(exc) from None
    assert isinstance(cfg, Config)
    return validate(cfg, job=job)


JOBS = ("ingest", "train", "infer", "evaluate", "demo")


@dataclass(frozen=True)
class Invocation:
    """A parsed command line: the job and its config, or ``text`` to print instead of running (help,
    ``--print-config``)."""

    job: str
    config: Config | None
    text: str | None = None


#: What asks for help, anywhere on a command line.
HELP_FLAGS = ("-h", "--help")
#: What prints the resolved config instead of running the job.
PRINT_CONFIG_FLAG = "--print-config"


def parse_command_line(argv: Sequence[str] | None = None, *, jobs: Sequence[str] = JOBS) -> Invocation:
    """Parse ``petseg <job> [--conf FILE ...] [key=value ...]`` (``sys.argv[1:]`` when argv is None).

    ``petseg --help`` lists the stages, ``petseg <job> --help`` the keys the job reads, and
    ``--print-config`` the validated config of the command line; each comes back as ``text``.
    ``demo`` implies ``--conf`` of the packaged local.yaml overlay, so it runs on a laptop as is.
    """
    from petseg.config.describe import overview, resolved_yaml, stage_help

    args = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: petseg {{{','.join(jobs)}}} [--conf FILE ...] [key=value ...]"
    if not args:
        raise ConfigError(f"{usage}; petseg --help lists the stages")
    if args[0] in HELP_FLAGS:
        return Invocation(job="help", config=None, text=overview())
    job, rest = args[0], args[1:]
    if job not in jobs:
        close = difflib.get_close_matches(job, jobs, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown job {job!r}; {hint}choose one of {', '.join(jobs)} (petseg --help lists them)")
    if any(a in HELP_FLAGS for a in rest):
        return Invocation(job=job, config=None, text=stage_help(job, base_yaml=BASE_CONF.read_text()))
    cfg = parse_job_arguments([a for a in rest if a != PRINT_CONFIG_FLAG], local=(job == "demo"), job=job)
    return Invocation(job=job, config=cfg, text=resolved_yaml(cfg) if PRINT_CONFIG_FLAG in rest else None)


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
            raise ConfigError(f"unknown option {arg!r}; options are --conf FILE, --print-config and --help, then "
                              "key=value overrides")
        else:
            overrides.append(arg)
    return load(conf_files=conf_files, overrides=overrides, job=job)


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
        from petseg.config.describe import nearest_keys

        allowed = _section_keys(key)
        nearest = " or ".join(repr(k) for k in nearest_keys(key))
        hint = f"did you mean {nearest}? " if nearest else ""
        return ConfigError(f"unknown config key {key!r}; {hint}allowed keys here: {', '.join(allowed)}")
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
