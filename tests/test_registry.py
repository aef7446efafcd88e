"""Models by name: training logs and registers an MLflow model, and inference and evaluation take
``models:/name/version``, ``models:/name@alias`` and ``runs:/id/model``, on a local MLflow store."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_masks_are_a_fresh_predict, load_job_config, synthetic_dataset, write_pet_photos

from petseg.config import ConfigError
from petseg.errors import InputError
from petseg.evaluate import run_evaluate
from petseg.infer.job import run_infer, segment_column
from petseg.model import artifact, custom_objects, keras_module, registry
from petseg.train import run_train

NAME = "petseg-test-pets"
TINY = ["data.image_size=32", "model.n_depth=2", "model.encoder_weights=none", "train.batch_size=8",
        "train.epochs=1", "train.preview_images=0", "train.local_mode=true"]


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """A local MLflow store; its URI. MLflow 3 opens folder stores only behind MLFLOW_ALLOW_FILE_STORE
    (the session's executors have it through spark.executorEnv)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        yield f"file://{tmp_path_factory.mktemp('mlruns')}"


def mlflow_keys(store: str) -> list[str]:
    return [f"mlflow.tracking_uri={store}", "mlflow.experiment=petseg-registry"]


@pytest.fixture(scope="module")
def trained(spark, tracking, tmp_path_factory):
    """One training run with MLflow on and registration: its result and run folder."""
    folder = tmp_path_factory.mktemp("registry")
    dataset = synthetic_dataset(spark, folder, synthetic_count=24, image_size=32, min_row_groups_per_split=1)
    cfg = load_job_config("train", f"data.dataset={dataset}", f"train.output_dir={folder / 'run'}", *TINY,
                          "mlflow.enabled=true", f"mlflow.registered_model_name={NAME}", *mlflow_keys(tracking))
    result = run_train(spark, data=cfg.data, model=cfg.model, train=cfg.train, tracking=cfg.mlflow)
    yield result, folder / "run", dataset
    pinned = [registry.pin(uri, tracking_uri=tracking) for uri in (f"models:/{NAME}/1", result.mlflow_model)]
    for model in pinned:  # the tests' fetches, out of this machine's temporary folder
        shutil.rmtree(registry.cache_folder(model), ignore_errors=True)


@pytest.fixture(scope="module")
def client(tracking):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking, registry_uri=tracking)


def test_training_logs_an_mlflow_model_and_registers_it(trained, client):
    result, run, _ = trained
    meta = artifact.resolve(str(run))
    assert result.mlflow_model == f"runs:/{meta.mlflow_run_id}/model"
    assert result.registered_model == f"models:/{NAME}/1"
    assert f"mlflow: {result.mlflow_model}, registered as models:/{NAME}/1" in result.format()
    version = client.get_model_version(NAME, "1")
    assert version.run_id == meta.mlflow_run_id
    # The registered model carries the run folder: the same metadata, the same SavedModel.
    found = artifact.resolve(f"models:/{NAME}/1", tracking_uri=client.tracking_uri)
    assert found.uri == f"models:/{NAME}/1" and found.version == result.run_id
    assert dict(found.metadata) == json.loads((run / artifact.METADATA_FILE).read_text())
    assert sorted(p.name for p in found.model_dir.iterdir()) == sorted(p.name for p in (run / "model").iterdir())


def test_infer_by_alias_uses_the_version_it_names_and_every_row_says_which(spark, trained, client, tracking, tmp_path):
    import mlflow

    result, run, _ = trained
    # A second version of the model, newest; the alias stays on the first, so following it matters.
    mlflow.set_tracking_uri(tracking)
    second = mlflow.register_model(result.mlflow_model, NAME)
    assert str(second.version) == "2"
    client.set_registered_model_alias(NAME, "champion", "1")
    pets = write_pet_photos(tmp_path / "photos")
    cfg = load_job_config("infer", f"infer.model=models:/{NAME}@champion", f"infer.input={tmp_path / 'photos'}",
                          f"infer.output={tmp_path / 'masks'}", "infer.partitions=2", *mlflow_keys(tracking))
    report = run_infer(spark, infer=cfg.infer, tracking=cfg.mlflow)
    assert report.segmented == 4 and report.model_uri == f"models:/{NAME}/1"
    assert f"model:  models:/{NAME}/1 for models:/{NAME}@champion (version {result.run_id})" in report.format()
    assert {r["model_uri"] for r in spark.read.parquet(str(tmp_path / "masks")).collect()} == {f"models:/{NAME}/1"}
    meta = artifact.resolve(str(run))
    model = keras_module().models.load_model(str(meta.model_dir), compile=False, custom_objects=custom_objects())
    assert_masks_are_a_fresh_predict(spark, tmp_path / "masks", model=model, pets=pets,
                                     preprocessing=meta.preprocessing, version=result.run_id)


def test_executors_fetch_a_pinned_model_into_one_folder_per_node(spark, trained, tracking, tmp_path):
    from petseg.data.render import encode_png

    _, run, _ = trained
    pinned = registry.pin(f"models:/{NAME}/1", tracking_uri=tracking)
    assert (pinned.name, pinned.version, pinned.registry_uri) == (NAME, "1", tracking)  # the registry defaults to tracking's
    folder = registry.cache_folder(pinned)
    shutil.rmtree(folder, ignore_errors=True)  # what the driver fetched: the tasks must fetch it themselves
    photos = [encode_png(np.full((20 + i, 24, 3), 40 * i, np.uint8)) for i in range(8)]
    frame = spark.createDataFrame([(i, p) for i, p in enumerate(photos)], "id int, image binary").repartition(4)
    version = artifact.resolve(str(run)).version
    rows = frame.select("id", segment_column("image", pinned, model_version=version).alias("s")).collect()
    assert sorted(r["id"] for r in rows) == list(range(8)) and {r["s"]["error"] for r in rows} == {None}
    assert (folder / "MLmodel").is_file()
    # Four tasks on two cores, each fetching if the folder is missing: one copy, no download left behind.
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".download-")] == []


def test_evaluate_by_run_uri_measures_what_evaluating_the_folder_measures(spark, trained, tracking, tmp_path):
    result, run, dataset = trained

    def evaluate(model: str, output: str):
        cfg = load_job_config("evaluate", f"evaluate.model={model}", f"evaluate.dataset={dataset}",
                              f"evaluate.output={tmp_path / output}", "evaluate.preview_images=2", *mlflow_keys(tracking))
        return run_evaluate(spark, evaluate=cfg.evaluate, tracking=cfg.mlflow)

    by_uri, by_folder = evaluate(result.mlflow_model, "by-uri"), evaluate(str(run), "by-folder")
    assert by_uri.model_uri == result.mlflow_model and by_uri.model_version == by_folder.model_version == result.run_id
    assert by_uri.metrics == by_folder.metrics and by_uri.images == by_folder.images > 0
    assert (tmp_path / "by-uri" / "predictions.png").exists()


@pytest.mark.parametrize("uri,message", [
    (f"models:/{NAME}/9", r"Model Version \(name=petseg-test-pets, version=9\) not found"),
    ("models:/petseg-no-such-model/1", r"petseg-no-such-model"),
    (f"models:/{NAME}@no-such-alias", r"alias no-such-alias not found"),
    ("runs:/0123456789abcdef0123456789abcdef/model", r"0123456789abcdef0123456789abcdef"),
    (f"models:/{NAME}/latest", r"names the version 'latest': petseg takes a version number or an alias"),
])
def test_a_missing_model_fails_on_the_driver_before_the_input_is_read(spark, trained, tracking, tmp_path, uri, message):
    cfg = load_job_config("infer", f"infer.model={uri}", f"infer.input={tmp_path / 'no-input'}",
                          f"infer.output={tmp_path / 'masks'}", *mlflow_keys(tracking))
    with pytest.raises(InputError, match=message) as failed:
        run_infer(spark, infer=cfg.infer, tracking=cfg.mlflow)
    assert str(failed.value).startswith(f"model {uri!r}") and "\n" not in str(failed.value)


def test_registering_needs_tracking_on(tmp_path):
    with pytest.raises(ConfigError, match=r"mlflow.registered_model_name='pets' is not allowed; use null, or set "
                                          r"mlflow.enabled=true"):
        load_job_config("train", f"data.dataset={tmp_path / 'pets'}", f"train.output_dir={tmp_path / 'run'}", *TINY,
                        "mlflow.registered_model_name=pets")


def test_the_mlflow_model_segments_photos_where_there_is_no_spark(trained, tracking, tmp_path):
    """mlflow.pyfunc.load_model, as Model Serving or a notebook does: no pyspark, no TF_USE_LEGACY_KERAS."""
    result, run, _ = trained
    pets = write_pet_photos(tmp_path / "photos")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["pyspark"] = None  # importing it fails, as where it is not installed
        from pathlib import Path
        import mlflow, pandas as pd
        mlflow.set_tracking_uri({tracking!r})
        model = mlflow.pyfunc.load_model("models:/{NAME}/1")
        photos = [Path({str(tmp_path / 'photos')!r}, f"p{{i}}.png").read_bytes() for i in range({len(pets)})]
        out = model.predict(pd.DataFrame({{"image": photos + [b"not an image"]}}), params={{"batch_size": 3}})
        out.to_parquet({str(tmp_path / 'out.parquet')!r})
    """)
    environ = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**environ, "MLFLOW_ALLOW_FILE_STORE": "true"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    import cv2
    import pandas as pd

    from petseg.data import decode
    from petseg.model import preprocess
    from petseg.model.segment import OUTPUT_COLUMNS

    out = pd.read_parquet(tmp_path / "out.parquet")
    assert list(out.columns) == [c.name for c in OUTPUT_COLUMNS]  # the inference job's, in its order
    assert out["error"].tolist()[:-1] == [None] * len(pets) and out["error"].iloc[-1].startswith("image_undecodable")
    meta = artifact.resolve(str(run))
    model = keras_module().models.load_model(str(meta.model_dir), compile=False, custom_objects=custom_objects())
    pixels = preprocess(np.stack([decode.resize_image(p.image, 32) for p in pets]), meta.preprocessing)
    expected = np.argmax(model.predict(pixels, verbose=0), axis=-1).astype(np.uint8)
    for i, pet in enumerate(pets):
        mask = cv2.imdecode(np.frombuffer(out["mask_png"].iloc[i], np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(mask, decode.resize_mask(expected[i], pet.image.shape[:2]))
        assert (out["height"].iloc[i], out["width"].iloc[i]) == pet.image.shape[:2]


def test_resolving_on_the_driver_leaves_the_process_mlflow_servers_as_they_were(trained, tracking, tmp_path):
    """A notebook that tracks elsewhere: naming a model on another server must not move its tracking."""
    import mlflow

    before = mlflow.get_tracking_uri()
    elsewhere = f"file://{tmp_path / 'elsewhere'}"
    mlflow.set_tracking_uri(elsewhere)
    try:
        found = artifact.resolve(f"models:/{NAME}/1", tracking_uri=tracking)
        assert found.uri == f"models:/{NAME}/1" and found.source.registry_uri == tracking
        assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (elsewhere, elsewhere)
    finally:
        mlflow.set_tracking_uri(before)


def test_a_fetch_marks_its_model_used_and_a_new_download_removes_models_unused_for_a_week(trained, tracking):
    pinned = registry.pin(f"models:/{NAME}/1", tracking_uri=tracking)
    folder = registry.cache_folder(pinned)
    week_ago = time.time() - (registry.CACHE_DAYS + 1) * 86400
    registry.fetch(pinned)
    os.utime(folder, (week_ago, week_ago))
    assert registry.fetch(pinned) == folder and folder.stat().st_mtime > week_ago + 86400  # used now
    # What a node keeps from older nights and killed workers, beside one used yesterday.
    stale, scratch, recent = (folder.parent / name for name in ("stale-version", ".download-killed", "recent-version"))
    for entry, when in ((stale, week_ago), (scratch, week_ago), (recent, time.time() - 86400)):
        (entry / "artifacts").mkdir(parents=True, exist_ok=True)
        os.utime(entry, (when, when))
    shutil.rmtree(folder)
    registry.fetch(pinned)  # a download: it prunes
    assert (folder / "MLmodel").is_file() and recent.is_dir() and not stale.exists() and not scratch.exists()
    shutil.rmtree(recent)


def register_tiny_model(client, name: str, content: str) -> str:
    """Register a new version of ``name`` whose model is one MLmodel file holding ``content``: all the node
    cache looks at, without TensorFlow or Spark. Its URI."""
    run = client.create_run(client.get_experiment_by_name("petseg-cache").experiment_id)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "MLmodel").write_text(content)
        client.log_artifacts(run.info.run_id, folder, artifact_path="model")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return f"models:/{name}/{version.version}"


def pin_tiny(uri: str, tracking: str) -> registry.MlflowModel:
    """``uri`` pinned on the local store, its registry named. Run alone, these tests leave MLflow's process-wide
    servers at its defaults, and registry._servers puts the default registry back after a fetch as an explicit
    setting, which a later pin without registry_uri would then take instead of the tracking store's."""
    return registry.pin(uri, tracking_uri=tracking, registry_uri=tracking)


@pytest.fixture
def node_tmp(tmp_path, monkeypatch, client):
    """This test's own temporary folder as Python's (``tempfile.tempdir``), so that the node cache it plants
    things in is not the machine's; and an experiment for :func:`register_tiny_model`."""
    if client.get_experiment_by_name("petseg-cache") is None:
        client.create_experiment("petseg-cache")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("prepared", ["writable by everyone", "a link to a folder of theirs"])
def test_a_model_cache_another_user_prepared_is_refused_not_loaded(node_tmp, client, tracking, prepared):
    """On a shared node another user can make the cache folder first and put a SavedModel of their own in it,
    which is code the victim's tasks would run."""
    pinned = pin_tiny(register_tiny_model(client, "petseg-test-planted", "flavors: {}\n"), tracking)
    cache = registry.cache_folder(pinned).parent
    theirs = node_tmp / "theirs" if prepared.startswith("a link") else cache
    (theirs / registry.cache_folder(pinned).name).mkdir(parents=True)
    (theirs / registry.cache_folder(pinned).name / "MLmodel").write_text("planted")
    if theirs != cache:
        cache.symlink_to(theirs)
    else:
        os.chmod(cache, 0o777)
    problem = "is a symbolic link" if theirs != cache else "is writable by other users"
    with pytest.raises(InputError, match=rf"^the model cache {re.escape(str(cache))} {problem}.* remove it"):
        registry.fetch(pinned)
    assert (theirs / registry.cache_folder(pinned).name / "MLmodel").read_text() == "planted"


def test_a_model_cache_folder_owned_by_another_user_is_refused(node_tmp):
    me = os.getuid()
    mine = registry.cache_root()
    assert mine == node_tmp / f"petseg-models-{me}" and stat.S_IMODE(mine.stat().st_mode) == 0o700
    # Another user (uid me + 1) runs a job on this node after this one made that user's folder.
    (node_tmp / f"petseg-models-{me + 1}").mkdir(mode=0o700)
    with pytest.raises(InputError, match=rf"^the model cache {re.escape(str(node_tmp))}/petseg-models-{me + 1} belongs "
                                         rf"to uid {me}, not to this process's uid {me + 1}.* remove it"):
        registry.cache_root(uid=me + 1)


@pytest.mark.parametrize("record", [None, {"uri": "models:/petseg-test-stale/2", "version": "2"}])
def test_a_cached_model_not_recorded_as_the_version_asked_for_is_fetched_again(node_tmp, client, tracking, record):
    """A folder a killed or pre-record fetch left (no record), or one fetched for another version, is never loaded."""
    pinned = pin_tiny(register_tiny_model(client, "petseg-test-stale", "flavors: {}\n"), tracking)
    folder = registry.cache_folder(pinned)
    folder.parent.mkdir(mode=0o700)
    folder.mkdir()
    (folder / "MLmodel").write_text("another model")
    if record is not None:
        (folder / ".petseg-fetched.json").write_text(json.dumps(record))
    assert registry.fetch(pinned) == folder
    assert (folder / "MLmodel").read_text() == "flavors: {}\n"
    assert json.loads((folder / ".petseg-fetched.json").read_text())["uri"] == pinned.uri
    assert sorted(p.name for p in folder.parent.iterdir() if p.is_dir()) == [folder.name]  # nothing set aside is left


def test_a_version_number_registered_again_is_fetched_again(node_tmp, client, tracking):
    """A registered model deleted and registered again restarts at version 1: the same URI, another model."""
    first = pin_tiny(register_tiny_model(client, "petseg-test-again", "flavors: {}\n# first\n"), tracking)
    assert (registry.fetch(first) / "MLmodel").read_text().endswith("# first\n")
    client.delete_registered_model("petseg-test-again")
    uri = register_tiny_model(client, "petseg-test-again", "flavors: {}\n# second\n")
    again = pin_tiny(uri, tracking)
    assert again.uri == first.uri == "models:/petseg-test-again/1"
    assert (registry.fetch(again) / "MLmodel").read_text().endswith("# second\n")


def test_a_model_logged_before_the_pyfunc_moved_still_unpickles():
    """MLflow pickles PetsegModel by reference: models logged by earlier releases name petseg.infer.mlflow_model."""
    import pickle

    from petseg.model.pyfunc import PetsegModel

    logged_earlier = pickle.dumps(PetsegModel(), protocol=0).replace(b"petseg.model.pyfunc", b"petseg.infer.mlflow_model")
    assert type(pickle.loads(logged_earlier)) is PetsegModel
