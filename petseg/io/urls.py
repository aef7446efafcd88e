"""Locations: catalog table names, and the URLs and paths every stage reads and writes."""

from __future__ import annotations

import re
from pathlib import Path

from petseg.errors import ConfigError

#: URL schemes the dataset writer and the Petastorm reader both understand.
DATASET_SCHEMES = ("file", "hdfs", "viewfs", "s3a", "s3", "gs", "abfss", "dbfs")

_TABLE_PART = r"(`[^`/]+`|[A-Za-z_]\w*)"
_TABLE_NAME = re.compile(rf"^{_TABLE_PART}(\.{_TABLE_PART}){{0,2}}$")


def is_table_name(value: str) -> bool:
    """Whether ``value`` names a catalog table (``name``, ``schema.name``, ``catalog.schema.name``).

    Anything with a slash or a URL scheme is a path; write ``./masks`` for a relative folder.
    """
    return "/" not in value and bool(_TABLE_NAME.match(value))


def normalize_url(url: str, *, key: str) -> str:
    """Turn a user's path into a URL both Spark and Petastorm open.

    Plain paths become absolute ``file://`` URLs; Databricks ``dbfs:/x`` and Unity Catalog
    ``/Volumes/...`` paths go through their local FUSE mounts (``file:///dbfs/x``,
    ``file:///Volumes/...``), which Petastorm's pyarrow reader can open and Spark can write.
    """
    if url.startswith("dbfs:/"):
        return "file:///dbfs/" + url[len("dbfs:/") :].lstrip("/")
    if "://" not in url:
        # Not Path.as_uri(): it percent-encodes, and Hadoop would then look for a file named
        # "%2A.jpg" instead of expanding the glob "*.jpg".
        return "file://" + str(Path(url).expanduser().absolute())
    scheme = url.split("://", 1)[0].lower()
    if scheme not in DATASET_SCHEMES:
        raise ConfigError(
            f"{key}={url!r} has the unsupported scheme {scheme!r}; use one of {', '.join(DATASET_SCHEMES)} "
            "or a plain local path"
        )
    return url
