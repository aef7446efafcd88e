"""pyarrow's legacy ``pyarrow.filesystem`` interface over a ``pyarrow.fs`` file system, for Petastorm's reader.

Petastorm 0.13.1 reads through pyarrow's legacy ``ParquetDataset``, which takes only legacy file
systems; :func:`petseg.io.urls.petastorm_source` says why petseg hands it this one. Imported only
where a dataset is opened on a scheme other than ``file://``.
"""

from __future__ import annotations

import posixpath
import warnings
from typing import Any, Iterator

from pyarrow import fs

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pyarrow.filesystem is deprecated, and still what Petastorm's reader takes
    from pyarrow.filesystem import FileSystem


class LegacyArrowFileSystem(FileSystem):
    """A ``pyarrow.fs`` file system in the legacy ``pyarrow.filesystem`` interface, read-only, for Petastorm.

    Paths outside are absolute (``/bucket/key``); ``absolute=False`` marks a file system whose own paths
    are not (S3's and GCS's ``bucket/key``), where the leading slash is dropped on the way in.
    """

    pathsep = "/"

    def __init__(self, filesystem: Any, *, absolute: bool) -> None:
        self.filesystem = filesystem
        self.absolute = absolute

    def inner(self, path: str) -> str:
        """The file system's own path for an outer (absolute) one."""
        return path if self.absolute else path.lstrip("/")

    def outer(self, path: str) -> str:
        """The absolute path Petastorm sees for one of the file system's own."""
        return path if path.startswith("/") else "/" + path

    def _info(self, path: str) -> Any:
        return self.filesystem.get_file_info(self.inner(str(path)))

    def exists(self, path: str) -> bool:
        return self._info(path).type != fs.FileType.NotFound

    def isdir(self, path: str) -> bool:
        return self._info(path).type == fs.FileType.Directory

    def isfile(self, path: str) -> bool:
        return self._info(path).type == fs.FileType.File

    def _isfilestore(self) -> bool:
        return self.absolute

    def open(self, path: str, mode: str = "rb") -> Any:
        if mode != "rb":
            raise ValueError(f"{path}: petseg opens datasets read-only, not with mode {mode!r}")
        return self.filesystem.open_input_file(self.inner(str(path)))

    def ls(self, path: str) -> list[str]:
        listed = self.filesystem.get_file_info(fs.FileSelector(self.inner(str(path))))
        return sorted(self.outer(info.path) for info in listed)

    def walk(self, path: str) -> Iterator[tuple[str, list[str], list[str]]]:
        """Like ``os.walk``: (folder, sub-folder names, file names), top-down."""
        top = self.outer(str(path)).rstrip("/") or "/"
        listed = self.filesystem.get_file_info(fs.FileSelector(self.inner(top)))
        folders = sorted(posixpath.basename(i.path) for i in listed if i.type == fs.FileType.Directory)
        files = sorted(posixpath.basename(i.path) for i in listed if i.type == fs.FileType.File)
        yield top, folders, files
        for folder in folders:
            yield from self.walk(f"{top.rstrip('/')}/{folder}")
