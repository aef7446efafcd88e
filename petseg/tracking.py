"""MLflow tracking, when the config enables it: one run per training job and per inference job.

Logging happens on the driver: on Databricks it is the process with the workspace's tracking
credentials, and the training history reaches it from the chief. MLflow is imported only here and
only when enabled, so petseg runs without it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from petseg.config import REDACTED, MlflowConfig, is_secret_key
from petseg.io import urls

log = logging.getLogger(__name__)

#: MLflow caps a parameter value at 6,000 characters (500 in older servers); petseg's are short,
#: but a long path or list is cut rather than failing the run.
_MAX_PARAM = 500


@dataclass(frozen=True)
class TrackedRun:
    run_id: str
    experiment_id: str

    def log_history(self, history: list[Mapping[str, Any]]) -> None:
        """Each epoch's numeric metrics, at step = epoch."""
        import mlflow

        for entry in history:
            metrics = {k: float(v) for k, v in entry.items() if k != "epoch" and isinstance(v, (int, float))}
            mlflow.log_metrics(metrics, step=int(entry["epoch"]))

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})

    def log_artifacts(self, url: str, *, artifact_path: str | None = None) -> None:
        """A local file or folder (``file://`` URL or path) as artifacts of the run."""
        import mlflow

        path = urls.local_path(url) if urls.is_local(url) else None
        if path is None or not path.exists():
            log.warning("not logging %s to MLflow: it is not a local path on the driver", url)
        elif path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


@contextlib.contextmanager
def tracked_run(
    cfg: MlflowConfig | None, *, name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None
) -> Iterator[TrackedRun | None]:
    """An MLflow run for the block (None when tracking is off); ended as FAILED if the block raises."""
    if cfg is None or not cfg.enabled:
        yield None
        return
    import mlflow

    if cfg.tracking_uri:
        mlflow.set_tracking_uri(cfg.tracking_uri)
    if cfg.registry_uri:
        mlflow.set_registry_uri(cfg.registry_uri)
    if cfg.experiment:
        mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run(run_name=name, tags=dict(tags or {})) as run:
        mlflow.log_params(loggable_params(params))
        log.info("MLflow run %s (experiment %s)", run.info.run_id, run.info.experiment_id)
        yield TrackedRun(run.info.run_id, run.info.experiment_id)


def loggable_params(params: Mapping[str, Any]) -> dict[str, str]:
    """``params`` as MLflow takes them: strings, cut to MLflow's limit, credentials' values redacted."""
    return {k: REDACTED if is_secret_key(k) else str(v)[:_MAX_PARAM] for k, v in params.items()}


def flatten(sections: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{"model": {"n_depth": 5}}`` -> ``{"model.n_depth": 5}``, for MLflow params."""
    return {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}
