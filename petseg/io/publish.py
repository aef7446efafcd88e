"""How a stage publishes an output folder, so that nothing a user owns is lost and no reader trusts half of one.

Every output (a dataset, its rejects table, inference's masks, an evaluation, a training run) is
written into a temporary sibling and then replaces its folder whole. Four rules make that safe on
every storage:

- **Only petseg's own folders are replaced.** Each published folder carries a manifest,
  :data:`MANIFEST_FILE`, saying what kind of output it is. An existing folder is replaced only when
  it is empty, holds a manifest of the same kind, or is recognisably an older petseg output of that
  kind (:func:`check_replaceable`); anything else is refused with the fix.
- **The manifest is written last and lists every file with its size** (and the rows, where the
  stage counted them). A reader checks the folder against it (:func:`verify`), so a partial copy
  (an object store's rename is a copy, file by file) or a folder holding two runs' files fails
  loudly instead of being read.
- **One writer at a time.** A lock file beside the output (``<output>.petseg-lock``), refreshed while
  the job runs, refuses a second job writing the same output; a lock left by a killed job goes stale.
- **A publish cut short is repaired by the next one.** The old output is renamed aside
  (``.petseg-old-*``) before the new one takes its place and deleted after; the next publish finds
  what an interrupted one left and restores or removes it (:func:`recover`).

What is atomic where: on HDFS and local disks (and Databricks' /dbfs and /Volumes mounts of them)
each rename is atomic, so a reader sees the old output or the new one, or, between the two renames,
none. On object stores (s3a, gs, abfss without hierarchical namespace) a rename copies file by file:
a reader may meet a partial folder, which :func:`verify` refuses, and a driver killed mid-copy
leaves one that the next publish repairs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from petseg.errors import InputError
from petseg.io import urls

if TYPE_CHECKING:
    from petseg.io.fs import Storage

log = logging.getLogger(__name__)

#: In every published folder: its kind, files and rows. A hidden name (``_``), so Spark, pyarrow and
#: petastorm readers skip it as they skip ``_SUCCESS``.
MANIFEST_FILE = "_petseg_output.json"
#: What petseg publishes.
KINDS = ("dataset", "rejects", "masks", "evaluation", "run")
#: Suffixes of the siblings a publish uses.
TMP_MARK, OLD_MARK, LOCK_SUFFIX = ".petseg-tmp-", ".petseg-old-", ".petseg-lock"
#: A running job rewrites its lock this often; a lock not rewritten for LOCK_STALE_SECONDS belongs to
#: a job that died (10 missed refreshes: a driver paused by a long GC or a slow store still holds it).
LOCK_REFRESH_SECONDS = 30.0
LOCK_STALE_SECONDS = 300.0

#: What older petseg releases (before manifests) left in each kind of folder: the names at its top.
_LEGACY_NAMES = {
    "dataset": lambda n: n in ("_common_metadata", "_SUCCESS") or n.startswith("split="),
    "rejects": lambda n: n == "_SUCCESS" or n.startswith("part-"),
    "masks": lambda n: n in ("_SUCCESS", "_spark_metadata", "_checkpoint") or n.startswith("part-"),
    "evaluation": lambda n: n in ("metrics.json", "predictions.png"),
}
#: The name that proves a legacy folder is that kind, not merely a folder of look-alike names.
_LEGACY_PROOF = {"dataset": "_common_metadata", "evaluation": "metrics.json", "run": "petseg-model.json"}


@dataclass
class Staged:
    """The temporary folder a stage writes into (``url``), and the rows it wrote, for the manifest."""

    url: str
    rows: dict[str, int] = field(default_factory=dict)


def files(url: str) -> dict[str, int]:
    """Every file under ``url`` (relative path -> size), but dot-files (Hadoop's ``.crc``) and the manifest."""
    from pyarrow import fs as pafs

    filesystem, root = urls.arrow_filesystem(url)
    root = root.rstrip("/")
    found = {}
    for info in filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        relative = info.path[len(root) + 1:]
        if info.is_file and relative != MANIFEST_FILE and not posixpath.basename(relative).startswith("."):
            found[relative] = int(info.size)
    return found


def read_manifest(url: str) -> dict[str, Any] | None:
    """The manifest of a published folder, or None when it has none (or an unreadable one)."""
    filesystem, root = urls.arrow_filesystem(url)
    try:
        with filesystem.open_input_stream(f"{root.rstrip('/')}/{MANIFEST_FILE}") as stream:
            manifest = json.loads(stream.readall())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("kind") in KINDS else None


def _top_names(storage: Storage, url: str) -> list[str]:
    from pyarrow import fs as pafs

    filesystem, root = urls.arrow_filesystem(url)
    return sorted(i.base_name for i in filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                  if not i.base_name.startswith("."))


def check_replaceable(storage: Storage, url: str, *, kind: str, key: str) -> None:
    """Refuse to publish ``kind`` over ``url`` unless it is missing, empty, or a petseg output of that kind.

    Raises
    ------
    InputError
        Naming ``key``, what the folder holds, and the fix.
    """
    if not storage.exists(url):
        return
    if not storage.is_dir(url):
        raise InputError(f"{key}={url!r} is a file, not a folder; point {key} at a new folder")
    manifest = read_manifest(url)
    if manifest is not None:
        if manifest["kind"] != kind:
            raise InputError(
                f"{key}={url!r} holds a petseg {manifest['kind']}, not a {kind}; replacing it would delete it, "
                f"so point {key} at another folder"
            )
        return
    names = _top_names(storage, url)
    legacy = _LEGACY_NAMES.get(kind)
    proof = _LEGACY_PROOF.get(kind)
    if not names or (legacy is not None and all(legacy(n) for n in names) and (proof is None or proof in names)):
        return
    if kind == "run" and proof in names:
        return
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise InputError(
        f"{key}={url!r} exists and is not a folder petseg wrote as a {kind} (it holds {shown}); petseg replaces "
        f"its output folder whole, so point {key} at a new or empty folder, or move those files away first"
    )


def verify(url: str, *, kind: str, key: str) -> dict[str, Any]:
    """Check a published folder against its manifest before reading it; return the manifest.

    Raises
    ------
    InputError
        When the folder has no manifest (a copy in progress or cut short, or written by a petseg older
        than manifests), holds another kind, or its files differ from those the manifest lists.
    """
    manifest = read_manifest(url)
    if manifest is None:
        raise InputError(
            f"{key}={url!r} has no {MANIFEST_FILE}: it is not a complete {kind} petseg published (a copy still "
            f"running or cut short, or one written before petseg recorded manifests); re-run the job that writes it"
        )
    if manifest["kind"] != kind:
        raise InputError(f"{key}={url!r} holds a petseg {manifest['kind']}, not a {kind}; point {key} at a {kind}")
    listed, found = manifest.get("files", {}), files(url)
    if listed != found:
        missing = sorted(set(listed) - set(found))
        extra = sorted(set(found) - set(listed))
        changed = sorted(n for n in set(listed) & set(found) if listed[n] != found[n])
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing", missing), ("not its own", extra), ("of another size", changed)) if v]
        raise InputError(
            f"{key}={url!r} does not match its {MANIFEST_FILE}: {'; '.join(parts)} file(s); it is partial or mixed "
            f"(a copy cut short, or another writer's files): re-run the job that writes it"
        )
    return manifest


def verify_if_published(url: str, *, key: str) -> dict[str, Any] | None:
    """:func:`verify` for a folder that carries a manifest; None for anything else (a user's own Parquet
    folder, a file, photos), which petseg cannot check."""
    manifest = read_manifest(url)
    return None if manifest is None else verify(url, kind=manifest["kind"], key=key)


def recover(storage: Storage, url: str) -> None:
    """Repair what an interrupted publish of ``url`` left beside it; call with its lock held.

    A ``.petseg-old-*`` sibling is the previous output, renamed aside: when ``url`` is missing, or is
    not a whole output (its copy was cut short), the newest one is put back; otherwise the publish got
    as far as replacing it and it is deleted. ``.petseg-tmp-*`` siblings are unfinished writes.
    """
    base = url.rstrip("/")
    olds = sorted(storage.siblings(base, OLD_MARK), key=storage.modified)
    for tmp in storage.siblings(base, TMP_MARK):
        log.info("removing %s, an unfinished write of an earlier run", tmp)
        storage.delete(tmp)
    if not olds:
        return
    whole = storage.exists(base) and read_manifest(base) is not None and _matches(base)
    if not whole:
        if storage.exists(base):
            log.warning("removing %s: a publish cut short left it partial", base)
            storage.delete(base)
        log.warning("restoring %s from %s, which an interrupted publish renamed aside", base, olds[-1])
        storage.rename(olds[-1], base)
        olds = olds[:-1]
    for old in olds:
        storage.delete(old)


def _matches(url: str) -> bool:
    manifest = read_manifest(url)
    return manifest is not None and manifest.get("files") == files(url)


class _Lock:
    """``<output>.petseg-lock``: created only if absent, rewritten every LOCK_REFRESH_SECONDS until released."""

    def __init__(self, storage: Storage, url: str, *, key: str) -> None:
        self._storage, self._url, self._key = storage, url.rstrip("/") + LOCK_SUFFIX, key
        self._owner = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self._owner, "refreshed": time.time()}).encode()

    def acquire(self) -> None:
        if not self._storage.create_new(self._url, self._body()):
            holder = self._holder()
            age = time.time() - float(holder.get("refreshed", 0))
            if age < LOCK_STALE_SECONDS:
                raise InputError(
                    f"{self._key}={self._url[:-len(LOCK_SUFFIX)]!r} is being written by another job "
                    f"(host {holder.get('host')}, pid {holder.get('pid')}, lock refreshed {age:.0f} s ago); wait for it "
                    f"to finish, or write elsewhere. If no such job runs, delete {self._url}"
                )
            log.warning("taking over %s, not refreshed for %.0f s: its job died", self._url, age)
            self._storage.delete(self._url)
            if not self._storage.create_new(self._url, self._body()):
                raise InputError(f"{self._key}: another job took the lock {self._url} at the same moment; retry later")
        self._thread = threading.Thread(target=self._refresh, name="petseg-lock", daemon=True)
        self._thread.start()

    def _holder(self) -> dict[str, Any]:
        from petseg.io.fs import read_file

        try:
            return json.loads(read_file(self._url))
        except ValueError:  # unreadable, or deleted meanwhile (read_file's RejectedInput): no holder
            return {}

    def _refresh(self) -> None:
        while not self._stop.wait(LOCK_REFRESH_SECONDS):
            if self._holder().get("id") != self._owner["id"]:
                log.error("lost the lock %s to another job", self._url)
                return
            self._storage.write_bytes(self._url, self._body())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # a refresh in flight would write the lock again after the delete below
        if self._holder().get("id") == self._owner["id"]:
            self._storage.delete(self._url)


@contextlib.contextmanager
def atomic_output(storage: Storage, url: str, *, kind: str, key: str) -> Iterator[Staged]:
    """Stage an output in a temporary sibling; on success, replace ``url`` with it, manifest written last.

    Parameters
    ----------
    storage
        The session's :class:`~petseg.io.fs.Storage`.
    url
        The output folder.
    kind
        One of :data:`KINDS`: what the folder holds, checked before it is replaced.
    key
        The config key that named ``url``, for error messages.

    Yields
    ------
    Staged
        The temporary folder to write into; set ``rows`` to what was written for the manifest.

    Raises
    ------
    InputError
        When ``url`` is not a petseg ``kind`` (:func:`check_replaceable`) or another job is writing it.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not an output kind; use one of {', '.join(KINDS)}")
    base = url.rstrip("/")
    with writer_lock(storage, base, key=key):
        check_replaceable(storage, base, kind=kind, key=key)
        staged = Staged(f"{base}{TMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            yield staged
            write_manifest(storage, staged, kind=kind)
            replace(storage, staged.url, base)
        except BaseException:
            storage.delete(staged.url)
            raise


@contextlib.contextmanager
def writer_lock(storage: Storage, url: str, *, key: str) -> Iterator[None]:
    """Hold ``<url>.petseg-lock`` while writing ``url``, having repaired what an interrupted publish left.

    Raises
    ------
    InputError
        When another job holds the lock (refreshed within LOCK_STALE_SECONDS), naming it and the fix.
    """
    lock = _Lock(storage, url.rstrip("/"), key=key)
    lock.acquire()
    try:
        recover(storage, url.rstrip("/"))
        yield
    finally:
        lock.release()


def write_manifest(storage: Storage, staged: Staged, *, kind: str) -> None:
    """Write the manifest of a finished folder: its kind, files and rows, the last file written."""
    from petseg import __version__

    manifest = {"kind": kind, "petseg": __version__, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "rows": staged.rows, "files": files(staged.url)}
    storage.write_bytes(f"{staged.url}/{MANIFEST_FILE}", json.dumps(manifest, indent=1, sort_keys=True).encode())


def replace(storage: Storage, src: str, dst: str) -> None:
    """Move the folder ``src`` to ``dst``, replacing what ``dst`` holds.

    The old output is renamed aside first and deleted last, so a reader sees the old folder or the
    new one (or, between two renames, none); a failure puts the old one back, and a driver killed in
    between leaves siblings that the next publish repairs (:func:`recover`).
    """
    base = dst.rstrip("/")
    old = f"{base}{OLD_MARK}{uuid.uuid4().hex[:12]}"
    had_old = storage.exists(base)
    if had_old:
        storage.rename(base, old)
    try:
        storage.rename(src, base)
    except BaseException:
        if had_old:
            if storage.exists(base):
                storage.delete(base)  # a copy cut short
            storage.rename(old, base)
        raise
    if had_old:
        storage.delete(old)
    log.info("wrote %s", base)
