"""Every scheme ingest writes, the later stages read: one route per scheme, through petseg.io."""

import contextlib
import os

import pytest

from petseg.data.reader import open_split, split_stats
from petseg.io import urls
from petseg.io.publish import atomic_output


@pytest.mark.parametrize(
    "url,library,name,root,path,package",
    [
        ("file:///data/pets", "pyarrow", "LocalFileSystem", "", "/data/pets", None),
        ("hdfs://nn:8020/data/pets", "pyarrow", "HadoopFileSystem", "hdfs://nn:8020", "/data/pets", None),
        ("viewfs://cluster/data/pets", "pyarrow", "HadoopFileSystem", "viewfs://cluster", "/data/pets", None),
        ("s3a://bucket/data/pets", "pyarrow", "S3FileSystem", "s3://bucket", "bucket/data/pets", None),
        ("s3://bucket/data/pets", "pyarrow", "S3FileSystem", "s3://bucket", "bucket/data/pets", None),
        ("gs://bucket/data/pets", "pyarrow", "GcsFileSystem", "gs://bucket", "bucket/data/pets", None),
        ("abfss://c@acct.dfs.core.windows.net/pets", "fsspec", "abfs", "abfs://c@acct.dfs.core.windows.net/pets", "",
         "adlfs"),
    ],
)
def test_each_scheme_has_one_route(url, library, name, root, path, package):
    route = urls.filesystem_route(url)
    assert (route.library, route.name, route.root, route.path, route.package) == (library, name, root, path, package)


def test_a_scheme_whose_package_is_missing_names_the_extra():
    pytest.importorskip("fsspec")
    if any(p for p in ("adlfs",) if __import__("importlib").util.find_spec(p)):
        pytest.skip("adlfs is installed here")
    with pytest.raises(ImportError, match=r"abfss:// is read through the adlfs package, which is not installed .*"
                                          r"pip install 'petseg\[azure\]'"):
        urls.arrow_filesystem("abfss://c@acct.dfs.core.windows.net/pets")


@pytest.fixture(scope="module")
def small_pets(spark, tmp_path_factory):
    from conftest import data_config

    from petseg.ingest import run_ingest

    data = data_config(source="synthetic", dataset=str(tmp_path_factory.mktemp("routes") / "pets"),
                       synthetic_count=20, image_size=16, min_row_groups_per_split=2)
    run_ingest(spark, data=data)
    return urls.local_path(data.dataset)


def test_a_dataset_on_a_scheme_petastorm_cannot_open_is_read_through_petseg_io(small_pets):
    """fsspec's in-memory file system stands in for an object store: neither pyarrow nor Petastorm opens it."""
    import fsspec

    memory = fsspec.filesystem("memory")
    for folder, _, files in os.walk(small_pets):
        for name in files:
            memory.pipe(f"/routes-bucket{folder}/{name}", open(os.path.join(folder, name), "rb").read())
    url = f"memory://routes-bucket{small_pets}"
    assert split_stats(url)["train"][0] == 16
    with open_split(url, split="train", fields=("id", "image")) as reader:
        rows = list(reader)
    assert len({r.id for r in rows}) == 16 and rows[0].image.shape == (16, 16, 3)


def test_petastorm_reads_a_file_system_whose_paths_are_bucket_relative(small_pets):
    """S3 and GCS paths are ``bucket/key``, without the leading slash Petastorm's paths have."""
    from petastorm import make_reader
    from pyarrow import fs

    from petseg.io.arrow_legacy import LegacyArrowFileSystem

    relative = fs.SubTreeFileSystem(str(small_pets.parent), fs.LocalFileSystem())
    legacy = LegacyArrowFileSystem(relative, absolute=False)
    with make_reader(f"file:///{small_pets.name}", filesystem=legacy, schema_fields=["id"], workers_count=1,
                     num_epochs=None) as reader:
        first = next(iter(reader))
    assert first.id


@pytest.mark.parametrize("kind", ["hadoop", "arrow"])
def test_both_storages_check_glob_write_and_publish_alike(spark, tmp_path, kind):
    """Hadoop's (classic sessions) and pyarrow's (Spark Connect, which has no JVM gateway) storage
    give the same answers and publish outputs the same way."""
    from petseg.io.fs import ArrowStorage, HadoopStorage

    storage = HadoopStorage(spark) if kind == "hadoop" else ArrowStorage()
    root = tmp_path / "tree"
    (root / "split=test").mkdir(parents=True)
    for name in ("a.parquet", "b.parquet", "c.txt", "split=test/d.parquet"):
        (root / name).write_bytes(b"x" * len(name))
    url = root.as_uri()
    assert storage.exists(url) and storage.is_dir(url) and not storage.is_dir(f"{url}/a.parquet")
    assert not storage.exists(f"{url}/nope")

    def names(found):
        return sorted((path.rsplit("/tree/", 1)[1], length) for path, length in found)

    assert names(storage.glob(url, "*.parquet")) == [("a.parquet", 9), ("b.parquet", 9)]
    assert names(storage.glob(url, "*=*/*.parquet")) == [("split=test/d.parquet", 20)]
    assert names(storage.glob(url, "*.{txt,csv}")) == [("c.txt", 5)]
    assert storage.glob(f"{url}/nope", "*.parquet") == []

    out = tmp_path / "out"
    for content in (b"old", b"half", b"new"):
        with contextlib.suppress(RuntimeError), atomic_output(storage, out.as_uri(), kind="evaluation", key="k") as staged:
            storage.write_bytes(f"{staged.url}/metrics.json", content)
            if content == b"half":
                raise RuntimeError("boom")
        assert (out / "metrics.json").read_bytes() == (b"new" if content == b"new" else b"old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tree"]  # no temporary, old or lock file left
    storage.delete(out.as_uri())
    assert not out.exists()
