"""The one rule from a location (URL, mount or table name) to what each library needs.

A location is a catalog table name (``name``, ``schema.name``, ``catalog.schema.name``: no slash),
a URL ``scheme://authority/path`` (also Hadoop's ``file:/path`` form), or a local path, which
:func:`normalize_url` turns into a ``file://`` URL. Databricks' ``dbfs:/x`` and Unity Catalog's
``/Volumes/...`` are read through their local mounts (``file:///dbfs/x``, ``file:///Volumes/...``).

Percent-escapes
---------------
None. Every character after ``scheme://authority`` is the path's own: ``file:///data/50%25 #1.jpg``
names a file called ``50%25 #1.jpg``, with a space, a ``%`` and a ``#`` in it. This is Hadoop's rule
(``new Path(String)`` quotes what it is given; query and fragment are not supported) and so the form
Spark lists paths in (binaryFile's ``path`` column, file statuses), and it is how pyarrow and
fsspec take paths. It is not RFC 8089: a URI from ``pathlib.Path.as_uri()`` or a browser keeps its
``%20`` as three characters, so pass the plain path instead. Nothing in petseg unquotes a URL.

Who handles what
----------------
- Spark's Hadoop FileSystem (:class:`petseg.io.fs.Storage`): what the cluster writes (datasets,
  outputs, renames), where its credentials and committers are configured.
- pyarrow (:func:`arrow_filesystem`): listing and reading files on the driver and executors, and
  Parquet footers. Its own file systems where it has one (local, HDFS, S3 for ``s3://`` and
  ``s3a://``, GCS), which are native and need no extra package; fsspec's for the other schemes
  (e.g. ``abfss://`` through adlfs), wrapped as a pyarrow file system so callers see one API.
- The local file system (:func:`local_path`): what TensorFlow, MLflow and ``open()`` read and
  write, which must be a local path or a mount every node sees (NFS, ``/dbfs``, ``/Volumes``).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from petseg.errors import ConfigError

#: URL schemes the dataset writer and the Petastorm reader both understand.
DATASET_SCHEMES = ("file", "hdfs", "viewfs", "s3a", "s3", "gs", "abfss", "dbfs")
#: Databricks' mounts of shared storage: the same files on every node of its cluster, as local paths.
SHARED_MOUNTS = ("/dbfs", "/Volumes")
#: Schemes pyarrow has a file system of its own for (s3a:// is Hadoop's name for the same S3).
_ARROW_SCHEMES = {"hdfs": "hdfs", "viewfs": "viewfs", "s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs"}

_TABLE_PART = r"(`[^`/]+`|[A-Za-z_]\w*)"
_TABLE_NAME = re.compile(rf"^{_TABLE_PART}(\.{_TABLE_PART}){{0,2}}$")
# scheme ":" ["//" authority] path: query and fragment are not parsed, as in Hadoop's Path.
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):(?://(?P<authority>[^/]*))?(?P<path>/.*)?$")


class Url(NamedTuple):
    """A URL's parts, each literal: ``scheme``, ``authority`` (host:port, bucket; "" if none), ``path``."""

    scheme: str
    authority: str
    path: str

    def with_path(self, path: str) -> str:
        """This URL with another path, in the form it was given (``scheme://authority/path``)."""
        return f"{self.scheme}://{self.authority}{path}"


def is_table_name(value: str) -> bool:
    """Whether ``value`` names a catalog table (``name``, ``schema.name``, ``catalog.schema.name``).

    Anything with a slash or a URL scheme is a path; write ``./masks`` for a relative folder.
    """
    return "/" not in value and bool(_TABLE_NAME.match(value))


#: The URI schemes of models in MLflow, read through MLflow rather than as files.
MLFLOW_SCHEMES = ("models:/", "runs:/")


def is_mlflow_uri(value: str) -> bool:
    """Whether ``value`` names a model in MLflow (``models:/...``, ``runs:/...``) rather than a folder."""
    return str(value).startswith(MLFLOW_SCHEMES)


def split_url(url: str) -> Url:
    """The literal parts of a URL; a plain path is a ``file`` URL.

    Raises
    ------
    ValueError
        For a relative path, which only :func:`normalize_url` may resolve (against the driver's cwd).
    """
    if is_plain_path(url):  # no scheme ("C:/..." is a drive, not one)
        if not url.startswith("/"):
            raise ValueError(f"{url!r} is a relative path; pass an absolute path or a URL")
        return Url("file", "", url)
    match = _URL.match(url)
    assert match is not None
    return Url(match.group("scheme").lower(), match.group("authority") or "", match.group("path") or "")


def normalize_url(url: str, *, key: str) -> str:
    """Turn a user's location into the URL every petseg stage uses for it.

    Plain paths become absolute ``file://`` URLs, their characters unchanged; ``dbfs:/x`` becomes its
    FUSE mount ``file:///dbfs/x``, which Petastorm's pyarrow reader can open and Spark can write.

    Raises
    ------
    ConfigError
        Naming ``key`` when the scheme is not one petseg reads and writes.
    """
    if url.startswith("dbfs:/"):
        return "file:///dbfs/" + url[len("dbfs:/"):].lstrip("/")
    if "://" not in url and not url.startswith("file:/"):
        # Not Path.as_uri(): it percent-encodes, and Hadoop would then look for a file named
        # "%2A.jpg" instead of expanding the glob "*.jpg".
        return "file://" + str(Path(url).expanduser().absolute())
    parts = split_url(url)
    if parts.scheme not in DATASET_SCHEMES:
        raise ConfigError(
            f"{key}={url!r} has the unsupported scheme {parts.scheme!r}; use one of {', '.join(DATASET_SCHEMES)} "
            "or a plain local path"
        )
    return parts.with_path(parts.path) if parts.scheme == "file" else url


def petastorm_url(url: str, *, key: str) -> str:
    """``url``, checked for Petastorm's reader, which parses dataset URLs with urllib's ``urlparse``.

    Raises
    ------
    ConfigError
        When the path holds ``#`` or ``?``: ``urlparse`` would cut the path there, and the reader
        would open another folder than the one ingest wrote.
    """
    bad = sorted({c for c in split_url(url).path if c in "#?"})
    if bad:
        raise ConfigError(
            f"{key}={url!r} holds {' and '.join(repr(c) for c in bad)}, which Petastorm's reader takes for the "
            "start of a URL fragment or query; choose a dataset folder whose path has neither"
        )
    return url


def is_local(url: str) -> bool:
    """Whether ``url`` is on the local file system (or a mount of it): a ``file:`` URL or a path."""
    return is_plain_path(url) or split_url(url).scheme == "file"


def is_plain_path(url: str) -> bool:
    """Whether ``url`` is a path without a scheme (``runs/r1``, ``/data/pets``), not a URL (``file:///x``)."""
    match = _URL.match(url)
    return match is None or len(match.group("scheme")) == 1


def on_shared_mount(path: str) -> bool:
    """Whether an absolute local path lies under one of :data:`SHARED_MOUNTS` (``/dbfs/x``, ``/Volumes/x``)."""
    return any(path == mount or path.startswith(mount + "/") for mount in SHARED_MOUNTS)


#: Schemes that name the same storage (Hadoop's s3a:// and pyarrow's s3:// are one bucket).
_SAME_STORAGE = {"s3a": "s3", "gcs": "gs"}


def place(url: str) -> tuple[str, str, tuple[str, ...]]:
    """Where a normalised URL points, comparable with another's: (scheme, authority, path parts).

    The path ends before its first glob component (a glob's files lie under that folder), and a local
    one is resolved through symbolic links, so ``/tmp/x`` and a link to it are the same place.
    """
    parts = split_url(url)
    path = parts.path
    if parts.scheme == "file":
        path = os.path.realpath(path)
    components = [c for c in path.split("/") if c]
    glob_at = next((i for i, c in enumerate(components) if any(g in c for g in "*?[{")), len(components))
    return _SAME_STORAGE.get(parts.scheme, parts.scheme), parts.authority, tuple(components[:glob_at])


def overlap(a: str, b: str) -> str | None:
    """How the location ``a`` relates to ``b``: "is", "contains", "lies inside", or None when apart."""
    pa, pb = place(a), place(b)
    if pa[:2] != pb[:2]:
        return None
    if pa[2] == pb[2]:
        return "is"
    if pb[2][: len(pa[2])] == pa[2]:
        return "contains"
    if pa[2][: len(pb[2])] == pb[2]:
        return "lies inside"
    return None


def local_path(url: str) -> Path:
    """The local path of a ``file:`` URL (``file:///x``, ``file:/x``) or of a plain path, unchanged.

    Raises
    ------
    ValueError
        When ``url`` is on another file system (HDFS, an object store); callers say which key to fix.
    """
    if not is_local(url):
        raise ValueError(f"{url!r} is not on the local file system or a mount of it")
    return Path(url) if is_plain_path(url) else Path(split_url(url).path)


class Route(NamedTuple):
    """Which library opens a URL: ``library`` (``pyarrow`` or ``fsspec``), its file system ``name`` (a
    pyarrow class, or an fsspec protocol), the ``root`` URI to create it from, the ``path`` to pass it,
    and the ``package``/``extra`` it needs where pyarrow has none of its own."""

    library: str
    name: str
    root: str
    path: str
    package: str | None = None
    extra: str | None = None


#: Schemes pyarrow has no file system for, and the fsspec implementation and petseg extra that open them.
FSSPEC_SCHEMES = {"abfss": ("abfs", "adlfs", "azure"), "abfs": ("abfs", "adlfs", "azure")}


def filesystem_route(url: str) -> Route:
    """The library, file system and path that open ``url`` (see the module docstring); nothing is created."""
    parts = split_url(url)
    if parts.scheme == "file":
        return Route("pyarrow", "LocalFileSystem", "", parts.path)
    arrow_scheme = _ARROW_SCHEMES.get(parts.scheme)
    root = f"{arrow_scheme}://{parts.authority}"
    if arrow_scheme in ("hdfs", "viewfs"):
        return Route("pyarrow", "HadoopFileSystem", root, parts.path)
    if arrow_scheme == "s3":
        return Route("pyarrow", "S3FileSystem", root, parts.authority + parts.path)
    if arrow_scheme == "gs":
        return Route("pyarrow", "GcsFileSystem", root, parts.authority + parts.path)
    protocol, package, extra = FSSPEC_SCHEMES.get(parts.scheme, (parts.scheme, None, None))
    return Route("fsspec", protocol, f"{protocol}://{parts.authority}{parts.path}", "", package, extra)


def arrow_filesystem(url: str) -> tuple[Any, str]:
    """A pyarrow file system for ``url`` and the path to pass it, as :func:`filesystem_route` says.

    Raises
    ------
    ImportError
        When the scheme needs a package that is not installed, naming it and petseg's extra for it
        (``pip install 'petseg[azure]'`` for ``abfss://``).
    """
    route = filesystem_route(url)
    if route.library == "pyarrow":
        if route.name == "LocalFileSystem":
            from pyarrow import fs

            return fs.LocalFileSystem(), route.path
        return _arrow_root(route.root), route.path
    import fsspec
    from pyarrow import fs

    try:
        filesystem, path = fsspec.core.url_to_fs(route.root)  # fsspec keeps one instance per scheme and options
    except ImportError as exc:
        if route.package is None:
            raise
        raise ImportError(
            f"{url!r}: {split_url(url).scheme}:// is read through the {route.package} package, which is not "
            f"installed ({exc}); pip install 'petseg[{route.extra}]' on the driver and every executor"
        ) from None
    return fs.PyFileSystem(fs.FSSpecHandler(filesystem)), path


def petastorm_source(url: str) -> tuple[str, Any]:
    """``(dataset_url, filesystem)`` to pass Petastorm's ``make_reader`` for a dataset at ``url``.

    A workaround for petastorm 0.13.1 on pyarrow 14 (the pins; see docs/databricks.md): Petastorm opens
    ``file://`` itself, but for any other scheme its ``FilesystemResolver`` goes through fsspec (s3fs
    for ``s3a://``, gcsfs for ``gs://``; it knows no ``abfss://``) and hands the fsspec object to
    pyarrow's ``ParquetDataset``, which then takes its new Dataset API and fails with "Keyword
    'validate_schema' is not yet supported with the new Dataset API". So petseg passes the file system
    of :func:`arrow_filesystem`, behind pyarrow's legacy interface that this ``ParquetDataset`` calls,
    with a ``file://`` URL of the path on it: Petastorm takes the path of a ``file://`` URL as it
    stands (``fs_utils.get_dataset_path``), where it would import an fsspec package to strip any other.
    """
    if split_url(url).scheme == "file":
        return url, None
    from petseg.io.arrow_legacy import LegacyArrowFileSystem

    filesystem, path = arrow_filesystem(url)
    legacy = LegacyArrowFileSystem(filesystem, absolute=path.startswith("/"))
    return "file://" + legacy.outer(path), legacy


@lru_cache(maxsize=8)
def _arrow_root(root: str) -> Any:
    """One pyarrow file system per scheme and host per process: creating one (an S3 client, an HDFS
    connection) costs far more than reading a photo."""
    from pyarrow import fs

    return fs.FileSystem.from_uri(root)[0]

