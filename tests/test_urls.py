"""One rule for locations: every stage reads a URL's path literally, as Hadoop and Spark do."""

import pytest

from petseg import config
from petseg.errors import ConfigError, RejectedInput
from petseg.io import urls
from petseg.io.fs import list_files, read_file

#: A space, a percent-escape look-alike and a hash: the characters URL parsers disagree about.
ODD = "a b%20#1"


def test_paths_are_literal_in_every_form():
    assert urls.normalize_url(f"/data/{ODD}.jpg", key="k") == f"file:///data/{ODD}.jpg"
    assert urls.normalize_url(f"file:/data/{ODD}.jpg", key="k") == f"file:///data/{ODD}.jpg"  # Hadoop's form
    assert urls.split_url(f"file:///data/{ODD}.jpg") == ("file", "", f"/data/{ODD}.jpg")
    assert urls.split_url(f"hdfs://nn:8020/x/{ODD}") == ("hdfs", "nn:8020", f"/x/{ODD}")
    assert urls.split_url(f"s3a://bucket/{ODD}").with_path("/other") == "s3a://bucket/other"
    assert str(urls.local_path(f"file:///runs/{ODD}")) == f"/runs/{ODD}"
    assert str(urls.local_path(f"/runs/{ODD}")) == f"/runs/{ODD}"
    assert str(urls.local_path("runs/r1")) == "runs/r1" and urls.is_local("runs/r1")  # a notebook's relative path
    assert urls.is_local("file:/x") and not urls.is_local("s3a://b/x") and not urls.is_local("hdfs://nn/x")
    with pytest.raises(ValueError, match="not on the local file system"):
        urls.local_path("abfss://c@a.dfs.core.windows.net/x")
    with pytest.raises(ValueError, match="relative path"):
        urls.split_url("runs/r1")


def test_a_file_with_a_space_a_percent_and_a_hash_is_listed_and_read(tmp_path):
    folder = tmp_path / f"photos {ODD}"
    folder.mkdir()
    (folder / f"{ODD}.jpg").write_bytes(b"bytes of an odd name")
    url = urls.normalize_url(str(folder), key="infer.input")
    [listed] = list_files(url)
    assert listed == f"file://{folder}/{ODD}.jpg"
    assert read_file(listed) == b"bytes of an odd name"
    assert list_files(f"{url}/*.jpg") == [listed]
    with pytest.raises(RejectedInput, match="file_unreadable"):
        read_file(f"file://{folder}/{ODD}.png")


def test_schemes_pyarrow_lacks_go_through_fsspec():
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.pipe(f"/petseg-test/{ODD}/x.png", b"png bytes")
    memory.pipe("/petseg-test/_SUCCESS", b"")
    [listed] = list_files("memory://petseg-test")
    assert listed.endswith(f"/petseg-test/{ODD}/x.png")
    assert read_file(listed) == b"png bytes"


def test_a_dataset_path_petastorm_would_cut_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"data.dataset=.*holds '#'.*choose a dataset folder"):
        config.load(overrides=["data.source=synthetic", f"data.dataset={tmp_path}/pets#2"])
    assert config.load(overrides=["data.source=synthetic", f"data.dataset={tmp_path}/pets 100%"]).data.dataset == (
        f"file://{tmp_path}/pets 100%"
    )


def test_training_and_inference_open_a_run_folder_named_oddly(exported_run, tmp_path):
    import shutil

    from petseg.model import artifact
    from petseg.train.loop import local_path

    run = tmp_path / f"run {ODD}"
    shutil.copytree(exported_run, run)
    url = urls.normalize_url(str(run), key="train.output_dir")
    assert local_path(url) == run  # where training writes
    assert artifact.resolve(url).run_dir == run  # where inference and evaluation read
