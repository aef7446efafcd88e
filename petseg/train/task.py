"""The function MirroredStrategyRunner runs in each barrier task: one isolated training process per worker.

Why a process of its own: Spark reuses Python workers, and TensorFlow configures collective ops once
per process ("Collective ops must be configured at program startup"), so a second training run in a
reused worker, or on the driver in local mode, would fail. A fresh process also gets a clean
environment with TF_USE_LEGACY_KERAS=1 and the runner's TF_CONFIG and CUDA_VISIBLE_DEVICES. Spark's
TorchDistributor launches torchrun the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

from petseg import env, errors
from petseg.train.loop import PROGRESS_PREFIX
from petseg.train.progress import ProgressAddress, ProgressClient


def train_task(*, spec: dict[str, Any], progress_address: ProgressAddress | None) -> dict[str, Any]:
    """Run one worker's training in a fresh Python process and return its result.

    Top-level and picklable: it is shipped to the executors by the runner. ``spec`` carries plain
    data only (the config's sections as dicts, the row counts); the worker's rank comes from the barrier task.
    Progress lines go to the driver's server (``progress_address``, with the run's secret) and, only
    when they cannot, to the executor's log; the process's other output goes to the executor's log,
    less start-up chatter (see :func:`_is_noise`).
    """
    rank, workers = _rank_and_workers()
    with tempfile.TemporaryDirectory(prefix="petseg-train-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps({**spec, "rank": rank, "workers": workers, "result_file": str(result_file)}))
        code = f"from petseg.train.loop import main; main({str(job_file)!r})"
        client = ProgressClient(progress_address)
        tail: deque[str] = deque(maxlen=40)
        # A session of its own, so that ending it ends everything it started; and it dies with this
        # task's process, which Spark kills outright (SIGKILL) when it cancels a barrier stage.
        with subprocess.Popen([sys.executable, "-u", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env.training_process_environment(), start_new_session=True,
                              preexec_fn=_die_with_parent) as proc:
            # Which executor runs which worker, and the pid to look for: the executor's log says it once.
            print(f"[petseg worker {rank}] training process {proc.pid} started, worker {rank + 1} of {workers}",
                  file=sys.stderr, flush=True)
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    line = line.rstrip("\n")
                    if _is_noise(line):
                        continue
                    # On a local master the executor's log is the driver's console: a line the driver
                    # already logs as progress is not printed a second time, nor repeated in an error.
                    if line.startswith(PROGRESS_PREFIX) and client.send(line[len(PROGRESS_PREFIX):]):
                        continue
                    tail.append(line)
                    print(f"[petseg worker {rank}] {line}", file=sys.stderr, flush=True)  # the executor's log
            finally:
                # However the task ends (an error, Spark's interrupt), no training process outlives it
                # to write backups beside a retry's.
                _end_process_group(proc)
        client.close()
        if proc.returncode != 0:
            reason = errors.traceback_reason("\n".join(tail)) or "no Python traceback"
            raise RuntimeError(
                f"training worker {rank} of {workers} failed (exit code {proc.returncode}): "
                + _SHORT_EXCEPTION_NAME.sub(r"\1", reason) + "\nits last output:\n"
                + "\n".join(f"  | {line}" for line in tail)
            )
        return json.loads(result_file.read_text())


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it when the task's process dies (prctl PR_SET_PDEATHSIG).

    SIGKILL cannot be caught, so the task's ``finally`` never runs when Spark kills a Python worker;
    this is the only way the child learns of it. A no-op elsewhere (macOS laptops run local masters).
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _end_process_group(proc: subprocess.Popen, *, grace_seconds: float = 10.0) -> None:
    """End the training process and all it started: SIGTERM if it still runs, then SIGKILL to what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_seconds)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything it started and left behind, or itself after the grace
    proc.wait()


#: ``package.module.SomeError: message`` -> ``SomeError: message``.
_SHORT_EXCEPTION_NAME = re.compile(r"^(?:\w+\.)+(\w+: )")


def _is_noise(line: str) -> bool:
    """Whether a line of the training process would only bury the epochs: TensorFlow's start-up
    chatter, and petastorm's ``Cache cleanup complete.``, printed each time a reader stops."""
    return line == "Cache cleanup complete." or env.is_tensorflow_start_up_noise(line)


def _rank_and_workers() -> tuple[int, int]:
    """(rank, workers) from the barrier task; (0, 1) when the runner calls this on the driver (local mode)."""
    from pyspark import BarrierTaskContext, TaskContext

    if TaskContext.get() is None:
        return 0, 1
    context = BarrierTaskContext.get()
    return context.partitionId(), len(context.getTaskInfos())
