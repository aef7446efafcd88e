"""Models named by MLflow URIs: ``models:/name/version``, ``models:/name@alias``, ``runs:/id/model``.

The driver pins a URI to one exact, immutable model (:func:`pin`): an alias becomes the version it
points at when the job starts, so that every task of a job uses one model even if the alias moves
while it runs, and a missing name, version, alias or run fails there with a clear message. Tasks
fetch the pinned model (:func:`fetch`) into a folder on their node's local disk, keyed by the exact
URI and the tracking and registry servers: each node downloads a version once, whatever the number
of its Python workers and tasks, and a new version is a new folder.

MLflow is imported only inside these functions: petseg runs without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from petseg.errors import InputError

log = logging.getLogger(__name__)

#: The name under which training logs its MLflow model, in its run (``runs:/<run id>/model``).
MODEL_NAME = "model"
#: The key of ``petseg-model.json`` among the pyfunc's artifacts; its folder is a petseg run folder.
METADATA_ARTIFACT = "metadata"
#: The SavedModel's key among the pyfunc's artifacts.
SAVED_MODEL_ARTIFACT = "model"

_VERSION = re.compile(r"models:/(?P<name>[^/@]+)/(?P<version>[^/]+)")
_ALIAS = re.compile(r"models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)")
_LOGGED = re.compile(r"models:/(?P<model_id>m-[0-9a-f]+)")
_RUN = re.compile(r"runs:/(?P<run_id>[^/]+)/(?P<path>.+)")
#: Where tasks keep fetched models, under the node's temporary folder.
_CACHE_FOLDER = "petseg-models"
#: Days after which a fetched model no task has used is deleted, when its node fetches another: a
#: week keeps what a weekly job or a paused notebook comes back to, and bounds a nightly pipeline's
#: node to seven versions.
CACHE_DAYS = 7


@dataclass(frozen=True)
class MlflowModel:
    """An MLflow model pinned to one exact URI, with the servers that hold it.

    Picklable and small: the driver ships it to every task, which fetches the model from it.
    """

    #: What the user asked for (``models:/pets@champion``).
    requested: str
    #: The exact model (``models:/pets/3``, ``runs:/<run id>/model``, ``models:/m-<id>``).
    uri: str
    tracking_uri: str
    registry_uri: str
    #: The registered model's name and version, when the URI names one.
    name: str | None = None
    version: str | None = None


def pin(uri: str, *, tracking_uri: str | None = None, registry_uri: str | None = None) -> MlflowModel:
    """Resolve ``uri`` on the driver to one exact model, checking that it exists.

    Parameters
    ----------
    uri
        ``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``runs:/<run id>/<path>`` or
        ``models:/m-<logged model id>``; Unity Catalog names read ``models:/catalog.schema.model/1``.
    tracking_uri, registry_uri
        The MLflow servers (``mlflow.tracking_uri``, ``mlflow.registry_uri``); None takes MLflow's
        defaults on the driver (``MLFLOW_TRACKING_URI``, the Databricks workspace, Unity Catalog),
        which tasks are then given explicitly.

    Raises
    ------
    InputError
        When the URI has another form, or its name, version, alias or run does not exist.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    if registry_uri is None:
        with _servers(tracking_uri):  # MLflow's own default for it: the tracking server, or Unity Catalog
            registry_uri = mlflow.get_registry_uri()
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
    uri = str(uri).rstrip("/")
    where = f"(tracking {tracking_uri}, registry {registry_uri})"
    try:
        if found := _ALIAS.fullmatch(uri):
            version = client.get_model_version_by_alias(found["name"], found["alias"]).version
            exact = f"models:/{found['name']}/{version}"
            log.info("model %s is version %s: %s", uri, version, exact)
            return MlflowModel(uri, exact, tracking_uri, registry_uri, found["name"], str(version))
        if found := _LOGGED.fullmatch(uri):
            client.get_logged_model(found["model_id"])
            return MlflowModel(uri, uri, tracking_uri, registry_uri)
        if found := _VERSION.fullmatch(uri):
            if not found["version"].isdigit():
                raise InputError(
                    f"model {uri!r} names the version {found['version']!r}: petseg takes a version number or an "
                    f"alias, which pin one model (stages and 'latest' move); use models:/{found['name']}/<version> or "
                    f"models:/{found['name']}@<alias>"
                )
            client.get_model_version(found["name"], found["version"])
            return MlflowModel(uri, uri, tracking_uri, registry_uri, found["name"], found["version"])
        if found := _RUN.fullmatch(uri):
            client.get_run(found["run_id"])
            return MlflowModel(uri, uri, tracking_uri, registry_uri)
    except MlflowException as exc:
        raise InputError(
            f"model {uri!r} was not found in MLflow {where}: {_first_line(exc)}; check the name, version or alias "
            "(or set mlflow.tracking_uri / mlflow.registry_uri to the servers that hold it)"
        ) from None
    raise InputError(
        f"model {uri!r} is not an MLflow model URI petseg reads; use models:/<name>/<version>, models:/<name>@<alias> "
        "or runs:/<run id>/model"
    )


def fetch(model: MlflowModel) -> Path:
    """The local folder of ``model`` (its MLmodel and artifacts), downloaded once per node.

    The download goes to a fresh folder beside the cache entry and is renamed into place when
    complete, so that a worker never reads a half-written model and two workers racing for it both
    end with one whole copy.

    Raises
    ------
    InputError
        When MLflow cannot download it (credentials, network, a deleted version); the message says
        which model and servers.
    """
    target = cache_folder(model)
    if (target / "MLmodel").is_file():
        os.utime(target)  # in use: see prune_cache
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _scratch(target.parent) as scratch:
        downloaded = _download(model, scratch)
        try:
            os.rename(downloaded, target)
        except OSError:
            if not (target / "MLmodel").is_file():  # not another worker's copy: a real failure
                raise
    prune_cache(target.parent, keep=target)
    return target


def prune_cache(root: Path, *, keep: Path, max_age_days: float = CACHE_DAYS) -> list[Path]:
    """Delete the fetched models under ``root`` that no task has used for ``max_age_days``; return them.

    A long-lived cluster that segments each night's new version would otherwise keep every version
    it ever fetched on every node. Each fetch marks its folder used (its mtime), so a model a job is
    using is never this old; a download a killed worker left behind is removed the same way.
    """
    horizon = time.time() - max_age_days * 86400
    removed = []
    for entry in root.iterdir():
        try:
            stale = entry != keep and entry.is_dir() and entry.stat().st_mtime < horizon
        except OSError:
            continue  # another worker removed it meanwhile
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    if removed:
        log.info("removed %d model(s) unused for %g days from %s", len(removed), max_age_days, root)
    return removed


def cache_folder(model: MlflowModel) -> Path:
    """Where :func:`fetch` keeps ``model`` on this node: one folder per exact model and pair of servers
    (a version never changes once made), under the node's temporary folder, which is local disk on
    Databricks and YARN executors and never shared between nodes, so that the rename stays atomic."""
    key = hashlib.sha256("\n".join([model.tracking_uri, model.registry_uri, model.uri]).encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / _CACHE_FOLDER / key


@contextlib.contextmanager
def _scratch(parent: Path) -> Iterator[Path]:
    path = parent / f".download-{uuid.uuid4().hex}"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _download(model: MlflowModel, dst: Path) -> str:
    """Download ``model`` under ``dst``; return the folder that holds its MLmodel."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        with _servers(model.tracking_uri, model.registry_uri):
            path = mlflow.artifacts.download_artifacts(artifact_uri=model.uri, dst_path=str(dst))
    except MlflowException as exc:
        raise InputError(
            f"model {model.uri} could not be downloaded from MLflow (tracking {model.tracking_uri}, registry "
            f"{model.registry_uri}): {_first_line(exc)}; give the executors access to it (credentials, network)"
        ) from None
    if not (Path(path) / "MLmodel").is_file():
        raise InputError(f"{model.uri} is not an MLflow model (no MLmodel file); name the model, not one of its files")
    return path


@contextlib.contextmanager
def _servers(tracking_uri: str, registry_uri: str | None = None) -> Iterator[None]:
    """MLflow's process-wide tracking (and registry) URI set for the block, and put back after.

    ``download_artifacts(tracking_uri=, registry_uri=)`` does not reach the registry lookup of a
    ``models:/`` URI outside Unity Catalog, which reads ``mlflow.get_registry_uri()`` (mlflow/mlflow#18313,
    open; ``ModelsArtifactRepository._get_model_uri_infos``), and MLflow derives a default registry
    only from the process's tracking URI. Nothing changes when the process already uses these
    servers (a notebook or job on its defaults); tasks run in Spark's Python workers, where nothing
    else uses the setting meanwhile.
    """
    import mlflow

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    if tracking_uri == before[0] and registry_uri in (None, before[1]):
        yield
        return
    mlflow.set_tracking_uri(tracking_uri)
    if registry_uri is not None:
        mlflow.set_registry_uri(registry_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        if registry_uri is not None:
            mlflow.set_registry_uri(before[1])


def run_folder(model_dir: Path, *, uri: str) -> Path:
    """The petseg run folder inside a downloaded MLflow model: where its pyfunc keeps ``petseg-model.json``.

    Raises
    ------
    InputError
        When the MLflow model is not one petseg logged.
    """
    import yaml

    flavors = (yaml.safe_load((model_dir / "MLmodel").read_text()) or {}).get("flavors", {})
    artifacts = flavors.get("python_function", {}).get("artifacts") or {}
    if METADATA_ARTIFACT not in artifacts:
        raise InputError(
            f"{uri} is an MLflow model that petseg did not log (its pyfunc has no {METADATA_ARTIFACT!r} artifact); "
            "name a model that `petseg train` logged with mlflow.enabled=true"
        )
    return (model_dir / artifacts[METADATA_ARTIFACT]["path"]).parent


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
