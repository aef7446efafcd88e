"""Models named by MLflow URIs: ``models:/name/version``, ``models:/name@alias``, ``runs:/id/model``.

The driver pins a URI to one exact, immutable model (:func:`pin`): an alias becomes the version it
points at when the job starts, so that every task of a job uses one model even if the alias moves
while it runs, and a missing name, version, alias or run fails there with a clear message. Tasks
fetch the pinned model (:func:`fetch`) into a folder on their node's local disk, keyed by the exact
URI and the tracking and registry servers: each node downloads a version once, whatever the number
of its Python workers and tasks, and a new version is a new folder. That folder is the user's own
(:func:`cache_root`), since a model is code its tasks run, and each download records what it was
fetched for, which is checked before it is used.

MLflow is imported only inside these functions: petseg runs without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from petseg.errors import InputError

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

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
#: Where tasks keep fetched models, under the node's temporary folder, followed by the user's uid.
_CACHE_FOLDER = "petseg-models"
#: What each fetched model's folder was fetched for (:func:`fetch`), written after the download is whole.
FETCHED_RECORD = ".petseg-fetched.json"
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
    #: What tells this registered version from another one given the same number (its run and creation
    #: time): a registered model deleted and registered again restarts at version 1. None for a run's or
    #: a logged model's URI, whose id is never reused.
    fingerprint: str | None = None


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
            registered = client.get_model_version_by_alias(found["name"], found["alias"])
            exact = f"models:/{found['name']}/{registered.version}"
            log.info("model %s is version %s: %s", uri, registered.version, exact)
            return MlflowModel(uri, exact, tracking_uri, registry_uri, found["name"], str(registered.version),
                               _fingerprint(registered))
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
            registered = client.get_model_version(found["name"], found["version"])
            return MlflowModel(uri, uri, tracking_uri, registry_uri, found["name"], found["version"],
                               _fingerprint(registered))
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
    """The local folder of ``model`` (its MLmodel and artifacts), downloaded once per node and user.

    The folder is used only if its record (:data:`FETCHED_RECORD`) says it was fetched for this exact
    model; anything else there (no record, another version's, a registry's earlier model of the same
    number) is downloaded again and replaced. The download goes to a fresh folder beside the cache
    entry, gets its record once it is whole, and is renamed into place, so that a worker never reads
    a half-written model and two workers racing for it both end with one whole copy.

    Raises
    ------
    InputError
        When MLflow cannot download it (credentials, network, a deleted version), or when the cache
        folder is not this user's own (:func:`cache_root`); the message says which model and servers,
        or which folder, and the fix.
    """
    root = cache_root()
    target = root / _cache_key(model)
    if _fetched_for(target, model):
        os.utime(target)  # in use: see prune_cache
        return target
    with _scratch(root) as scratch:
        downloaded = Path(_download(model, scratch))
        # Last, so that a folder with a record is a whole download: a killed worker's has none.
        (downloaded / FETCHED_RECORD).write_text(json.dumps(_record(model)))
        _publish(downloaded, target, model)
    prune_cache(root, keep=target)
    return target


def _publish(downloaded: Path, target: Path, model: MlflowModel) -> None:
    """Rename the whole download ``downloaded`` to ``target``, unless another worker's copy got there first.

    Under a lock, because what is at ``target`` may have to be set aside first, and a worker must never
    set aside a copy another worker just put there, which its tasks may be loading. A folder with the
    right record is never replaced, so workers that only read need no lock.
    """
    aside = None
    with _locked(target.parent):
        if _fetched_for(target, model):
            return  # ours goes with its scratch folder
        if os.path.lexists(target):
            aside = target.parent / f".stale-{uuid.uuid4().hex}"
            os.rename(target, aside)
        os.rename(downloaded, target)
    if aside is not None:
        log.warning("replaced %s, which was not fetched for %s", target, model.uri)
        shutil.rmtree(aside, ignore_errors=True)


def _record(model: MlflowModel) -> dict[str, str | None]:
    """What a folder of :func:`fetch` says it holds. The servers are in its key, not here: a tracking URI
    may carry a database password."""
    return {"uri": model.uri, "version": model.version, "fingerprint": model.fingerprint}


def _fetched_for(folder: Path, model: MlflowModel) -> bool:
    """Whether ``folder`` holds a whole download of exactly ``model``."""
    try:
        record = json.loads((folder / FETCHED_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return record == _record(model) and (folder / "MLmodel").is_file()


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock among this node's workers, on a file in ``folder`` (released when it is closed)."""
    import fcntl

    handle = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


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
    (a version never changes once made), in this user's :func:`cache_root` (which this only names)."""
    return _cache_path(os.getuid()) / _cache_key(model)


def cache_root(*, uid: int | None = None) -> Path:
    """The folder of a user's fetched models on this node, ``<tmp>/petseg-models-<uid>``: made private
    (0o700) when new, and checked on every use.

    Under the node's temporary folder, which is local disk on Databricks and YARN executors and never
    shared between nodes, so that renames stay atomic, and which outlives a job, so that a nightly job
    finds its model. That folder is every user's (``/tmp``), and a model is code (a SavedModel's graph):
    another user who made this folder first could put a model of their own in it for this user's
    tasks to run. So the folder must be a real folder (not a link), owned by ``uid``, and writable by
    no one else, or nothing is loaded from it. An error rather than a fresh folder elsewhere: the name
    is per user, so only someone else's deliberate doing (or a file system without owners) makes the
    check fail, and a private folder per Python worker would download each model once per worker and
    never be cleaned.

    Parameters
    ----------
    uid
        The user the folder is for; None: this process's (``os.getuid()``). Another value sees a folder
        this process made as another user would.

    Raises
    ------
    InputError
        When the folder cannot be made, or is a link, not a folder, another user's or writable by other
        users; the message names the folder and the fix.
    """
    uid = os.getuid() if uid is None else uid
    root = _cache_path(uid)
    fix = ("give Python a temporary folder of this user's own (TMPDIR; on executors spark.executorEnv.TMPDIR), "
           "then re-run")
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass  # an earlier task's, or someone else's: the check below tells
    except OSError as exc:
        raise InputError(f"the model cache {root} cannot be made ({exc.strerror}); {fix}") from None
    found = os.lstat(root)  # lstat: a link would be followed to wherever its maker chose
    if stat.S_ISLNK(found.st_mode):
        problem = f"is a symbolic link (to {os.readlink(root)})"
    elif not stat.S_ISDIR(found.st_mode):
        problem = "is not a folder"
    elif found.st_uid != uid:
        problem = f"belongs to uid {found.st_uid}, not to this process's uid {uid}"
    elif found.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"is writable by other users (mode {stat.S_IMODE(found.st_mode):#o})"
    else:
        return root
    raise InputError(
        f"the model cache {root} {problem}, so another user could put a model of their own in it for petseg to "
        f"load and run; nothing was loaded from it: remove it (as its owner, or root) or {fix}"
    )


def _cache_path(uid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"{_CACHE_FOLDER}-{uid}"


def _cache_key(model: MlflowModel) -> str:
    """The folder name of ``model`` in the cache: its exact URI and servers, and for a registered version
    its fingerprint, so that a version number registered again is another folder."""
    parts = [model.tracking_uri, model.registry_uri, model.uri] + ([model.fingerprint] if model.fingerprint else [])
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _fingerprint(registered: "ModelVersion") -> str:
    """A registered version's run and creation time, which its number does not tell apart from an earlier
    model's."""
    return f"{registered.run_id or ''}@{registered.creation_timestamp or ''}"


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
