"""Images that keep arriving: incremental runs and a stream, each input segmented exactly once."""

from petseg import env

env.prepare_process_environment(master="local[2]")  # tf-keras, before TensorFlow is imported

import io  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from petseg.data import render  # noqa: E402
from petseg.errors import InputError  # noqa: E402


def _add_photos(folder, first, count, seed=3):
    folder.mkdir(exist_ok=True)
    for i in range(first, first + count):
        pet = render.synthetic_pet(i, seed=seed, size=(40 + i % 3 * 8, 32))
        tmp = folder.parent / f".{i}.tmp"
        tmp.write_bytes(render.encode_jpeg(pet.image))
        tmp.rename(folder / f"p{i:03d}.jpg")  # moved in whole, as an upload service should


def _backdate(path, days):
    """Give ``path`` the mtime a copy keeps (``cp -p``, ``rsync -a``, ``unzip``) of a file made ``days`` ago."""
    then = time.time() - days * 86400
    os.utime(path, (then, then))


def _infer(spark, *overrides):
    from conftest import load_job_config

    from petseg.infer.job import run_infer

    return run_infer(spark, infer=load_job_config("infer", *overrides).infer)


def test_incremental_runs_segment_only_new_images_once_even_after_a_run_killed_midway(spark, exported_run, tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "masks"
    args = (f"infer.model={exported_run}", f"infer.input={photos}", f"infer.output={out}", "infer.mode=incremental")
    _add_photos(photos, 0, 5)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    first = _infer(spark, *args)
    assert (first.segmented, first.failed) == (5, {"image_undecodable": 1})
    assert "infer (incremental): 6 new rows, segmented 5, failed 1" in first.format()

    _add_photos(photos, 5, 3)
    # A photo copied in keeping its mtime, a month older than every other: past Spark's default maxFileAge
    # (7 days behind the newest file seen), which would skip it.
    old = photos.parent / "old.tmp"
    old.write_bytes(render.encode_jpeg(render.synthetic_pet(99, seed=3, size=(40, 32)).image))
    _backdate(old, 30)
    old.rename(photos / "old.jpg")
    second = _infer(spark, *args)
    assert (second.segmented, second.failed) == (4, {})
    rows = spark.read.parquet(str(out)).collect()
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in rows) == (
        ["broken.jpg", "old.jpg"] + [f"p{i:03d}.jpg" for i in range(8)])
    # Keys as batch runs write them, so the two modes' outputs join.
    batch = _infer(spark, f"infer.model={exported_run}", f"infer.input={photos}", f"infer.output={tmp_path / 'b'}")
    assert batch.rows == 10
    assert {r["path"] for r in spark.read.parquet(str(tmp_path / "b")).collect()} == {r["path"] for r in rows}

    nothing = _infer(spark, *args)  # a scheduled run with nothing new succeeds and segments nothing
    assert nothing.rows == 0
    # A glob that matches nothing yet is a stream still waiting for files, not an error.
    waiting = _infer(spark, f"infer.model={exported_run}", f"infer.input={photos}/later-*.jpg",
                     f"infer.output={tmp_path / 'later'}", "infer.mode=incremental")
    assert waiting.rows == 0 and waiting.arrow_batch_rows == 256

    # A run killed after its tasks wrote their files, before the driver committed the micro-batch:
    # Spark's sink log and the query's commit log lack the batch, its files are on disk.
    _add_photos(photos, 8, 4)
    third = _infer(spark, *args)
    assert third.segmented == 4
    last = max(int(p.name) for p in (out / "_spark_metadata").iterdir() if p.name.isdigit())
    for log in (out / "_spark_metadata", out / "_checkpoint" / "commits"):
        for name in (str(last), f".{last}.crc"):  # a log entry and the checksum the local file system keeps
            (log / name).unlink(missing_ok=True)
    redone = _infer(spark, *args)
    assert redone.segmented == 4  # the batch again, from its checkpointed offsets
    keys = [r["path"] for r in spark.read.parquet(str(out)).collect()]
    assert len(keys) == len(set(keys)) == 14  # every image once: the orphaned files are not read


def test_incremental_refuses_a_batch_output_and_writes_tables(spark, exported_run, tmp_path):
    photos = tmp_path / "photos"
    _add_photos(photos, 0, 3)
    batch_out = tmp_path / "batch"
    _infer(spark, f"infer.model={exported_run}", f"infer.input={photos}", f"infer.output={batch_out}")
    with pytest.raises(InputError, match="holds the output of a batch run"):
        _infer(spark, f"infer.model={exported_run}", f"infer.input={photos}", f"infer.output={batch_out}",
               "infer.mode=incremental")
    from petseg.errors import ConfigError

    with pytest.raises(ConfigError, match="infer.checkpoint=None is not allowed"):
        _infer(spark, f"infer.model={exported_run}", f"infer.input={photos}", "infer.output=stream_masks",
               "infer.mode=incremental")
    with pytest.raises(ConfigError, match="infer.trigger_interval='soon' is not allowed; use a duration"):
        _infer(spark, f"infer.model={exported_run}", f"infer.input={photos}", f"infer.output={tmp_path / 's'}",
               "infer.mode=stream", "infer.trigger_interval=soon")
    with pytest.raises(ConfigError, match="infer.limit=2 is not allowed; use null with infer.mode=incremental"):
        _infer(spark, f"infer.model={exported_run}", f"infer.input={photos}", f"infer.output={tmp_path / 's'}",
               "infer.mode=incremental", "infer.limit=2")
    # A Parquet table of image bytes: each run takes the files added since the last.
    import pandas as pd

    src, masks = tmp_path / "table", tmp_path / "table_masks"
    src.mkdir()
    pets = [render.encode_png(render.synthetic_pet(i, seed=8, size=(36, 30)).image) for i in range(5)]
    pd.DataFrame({"id": ["a", "b", "c"], "image": pets[:3]}).to_parquet(src / "part-0.parquet")
    parquet_args = (f"infer.model={exported_run}", f"infer.input={src}", f"infer.output={masks}", "infer.mode=incremental")
    assert _infer(spark, *parquet_args).segmented == 3
    pd.DataFrame({"id": ["d", "e"], "image": pets[3:]}).to_parquet(src / "part-1.parquet")
    _backdate(src / "part-1.parquet", 30)  # a file its writer staged elsewhere for a month
    assert _infer(spark, *parquet_args).segmented == 2
    assert sorted(r["id"] for r in spark.read.parquet(str(masks)).collect()) == ["a", "b", "c", "d", "e"]

    table_args = (f"infer.model={exported_run}", f"infer.input={photos}", "infer.output=stream_masks",
                  "infer.mode=incremental", f"infer.checkpoint={tmp_path / 'ckpt'}")
    try:
        assert _infer(spark, *table_args).segmented == 3
        _add_photos(photos, 3, 2)
        assert _infer(spark, *table_args).segmented == 2
        assert spark.table("stream_masks").count() == 5
    finally:
        spark.sql("DROP TABLE IF EXISTS stream_masks")
        shutil.rmtree(tmp_path / "ckpt", ignore_errors=True)


def test_a_stream_over_a_folder_petseg_replaces_whole_is_refused_before_spark_runs(spark, exported_run, tmp_path):
    import pandas as pd

    from petseg.io.fs import ArrowStorage
    from petseg.io.publish import atomic_output

    image = render.encode_png(render.synthetic_pet(0, seed=8, size=(36, 30)).image)
    table = io.BytesIO()
    pd.DataFrame({"id": ["a"], "image": [image]}).to_parquet(table)
    for kind, part in [("dataset", "split=test/part-0.parquet"), ("masks", "part-0.parquet"),
                       ("rejects", "part-0.parquet")]:
        with atomic_output(ArrowStorage(), (tmp_path / kind).as_uri(), kind=kind, key="k") as staged:
            ArrowStorage().write_bytes(f"{staged.url}/{part}", table.getvalue())
    # The folder itself, a folder inside it, and a glob under it: all are rewritten by the next publish.
    cases = [("masks", "masks", "incremental"), ("dataset", "dataset/split=test", "incremental"),
             ("rejects", "rejects/*.parquet", "stream")]
    jobs = set(spark.sparkContext.statusTracker().getJobIdsForGroup())
    for kind, given, mode in cases:
        url = f"file://{tmp_path / given}"
        with pytest.raises(InputError) as refused:
            _infer(spark, f"infer.model={exported_run}", f"infer.input={tmp_path / given}",
                   f"infer.output={tmp_path / 'out'}", f"infer.mode={mode}")
        assert str(refused.value) == (
            f"infer.input={url!r} belongs to a petseg {kind} (file://{tmp_path / kind}/_petseg_output.json), which "
            f"the job that writes it replaces whole, under new file names: infer.mode={mode} would segment every "
            "row again after each replacement. Use infer.mode=batch, which replaces infer.output with one row per "
            "input row"
        )
    assert set(spark.sparkContext.statusTracker().getJobIdsForGroup()) == jobs and not spark.streams.active
    assert not (tmp_path / "out").exists()


#: Seconds the stream test may run in all before it fails: a safety net against a stream that never
#: gets there, not a pace it must keep; every wait ends as soon as its condition holds or the job ends.
STREAM_SAFETY_TIMEOUT = 1200
#: Seconds between looks at the sink's commit log while the job runs.
COMMIT_LOOK_SECONDS = 0.5


class _Output:
    """A process's stdout and stderr, read on threads of their own as it writes them: the job never
    blocks on a full pipe, and the end of its stderr (the process's end) is an event to wait on."""

    def __init__(self, proc) -> None:
        self.ended = threading.Event()
        self._lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._readers = [threading.Thread(target=self._read, args=(proc.stdout, "stdout"), daemon=True),
                         threading.Thread(target=self._read, args=(proc.stderr, "stderr"), daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, name: str) -> None:
        for line in stream:
            self._lines[name].append(line)
        if name == "stderr":
            self.ended.set()

    def text(self, name: str) -> str:
        """What the process wrote to ``name`` so far (all of it once it has ended and :meth:`close` ran)."""
        return "".join(self._lines[name])

    def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for both streams to be read to their end."""
        for reader in self._readers:
            reader.join(timeout)


def _rows_when(spark, out, expected, proc, output: _Output, *, deadline: float) -> None:
    """Wait until the stream's output (as Spark reads it: committed micro-batches only) holds ``expected``
    rows, counted again each time the sink commits a micro-batch; fail as soon as the job ends, or at
    ``deadline`` (a ``time.monotonic()`` value, the safety net)."""
    commits = out / "_spark_metadata"
    counted: set[str] = set()
    while proc.poll() is None:
        # The sink's log entries, N and N.compact; not the file system's hidden .N.crc checksums.
        committed = {p.name for p in commits.iterdir() if p.name.split(".")[0].isdigit()} if commits.is_dir() else set()
        if committed != counted:
            counted = committed
            n = spark.read.parquet(str(out)).count()
            assert n <= expected
            if n == expected:
                return
        if time.monotonic() > deadline:
            proc.kill()
            output.close(60)
            pytest.fail(f"the stream did not reach {expected} rows in {STREAM_SAFETY_TIMEOUT} s: "
                        f"{output.text('stderr')[-3000:]}")
        if output.ended.wait(COMMIT_LOOK_SECONDS):  # its stderr closed: the job is ending
            proc.wait(timeout=60)
    output.close(60)
    pytest.fail(f"the stream ended (exit {proc.returncode}) before {expected} rows: {output.text('stderr')[-3000:]}")


@pytest.mark.slow
def test_a_stream_segments_images_as_they_arrive_stops_on_sigterm_and_resumes(spark, exported_run, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    photos, out = tmp_path / "photos", tmp_path / "masks"
    _add_photos(photos, 0, 4)
    environ = {k: v for k, v in os.environ.items() if k != "PYSPARK_PYTHON"}
    cmd = [sys.executable, "-m", "petseg.cli", "infer", "spark.master=local[1]", f"infer.model={exported_run}",
           f"infer.input={photos}", f"infer.output={out}", "infer.mode=stream", "infer.trigger_interval=1 second"]
    deadline = time.monotonic() + STREAM_SAFETY_TIMEOUT
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ)
    output = _Output(proc)
    try:
        _rows_when(spark, out, 4, proc, output, deadline=deadline)
        _add_photos(photos, 4, 3)
        _rows_when(spark, out, 7, proc, output, deadline=deadline)
        proc.send_signal(signal.SIGTERM)
        # Stopping waits for the running micro-batch, if any; the safety net is what is left of the deadline.
        proc.wait(timeout=max(deadline - time.monotonic(), 120))
        output.close(60)
        stdout, stderr = output.text("stdout"), output.text("stderr")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "infer (stream): 7 new rows, segmented 7, failed 0" in stdout
    # Stopped, then restarted from its checkpoint: only what arrived in between.
    _add_photos(photos, 7, 2)
    resumed = _infer(spark, f"infer.model={exported_run}", f"infer.input={photos}", f"infer.output={out}",
                     "infer.mode=incremental")
    assert resumed.segmented == 2
    keys = [r["path"] for r in spark.read.parquet(str(out)).collect()]
    assert len(keys) == len(set(keys)) == 9
