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
from typing import Iterator

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


def visible_gpus() -> str | None:
    """CUDA_VISIBLE_DEVICES as the runner set it for this worker (None when unset)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def prepare_process_environment(*, master: str | None) -> None:
    """Set the variables Spark and TensorFlow read at start-up, before either starts in this process.

    TF_USE_LEGACY_KERAS selects tf-keras; TF_CPP_MIN_LOG_LEVEL and PYTHONWARNINGS quiet TensorFlow's
    C++ log and petastorm's FutureWarnings in the processes this one starts (a local master's Python
    workers, training processes). For a local master (``local[...]``), PYSPARK_PYTHON makes the
    executors run this interpreter (else they run ``python3`` from PATH, which lacks petseg's
    packages). Any other master, or none (spark-submit, YARN, Kubernetes, Databricks), has executors
    on other machines, where this interpreter's path means nothing: their Python is the cluster's to
    set (``spark.pyspark.python``). Values a user set are kept.
    """
    os.environ.setdefault(LEGACY_KERAS_ENV, "1")
    os.environ.setdefault(TF_LOG_LEVEL_ENV, "2")  # inherited by a local master's Python workers
    # petastorm's own tasks (materialize_dataset's, the readers') run in Python workers, where
    # petseg cannot call warnings.filterwarnings first; see ignore_petastorm_pyarrow_deprecations.
    os.environ.setdefault("PYTHONWARNINGS", ",".join(f"ignore::FutureWarning:{m}" for m in PETASTORM_WARNING_MODULES))
    if master is not None and master.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


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
