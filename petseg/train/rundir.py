"""Where a training run works, when it may resume, and how its outputs replace the last run's.

A run trains in a working folder beside ``train.output_dir`` (``<output_dir>.petseg-partial``),
which holds its backup and history while it runs and survives a failure. A later run resumes it
only when it is the same run: the same config (every key that changes what is trained) on the
same dataset files. Anything else discards it, says so, and starts clean. A finished run's folder
replaces ``train.output_dir`` whole, so the folder never mixes two runs' model, metadata, history
and plots (the Databricks bundle trains into one folder every night).
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from petseg.config import DataConfig, ModelConfig, TrainConfig, to_dict
from petseg.io.fs import Storage
from petseg.io.publish import Staged, check_replaceable, replace, write_manifest
from petseg.train.loop import local_path

log = logging.getLogger(__name__)

#: The working folder's suffix, beside train.output_dir.
PARTIAL_SUFFIX = ".petseg-partial"
#: In the working folder: the run's id and identity.
RUN_FILE = "petseg-run.json"
#: Keys that do not change what a run trains: a run stopped by one resumes without it.
_NOT_IDENTITY = {"train.output_dir", "train.stop_after_epoch", "train.max_restarts", "train.preview_images"}


@dataclass(frozen=True)
class RunFolder:
    """A run's working folder (``work_dir``) and the folder it replaces when it finishes (``output_dir``)."""

    output_dir: str
    work_dir: str
    run_id: str
    resumed: bool
    note: str

    def published(self, path: str) -> str:
        """Where ``path``, inside the working folder, is once the run is published."""
        relative = Path(path).relative_to(local_path(self.work_dir))
        return str(local_path(self.output_dir) / relative)


def identity(*, data: DataConfig, model: ModelConfig, train: TrainConfig, dataset_fingerprint: str) -> dict[str, Any]:
    """What makes two runs the same run: the training keys and the dataset's files."""
    sections = {"data": {"dataset": data.dataset, "image_size": data.image_size},
                "model": to_dict(model), "train": to_dict(train)}
    keys = {f"{name}.{key}": value for name, values in sections.items() for key, value in values.items()}
    return {**{k: v for k, v in sorted(keys.items()) if k not in _NOT_IDENTITY}, "dataset files": dataset_fingerprint}


def open_run(storage: Storage, *, output_dir: str, identity: Mapping[str, Any]) -> RunFolder:
    """Resume the unfinished run in ``output_dir``'s working folder if it is this run, else start a new one.

    Raises
    ------
    InputError
        When ``output_dir`` exists and is not a finished petseg run (one with a manifest, or with
        the model metadata of a run published before manifests), which replacing it would delete.
    """
    check_replaceable(storage, output_dir, kind="run", key="train.output_dir")
    work_url = output_dir.rstrip("/") + PARTIAL_SUFFIX
    work = local_path(work_url)
    previous = _read_run_file(work / RUN_FILE)
    if previous is not None and previous.get("identity") == dict(identity):
        note = f"resuming the unfinished run {previous['run_id']} in {work} (same config and dataset)"
        return RunFolder(output_dir=output_dir, work_dir=work_url, run_id=previous["run_id"], resumed=True, note=note)
    run_id = uuid.uuid4().hex
    note = f"starting run {run_id} in {work}"
    if work.exists():
        why = _differences(previous.get("identity", {}), identity) if previous else "it has no run file"
        note = f"discarded the unfinished run {(previous or {}).get('run_id', '?')} in {work} ({why}); " + note
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / RUN_FILE).write_text(json.dumps({"run_id": run_id, "identity": dict(identity)}, indent=2))
    return RunFolder(output_dir=output_dir, work_dir=work_url, run_id=run_id, resumed=False, note=note)


def publish(storage: Storage, run: RunFolder) -> None:
    """Replace ``run.output_dir`` with the finished working folder, its manifest written last."""
    # Checked again (the folder may have changed while the run trained) before anything is removed: a
    # refusal leaves the finished run resumable, its backup holding every epoch.
    check_replaceable(storage, run.output_dir, kind="run", key="train.output_dir")
    work = local_path(run.work_dir)
    (work / RUN_FILE).unlink()
    shutil.rmtree(work / "backup", ignore_errors=True)  # kept until now (loop._backup_and_restore)
    write_manifest(storage, Staged(run.work_dir, rows={}), kind="run")
    replace(storage, run.work_dir, run.output_dir)


def _read_run_file(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _differences(before: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    return f"another run: {shown}"
