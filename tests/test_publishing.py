"""Outputs never delete what petseg did not write, and a published output proves itself whole."""

import os

import pytest

from petseg import config
from petseg.config import ConfigError


@pytest.mark.parametrize(
    "job,overrides,message",
    [
        # A finished run given as both the model and the evaluation's folder.
        ("evaluate", ["evaluate.model={d}/run", "evaluate.dataset={d}/pets", "evaluate.output={d}/run"],
         r"evaluate.output='file://{d}/run' is the same folder as evaluate.model='file://{d}/run', an input"),
        ("infer", ["infer.model={d}/run", "infer.input={d}/photos", "infer.output={d}/photos"],
         r"infer.output='file://{d}/photos' is the same folder as infer.input"),
        ("infer", ["infer.model={d}/run", "infer.input={d}/photos/*.jpg", "infer.output={d}/photos/masks"],
         r"infer.output='file://{d}/photos/masks' lies inside infer.input='file://{d}/photos/\*.jpg'"),
        ("infer", ["infer.model={d}/run/model", "infer.input={d}/photos", "infer.output={d}/run"],
         r"infer.output='file://{d}/run' contains infer.model"),
        ("infer", ["infer.model={d}/run", "infer.input={d}/photos", "infer.output={d}/masks",
                   "infer.mode=incremental", "infer.checkpoint={d}/photos/_state"],
         r"infer.checkpoint='file://{d}/photos/_state' lies inside infer.input"),
        ("ingest", ["data.source=oxford", "data.input={d}/oxford", "data.dataset={d}/oxford"],
         r"data.dataset='file://{d}/oxford' is the same folder as data.input"),
        ("ingest", ["data.source=synthetic", "data.dataset={d}/pets", "data.rejects={d}/pets"],
         r"data.dataset='file://{d}/pets' is the same folder as data.rejects='file://{d}/pets', another output"),
        ("ingest", ["data.source=synthetic", "data.dataset={d}/pets", "data.rejects={d}/pets/rejects"],
         r"data.dataset='file://{d}/pets' contains data.rejects"),
        ("train", ["data.dataset={d}/pets", "train.output_dir={d}/pets/run"],
         r"train.output_dir='file://{d}/pets/run' lies inside data.dataset"),
    ],
)
def test_an_output_over_an_input_or_another_output_is_refused_before_spark_starts(tmp_path, job, overrides, message):
    d = str(tmp_path)
    (tmp_path / "oxford" / "images").mkdir(parents=True)
    (tmp_path / "oxford" / "annotations" / "trimaps").mkdir(parents=True)
    with pytest.raises(ConfigError, match=message.format(d=d)):
        config.load(overrides=[o.format(d=d) for o in overrides], job=job)


def test_a_link_to_an_input_is_the_input(tmp_path):
    (tmp_path / "photos").mkdir()
    os.symlink(tmp_path / "photos", tmp_path / "link")
    with pytest.raises(ConfigError, match="is the same folder as infer.input"):
        config.load(overrides=[f"infer.model={tmp_path}/run", f"infer.input={tmp_path}/photos",
                               f"infer.output={tmp_path}/link"], job="infer")


def test_folders_side_by_side_and_the_default_checkpoint_are_accepted(tmp_path):
    d = str(tmp_path)
    cfg = config.load(overrides=[f"infer.model={d}/run", f"infer.input={d}/photos", f"infer.output={d}/photos_masks",
                                 "infer.mode=incremental", f"infer.checkpoint={d}/photos_masks/_checkpoint"], job="infer")
    assert cfg.infer.output == f"file://{d}/photos_masks"
    config.load(overrides=[f"data.dataset={d}/pets", "data.source=synthetic", f"train.output_dir={d}/pets_run",
                           f"evaluate.output={d}/pets_eval", "infer.input=main.raw.photos", "infer.output=main.seg.masks"],
                job="demo")


# --- Only petseg's own folders are replaced --------------------------------------------------------------


def _storage():
    from petseg.io.fs import ArrowStorage

    return ArrowStorage()


def test_a_folder_petseg_did_not_write_is_refused_and_kept(tmp_path):
    from petseg.errors import InputError
    from petseg.io.publish import atomic_output

    mine = tmp_path / "mine"
    (mine / "backup").mkdir(parents=True)  # looks like a run's working folder, but is not a run
    (mine / "notes.txt").write_text("keep")
    for kind in ("dataset", "rejects", "masks", "evaluation", "run"):
        with pytest.raises(InputError, match=rf"k='{mine.as_uri()}' exists and is not a folder petseg wrote as a "
                                             rf"{kind} \(it holds backup, notes.txt\)"):
            with atomic_output(_storage(), mine.as_uri(), kind=kind, key="k"):
                pass
    assert (mine / "notes.txt").read_text() == "keep"


def test_a_training_run_never_replaces_a_folder_with_a_backup_and_notes(tmp_path):
    from petseg.errors import InputError
    from petseg.train import rundir

    out = tmp_path / "out"
    (out / "backup").mkdir(parents=True)
    (out / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="train.output_dir=.* is not a folder petseg wrote as a run"):
        rundir.open_run(_storage(), output_dir=out.as_uri(), identity={})
    assert (out / "notes.txt").exists() and not (tmp_path / "out.petseg-partial").exists()


def test_an_output_of_one_kind_never_replaces_another_kind(tmp_path):
    from petseg.errors import InputError
    from petseg.io.publish import atomic_output

    out = tmp_path / "out"
    with atomic_output(_storage(), out.as_uri(), kind="evaluation", key="evaluate.output") as staged:
        _storage().write_bytes(f"{staged.url}/metrics.json", b"{}")
    with pytest.raises(InputError, match="infer.output=.* holds a petseg evaluation, not a masks"):
        with atomic_output(_storage(), out.as_uri(), kind="masks", key="infer.output"):
            pass


@pytest.mark.parametrize("kind,names,replaceable", [
    ("dataset", ["_common_metadata", "split=train/part-0.parquet"], True),
    ("dataset", ["split=train/part-0.parquet"], False),  # no metadata: not proof enough
    ("rejects", ["_SUCCESS", "part-00000-x.snappy.parquet"], True),
    ("masks", ["part-00000-x.snappy.parquet", "_spark_metadata/0"], True),
    ("masks", ["part-00000-x.snappy.parquet", "photo.jpg"], False),
    ("evaluation", ["metrics.json", "predictions.png"], True),
    ("run", ["petseg-model.json", "model/saved_model.pb", "history.jsonl"], True),
    ("run", ["history.jsonl", "backup/x"], False),
])
def test_outputs_written_before_manifests_are_recognised_by_what_they_hold(tmp_path, kind, names, replaceable):
    from petseg.errors import InputError
    from petseg.io.publish import check_replaceable

    for name in names:
        (tmp_path / "out" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / name).write_bytes(b"x")
    check = lambda: check_replaceable(_storage(), (tmp_path / "out").as_uri(), kind=kind, key="k")  # noqa: E731
    if replaceable:
        check()
    else:
        with pytest.raises(InputError, match="is not a folder petseg wrote"):
            check()


# --- A published output proves itself whole ---------------------------------------------------------------


class _Killed(BaseException):
    """The driver dies: nothing after it runs, not even cleanup."""


class CopyingStorage:
    """An object store's storage: rename copies file by file (here, in name order), and the driver can be
    killed after ``kill_after`` files; from then on every call fails, as in a dead process."""

    def __init__(self, kill_after=None):
        from petseg.io.fs import ArrowStorage

        self._inner, self._left, self.dead = ArrowStorage(), kill_after, False

    def __getattr__(self, name):
        if self.dead:
            raise _Killed(name)
        return getattr(self._inner, name)

    def rename(self, src, dst):
        import shutil

        from petseg.io.urls import local_path

        if self.dead:
            raise _Killed("rename")
        if self.exists(dst):
            raise OSError(f"{dst} exists")
        source, target = local_path(src), local_path(dst)
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            if self._left is not None and self._left == 0:
                self.dead = True
                raise _Killed("mid-copy")
            (target / file.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target / file.relative_to(source))
            if self._left is not None:
                self._left -= 1
        target.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(source)


def _publish(storage, out, content, *, files=3):
    from petseg.io.publish import atomic_output

    with atomic_output(storage, out.as_uri(), kind="masks", key="infer.output") as staged:
        for i in range(files):
            storage.write_bytes(f"{staged.url}/part-{i:05d}.parquet", content)
        staged.rows = {"segmented": files}


def test_a_publish_killed_mid_copy_is_refused_by_readers_and_repaired_by_the_next_run(tmp_path):
    from petseg.errors import InputError
    from petseg.io.publish import recover, verify

    out = tmp_path / "masks"
    _publish(CopyingStorage(), out, b"old")
    assert verify(out.as_uri(), kind="masks", key="infer.output")["rows"] == {"segmented": 3}
    killed = CopyingStorage(kill_after=4 + 2)  # the old output's 4 files are copied aside, then 2 of the new
    with pytest.raises(_Killed):
        _publish(killed, out, b"new!")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[:2] == ["masks", "masks.petseg-lock"], names
    assert names[2].startswith("masks.petseg-old-") and names[3].startswith("masks.petseg-tmp-"), names
    with pytest.raises(InputError, match=r"masks' does not match its _petseg_output.json: 2 missing"):
        verify(out.as_uri(), kind="masks", key="infer.output")
    recover(CopyingStorage(), out.as_uri())
    assert {p.read_bytes() for p in out.glob("part-*")} == {b"old"}
    verify(out.as_uri(), kind="masks", key="infer.output")
    _age_lock(tmp_path / "masks.petseg-lock", seconds=3600)  # the next night
    _publish(CopyingStorage(), out, b"new!")
    assert {p.read_bytes() for p in out.glob("part-*")} == {b"new!"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks"]


def _age_lock(lock, *, seconds):
    import json
    import time

    holder = json.loads(lock.read_text())
    lock.write_text(json.dumps({**holder, "refreshed": time.time() - seconds}))


def test_files_of_another_run_inside_an_output_are_refused(tmp_path):
    from petseg.errors import InputError
    from petseg.io.publish import verify

    out = tmp_path / "masks"
    _publish(CopyingStorage(), out, b"one")
    (out / "masks.petseg-tmp-0123").mkdir()
    (out / "masks.petseg-tmp-0123" / "part-00000.parquet").write_bytes(b"two")
    with pytest.raises(InputError, match=r"1 not its own \(e.g. masks.petseg-tmp-0123/part-00000.parquet\)"):
        verify(out.as_uri(), kind="masks", key="infer.output")


def test_training_reads_only_the_split_folders_at_the_top_of_a_dataset(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from petseg.data.reader import row_group_index

    for folder in ("split=train", "nested.petseg-tmp-1/split=train"):
        (tmp_path / folder).mkdir(parents=True)
        pq.write_table(pa.table({"id": ["a", "b"]}), tmp_path / folder / "part-0.parquet")
    assert [(g.split, g.rows) for g in row_group_index(tmp_path.as_uri())] == [("train", 2)]


def test_a_second_writer_is_refused_until_the_first_ones_lock_goes_stale(tmp_path, monkeypatch):
    import json
    import time

    from petseg.errors import InputError
    from petseg.io import publish

    out = tmp_path / "masks"
    lock = tmp_path / "masks.petseg-lock"
    lock.write_text(json.dumps({"host": "node-7", "pid": 42, "id": "x", "refreshed": time.time() - 10}))
    with pytest.raises(InputError, match=r"infer.output=.* is being written by another job \(host node-7, pid 42, "
                                         r"lock refreshed 1\d s ago\); .* delete .*masks.petseg-lock"):
        _publish(CopyingStorage(), out, b"new")
    assert not out.exists() and lock.exists()
    lock.write_text(json.dumps({"host": "node-7", "pid": 42, "id": "x", "refreshed": time.time() - 3600}))
    _publish(CopyingStorage(), out, b"new")  # a job that died an hour ago holds nothing
    assert not lock.exists()
    # A job that runs keeps its lock fresh.
    monkeypatch.setattr(publish, "LOCK_REFRESH_SECONDS", 0.05)
    with publish.atomic_output(CopyingStorage(), out.as_uri(), kind="masks", key="infer.output"):
        first = json.loads(lock.read_text())["refreshed"]
        time.sleep(0.5)
        assert json.loads(lock.read_text())["refreshed"] > first


def test_a_failed_write_to_a_parquet_table_leaves_the_old_table(spark):
    from pyspark.sql import functions as F

    from petseg.infer.job import replace_table

    spark.range(3).write.mode("overwrite").format("parquet").saveAsTable("petseg_swap")
    try:
        failing = spark.range(5).select(F.when(F.col("id") == 4, F.raise_error(F.lit("boom"))).otherwise(F.col("id"))
                                        .alias("id"))
        with pytest.raises(Exception, match="boom"):
            replace_table(spark, failing, table="petseg_swap")
        assert spark.table("petseg_swap").count() == 3
        assert replace_table(spark, spark.range(7), table="petseg_swap").count() == 7
        assert [t.name for t in spark.catalog.listTables() if t.name.startswith("petseg_swap")] == ["petseg_swap"]
    finally:
        spark.sql("DROP TABLE IF EXISTS petseg_swap")


def test_inference_refuses_a_petseg_dataset_holding_another_runs_files(spark, exported_run, tmp_path):
    from conftest import load_job_config

    from petseg.errors import InputError
    from petseg.infer.job import run_infer

    pets = tmp_path / "pets"
    with _storage_atomic(pets, kind="dataset") as staged:
        _storage().write_bytes(f"{staged.url}/split=test/part-0.parquet", b"not read")
    (pets / "split=test" / "part-1.parquet").write_bytes(b"copied in from another run")
    cfg = load_job_config("infer", f"infer.model={exported_run}", f"infer.input={pets}", f"infer.output={tmp_path / 'o'}")
    with pytest.raises(InputError, match=r"infer.input=.*pets' does not match .* 1 not its own \(e.g. split=test/part-1"):
        run_infer(spark, infer=cfg.infer)


def _storage_atomic(folder, *, kind):
    from petseg.io.publish import atomic_output

    return atomic_output(_storage(), folder.as_uri(), kind=kind, key="k")
