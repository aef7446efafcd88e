"""The process environment Spark and TensorFlow read at start-up, set before either starts.

With :mod:`petseg.config.layers` (the command line), this is the one module of the library that
reads or sets environment variables.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import TYPE_CHECKING, Iterator

from petseg.errors import InputError

if TYPE_CHECKING:
    import zipimport

#: tf-keras (Keras 2) must be selected before TensorFlow is first imported: Keras 3 fails in model.fit
#: under MultiWorkerMirroredStrategy with two workers.
LEGACY_KERAS_ENV = "TF_USE_LEGACY_KERAS"
#: petastorm 0.13.1's modules that call pyarrow's deprecated API (uber/petastorm#800, #805).
PETASTORM_WARNING_MODULES = ("petastorm.fs_utils", "petastorm.utils", "petastorm.etl.dataset_metadata",
                             "petastorm.py_dict_reader_worker", "petastorm.arrow_reader_worker")
#: TensorFlow's C++ log level: 2 keeps errors and drops INFO and WARNING lines logged after start-up.
TF_LOG_LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"

#: A line of TensorFlow's C++ log in absl's format: severity, date, time (before absl is initialised, the
#: seconds count from 1970), thread, file:line.
_ABSL_LINE = re.compile(r"^(?P<severity>[IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] (?P<text>.*)$")
#: Start-up lines outside that format: absl's own warning, and the second line of cpu_feature_guard's INFO.
_START_UP_LINES = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
                   "To enable the following instructions: ")


def training_process_environment(*, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for an isolated training process: this one's (TF_CONFIG and CUDA_VISIBLE_DEVICES
    from the runner included), with tf-keras selected."""
    env = dict(os.environ)
    env[LEGACY_KERAS_ENV] = "1"
    env.setdefault(TF_LOG_LEVEL_ENV, "2")  # TensorFlow's C++ INFO/WARNING lines would bury the epochs
    env.update(extra or {})
    return env


#: TensorFlow reads these when it first initialises its GPUs: which devices CUDA shows it, and
#: whether it may grow its memory as needed rather than take all of every visible GPU's at once.
CUDA_DEVICES_ENV = "CUDA_VISIBLE_DEVICES"
GPU_GROWTH_ENV = "TF_FORCE_GPU_ALLOW_GROWTH"


class GpuPinError(InputError):
    """A Python worker pinned to some GPUs was given a task that Spark assigned to others (an
    InputError, as training's missing GPU confs are: the job ends with one line naming the fix)."""


#: The GPUs :func:`pin_task_gpus` pinned this process to (None: not pinned).
_pinned: str | None = None


def prepare_task_environment() -> str | None:
    """Ready a Spark task's Python worker for TensorFlow; call it in the task before TensorFlow is imported.

    Selects tf-keras and quiets TensorFlow's C++ log in the worker itself, where the cluster may give
    executors neither: serverless compute and standard-access clusters take no ``spark.executorEnv.*``,
    and Keras 3 cannot load the model tf-keras saved. Then pins the task's GPUs (:func:`pin_task_gpus`),
    whose addresses it returns, and keeps the worker from re-reading pyspark's zips at every task
    (:func:`reread_zips_only_when_changed`).
    """
    _tensorflow_defaults()
    reread_zips_only_when_changed()
    return pin_task_gpus()


def reread_zips_only_when_changed() -> None:
    """Have this process's zip importers re-read their archive, when a task starts, only if it changed.

    Workaround for SPARK-54744 (fixed in Spark 4.2) with CPython gh-103200 (fixed in Python 3.13):
    PySpark's worker calls ``importlib.invalidate_caches()`` at the start of every task, and before
    Python 3.13 each zip importer then re-reads its whole archive's directory: one importer per
    package imported from pyspark.zip and py4j's zip, which Spark puts on its workers' path (14 in a
    worker that has segmented a batch). Measured on Spark 3.5 and 4.0: 180-200 ms a task, 0.4 ms a
    photo at 4,000 photos in tasks of 1,024 files, a fifth of the workers' CPU. Here each existing
    zip importer re-reads only when its file's mtime, size or inode changed since this last ran, so
    an archive replaced on disk is still read anew; importers created later are taken at the next task.
    """
    if sys.version_info >= (3, 13):  # invalidate_caches only drops the cached directory there
        return
    import zipimport

    for importer in list(sys.path_importer_cache.values()):
        if isinstance(importer, zipimport.zipimporter) and "invalidate_caches" not in vars(importer):
            importer.invalidate_caches = _RereadIfChanged(importer)  # type: ignore[method-assign]


class _RereadIfChanged:
    """A zip importer's ``invalidate_caches`` that re-reads its archive only when the file changed."""

    def __init__(self, importer: "zipimport.zipimporter") -> None:
        self.importer = importer
        self.stamp = self._stamp()

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self.importer.archive)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def __call__(self) -> None:
        stamp = self._stamp()
        if stamp is None or stamp != self.stamp:
            self.stamp = stamp
            type(self.importer).invalidate_caches(self.importer)


def _tensorflow_defaults() -> None:
    """tf-keras selected and TensorFlow's C++ log at errors, in this process and those it starts,
    unless a user set either."""
    os.environ.setdefault(LEGACY_KERAS_ENV, "1")
    os.environ.setdefault(TF_LOG_LEVEL_ENV, "2")


def pin_task_gpus() -> str | None:
    """Show this process's TensorFlow only the GPUs Spark assigned to the running task; call it in a
    task before TensorFlow is imported.

    Sets CUDA_VISIBLE_DEVICES to the task's ``gpu`` addresses (``TaskContext.resources()``) and turns
    on memory growth, so that tasks sharing a node never land on GPU 0 together, each holding all
    of its memory. A process cannot re-pin: CUDA reads the variable once. Spark reuses Python
    workers across tasks and hands a reused worker whatever address is free (verified: one worker
    of a two-GPU executor ran tasks on GPU 0 and on GPU 1), so a task assigned other GPUs than the
    worker's pin fails here rather than run on another task's GPU; the inference and evaluation jobs
    refuse such set-ups before they start (one GPU per executor, or ``spark.python.worker.reuse=false``).

    Returns
    -------
    str or None
        The addresses this process now sees (``"1"``, ``"0,1"``), or None for a task without GPUs,
        whose environment is left alone.

    Raises
    ------
    GpuPinError
        When this process was pinned to other GPUs by an earlier task.
    """
    try:
        from pyspark import TaskContext
    except ImportError:  # no Spark, so no task: the MLflow model in a serving environment
        return None

    global _pinned
    context = TaskContext.get()
    gpu = context.resources().get("gpu") if context is not None else None
    if gpu is None:
        return None
    wanted = ",".join(gpu.addresses)
    if _pinned is None:
        os.environ[CUDA_DEVICES_ENV] = wanted
        os.environ[GPU_GROWTH_ENV] = "true"
        _pinned = wanted
    elif _pinned != wanted:
        raise GpuPinError(
            f"this Python worker's TensorFlow is pinned to GPU {_pinned}, but Spark assigned GPU {wanted} to the task, "
            "and a process cannot move to another GPU; give each executor one GPU "
            "(spark.executor.resource.gpu.amount=1) or set spark.python.worker.reuse=false"
        )
    return wanted


def visible_gpus() -> str | None:
    """CUDA_VISIBLE_DEVICES as the runner set it for this worker (None when unset)."""
    return os.environ.get(CUDA_DEVICES_ENV)


def prepare_process_environment(*, master: str | None) -> None:
    """Set the variables Spark and TensorFlow read at start-up, before either starts in this process.

    TF_USE_LEGACY_KERAS selects tf-keras; TF_CPP_MIN_LOG_LEVEL and PYTHONWARNINGS quiet TensorFlow's
    C++ log and petastorm's FutureWarnings in the processes this one starts (a local master's Python
    workers, training processes). For a local master (``local[...]``), and for none outside
    spark-submit and Databricks (:func:`spark_master_chosen_elsewhere`), where pyspark's default is
    ``local[*]``, PYSPARK_PYTHON makes the executors run this interpreter (else they run ``python3``
    from PATH, which lacks petseg's packages when ``.venv/bin/petseg`` runs without the venv
    activated). Any other master (YARN, Kubernetes, a standalone cluster), or none chosen by a
    launcher, has executors on other machines, where this interpreter's path means nothing: their
    Python is the cluster's to set (``spark.pyspark.python``). Values a user set are kept.

    Parameters
    ----------
    master
        ``spark.master``; None when the config leaves it to the launcher or to pyspark's default.
    """
    _tensorflow_defaults()  # inherited by a local master's Python workers
    # petastorm's own tasks (materialize_dataset's, the readers') run in Python workers, where
    # petseg cannot call warnings.filterwarnings first; see ignore_petastorm_pyarrow_deprecations.
    os.environ.setdefault("PYTHONWARNINGS", ",".join(f"ignore::FutureWarning:{m}" for m in PETASTORM_WARNING_MODULES))
    local = not spark_master_chosen_elsewhere() if master is None else master.startswith("local")
    if local:
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


def spark_master_chosen_elsewhere() -> bool:
    """Whether a null ``spark.master`` is left to a launcher that may place executors on other machines.

    spark-submit starts the driver's Python with ``PYSPARK_GATEWAY_PORT`` set (pyspark's own
    java_gateway.py reads it), and every Databricks driver has ``DATABRICKS_RUNTIME_VERSION``. Anywhere
    else a session built without a master is pyspark's default, ``local[*]``, on this machine.
    """
    return "PYSPARK_GATEWAY_PORT" in os.environ or "DATABRICKS_RUNTIME_VERSION" in os.environ


def on_databricks() -> bool:
    """Whether this is a Databricks driver, whose Spark session belongs to the cluster, not to petseg."""
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def is_tensorflow_start_up_noise(line: str) -> bool:
    """Whether a line of output is TensorFlow's start-up chatter, which would bury the job's own lines.

    TF_CPP_MIN_LOG_LEVEL cannot silence the lines TensorFlow logs while it loads: absl writes every
    message logged before ``absl::InitializeLog()`` to stderr whatever its level (abseil/abseil-cpp#1957).
    So INFO and WARNING lines in absl's format are noise, and so is a failed cuInit where no GPU is
    asked for (CUDA_VISIBLE_DEVICES unset or empty: a CPU machine, or a worker the runner gave none).
    Other errors are not.
    """
    if line.startswith(_START_UP_LINES):
        return True
    match = _ABSL_LINE.match(line)
    if match is None:
        return False
    return match["severity"] in "IW" or (not visible_gpus() and "failed call to cuInit" in match["text"])


@contextlib.contextmanager
def quiet_tensorflow_start_up() -> Iterator[None]:
    """Hold back TensorFlow's start-up chatter (see :func:`is_tensorflow_start_up_noise`) written in the block.

    TensorFlow's C++ code writes to file descriptor 2, below Python's ``sys.stderr``, so the block
    runs with descriptor 2 on a temporary file; on leaving, every other line (a Python warning, a
    real error) is written to stderr.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode("utf-8", "replace").splitlines()
                    if not is_tensorflow_start_up_noise(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)
