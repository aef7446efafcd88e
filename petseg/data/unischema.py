"""Petastorm's dataset metadata, written and read without petastorm.

A Petastorm dataset's ``_common_metadata`` is a Parquet footer without rows whose key-value metadata
holds two entries (petastorm/etl/dataset_metadata.py, 0.13.1):

- :data:`UNISCHEMA_KEY`: the dataset's ``Unischema``, pickled. ``make_reader`` needs it;
- :data:`ROW_GROUPS_PER_FILE_KEY`: JSON, each data file's path relative to the dataset -> its number
  of row groups, from which petastorm's readers enumerate and shard row groups.

petastorm 0.13.1 cannot run on pyarrow >= 15 (uber/petastorm#805: unmaintained), so where it cannot,
petseg writes the same footer itself: :func:`unischema_pickle` emits, opcode by opcode, the pickle
that ``pickle.dumps`` gives for petastorm's Unischema of those fields, naming petastorm's classes
without importing them. petastorm unpickles it into its own classes. petseg reads it back with
:func:`read_fields`, an unpickler that builds nothing but plain records: it never imports petastorm,
and a crafted ``_common_metadata`` cannot run code through it.
"""

from __future__ import annotations

import collections
import json
import pickle
import posixpath
import struct
from typing import Any, NamedTuple, Sequence

from petseg.data.schema import JPEG_QUALITY, SCHEMA_NAME, Field

UNISCHEMA_KEY = b"dataset-toolkit.unischema.v1"
ROW_GROUPS_PER_FILE_KEY = b"dataset-toolkit.num_row_groups_per_file.v1"
COMMON_METADATA = "_common_metadata"

#: petastorm's default quality for CompressedImageCodec, kept in a PNG codec's state (PNG ignores it).
_PETASTORM_DEFAULT_QUALITY = 80

#: The Spark type petastorm's ScalarCodec records for each scalar dtype petseg writes.
_SPARK_TYPES = {"str_": "StringType", "int32": "IntegerType"}

_CODEC_CLASSES = {"scalar": "ScalarCodec", "ndarray": "NdarrayCodec", "jpeg": "CompressedImageCodec",
                  "png": "CompressedImageCodec"}


class _Global(NamedTuple):
    """A class or function, pickled by module and name."""

    module: str
    name: str


class _New(NamedTuple):
    """An instance: ``cls.__new__(cls, *args)``, then its ``__dict__`` set to ``state`` when there is one."""

    cls: _Global
    args: tuple
    state: dict | None = None


class _Ordered(NamedTuple):
    """A ``collections.OrderedDict`` of these items."""

    items: tuple


def unischema_pickle(fields: Sequence[Field], *, name: str = SCHEMA_NAME) -> bytes:
    """The pickle of petastorm's ``Unischema(name, fields)``, written without petastorm.

    Protocol 2, the oldest that has ``NEWOBJ``, so every Python 3 reads it. The instance state is what
    petastorm 0.13.1's objects hold: the Unischema's ``_name``, ``_fields`` and one attribute per field
    (``Unischema.__init__`` sets them); each UnischemaField a namedtuple of name, numpy type, shape,
    codec and nullable; each codec its ``__dict__``.
    """
    unischema_fields = [_unischema_field(f) for f in fields]
    state = {"_name": name, "_fields": _Ordered(tuple((f.args[0], f) for f in unischema_fields))}
    state.update((f.args[0], f) for f in unischema_fields)
    out = [pickle.PROTO, b"\x02"]
    _emit(_New(_Global("petastorm.unischema", "Unischema"), (), state), out, {})
    out.append(pickle.STOP)
    return b"".join(out)


def _unischema_field(field: Field) -> _New:
    cls = _Global("petastorm.codecs", _CODEC_CLASSES[field.codec])
    if field.codec == "scalar":
        codec = _New(cls, (), {"_spark_type": _New(_Global("pyspark.sql.types", _SPARK_TYPES[field.dtype]), ())})
    elif field.codec == "ndarray":
        codec = _New(cls, ())
    else:
        quality = JPEG_QUALITY if field.codec == "jpeg" else _PETASTORM_DEFAULT_QUALITY
        codec = _New(cls, (), {"_image_codec": f".{field.codec}", "_quality": quality})
    return _New(_Global("petastorm.unischema", "UnischemaField"),
                (field.name, _Global("numpy", field.dtype), tuple(field.shape), codec, field.nullable))


def _emit(value: Any, out: list[bytes], memo: dict[int, int]) -> None:
    """Append the protocol-2 opcodes that rebuild ``value``; an instance seen before is fetched from the memo."""
    if isinstance(value, _Global):
        out.append(pickle.GLOBAL + f"{value.module}\n{value.name}\n".encode("ascii"))
    elif isinstance(value, _New):
        if id(value) in memo:
            out.append(pickle.BINGET + bytes([memo[id(value)]]) if memo[id(value)] < 256
                       else pickle.LONG_BINGET + struct.pack("<I", memo[id(value)]))
            return
        _emit(value.cls, out, memo)
        _emit(value.args, out, memo)
        out.append(pickle.NEWOBJ)
        if value.state:
            _emit(value.state, out, memo)
            out.append(pickle.BUILD)
        memo[id(value)] = len(memo)
        out.append(pickle.BINPUT + bytes([memo[id(value)]]) if memo[id(value)] < 256
                   else pickle.LONG_BINPUT + struct.pack("<I", memo[id(value)]))
    elif isinstance(value, _Ordered):
        _emit(_Global("collections", "OrderedDict"), out, memo)
        out += [pickle.EMPTY_TUPLE, pickle.REDUCE]
        _emit_items(value.items, out, memo)
    elif isinstance(value, dict):
        out.append(pickle.EMPTY_DICT)
        _emit_items(tuple(value.items()), out, memo)
    elif isinstance(value, tuple):
        out.append(pickle.MARK)
        for item in value:
            _emit(item, out, memo)
        out.append(pickle.TUPLE)
    elif isinstance(value, bool):
        out.append(pickle.NEWTRUE if value else pickle.NEWFALSE)
    elif isinstance(value, int):
        out.append(pickle.BININT + struct.pack("<i", value))
    elif isinstance(value, str):
        data = value.encode("utf-8")
        out.append(pickle.BINUNICODE + struct.pack("<I", len(data)) + data)
    elif value is None:
        out.append(pickle.NONE)
    else:
        raise TypeError(f"{type(value).__name__} {value!r} is not part of a Unischema")


def _emit_items(items: tuple, out: list[bytes], memo: dict[int, int]) -> None:
    if items:
        out.append(pickle.MARK)
        for key, item in items:
            _emit(key, out, memo)
            _emit(item, out, memo)
        out.append(pickle.SETITEMS)


class _Record:
    """What :class:`_FieldsUnpickler` builds in place of any petastorm or pyspark object: its class's
    module and name, the arguments it was created with, and its state."""

    module = name = ""

    def __new__(cls, *args: Any) -> "_Record":
        record = super().__new__(cls)
        record.args, record.state = args, {}
        return record

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


#: The classes a Unischema's pickle may name (petastorm's, and pyspark's types in ScalarCodecs).
_RECORDED_MODULES = ("petastorm.unischema", "petastorm.codecs", "pyspark.sql.types")


class _FieldsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "numpy" and name.isidentifier():
            import numpy as np

            found = getattr(np, name, None)
            if isinstance(found, type) and issubclass(found, np.generic):
                return found
        if module in _RECORDED_MODULES and name.isidentifier():
            return type(name, (_Record,), {"module": module, "name": name})
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a Unischema")


def read_fields(blob: bytes, *, where: str) -> tuple[Field, ...]:
    """The fields of a pickled Unischema (petastorm's or :func:`unischema_pickle`'s), without petastorm.

    Raises
    ------
    ValueError
        When ``blob`` is not a Unischema of fields petseg can read, naming ``where`` and what is wrong.
    """
    import io

    try:
        schema = _FieldsUnpickler(io.BytesIO(blob)).load()
        if not (isinstance(schema, _Record) and schema.name == "Unischema"):
            raise ValueError(f"it holds a {type(schema).__name__}, not a Unischema")
        return tuple(_field(f) for f in schema.state["_fields"].values())
    except (pickle.UnpicklingError, ValueError, KeyError, AttributeError, IndexError, TypeError, EOFError) as exc:
        raise ValueError(f"{where}: the Petastorm Unischema cannot be read ({exc}); re-ingest the dataset") from None


def _field(record: _Record) -> Field:
    name, dtype, shape, codec, *rest = record.args
    if codec.name == "CompressedImageCodec":
        kind = codec.state["_image_codec"].lstrip(".")
    else:
        kind = {"ScalarCodec": "scalar", "NdarrayCodec": "ndarray"}.get(codec.name, codec.name)
    return Field(name, dtype.__name__, tuple(shape), kind, bool(rest[0]) if rest else False)


def write_common_metadata(dataset_url: str, fields: Sequence[Field], *, name: str = SCHEMA_NAME) -> dict[str, int]:
    """Write ``_common_metadata`` at ``dataset_url`` as petastorm's ``materialize_dataset`` does.

    The Arrow schema of the first data file, with :data:`UNISCHEMA_KEY` and
    :data:`ROW_GROUPS_PER_FILE_KEY` added to its metadata. Data files are the ``.parquet`` files below
    the dataset that neither they nor their folders hide (``_`` or ``.``), as pyarrow's legacy
    ParquetDataset lists its pieces. Returns the row groups per file it recorded.
    """
    import pyarrow.parquet as pq

    from petseg.io import urls

    filesystem, root = urls.arrow_filesystem(dataset_url)
    files = data_files(filesystem, root)
    if not files:
        raise ValueError(f"{dataset_url} holds no Parquet data files to describe; nothing was written there")
    counts: dict[str, int] = {}
    schema = None
    for path in files:
        with filesystem.open_input_file(path) as f:
            footer = pq.ParquetFile(f)
            counts[posixpath.relpath(path, root)] = footer.metadata.num_row_groups
            schema = footer.schema_arrow if schema is None else schema
    schema = schema.with_metadata({**(schema.metadata or {}), UNISCHEMA_KEY: unischema_pickle(fields, name=name),
                                   ROW_GROUPS_PER_FILE_KEY: json.dumps(counts).encode()})
    with filesystem.open_output_stream(posixpath.join(root, COMMON_METADATA)) as f:
        pq.write_metadata(schema, f)
    return counts


def data_files(filesystem: Any, root: str) -> list[str]:
    """The dataset's data files in path order: what petastorm's readers take as its pieces."""
    from pyarrow import fs as pafs

    found = []
    for info in filesystem.get_file_info(pafs.FileSelector(root, recursive=True)):
        parts = posixpath.relpath(info.path, root).split("/")
        if info.is_file and parts[-1].endswith(".parquet") and not any(p.startswith(("_", ".")) for p in parts):
            found.append(info.path)
    return sorted(found)


def stored_fields(dataset_url: str) -> tuple[Field, ...]:
    """The fields a dataset's ``_common_metadata`` describes, whichever stack wrote it.

    Raises
    ------
    FileNotFoundError
        When the dataset has no ``_common_metadata``: it was not written by petseg's ingest.
    ValueError
        When the metadata holds no readable Unischema.
    """
    import pyarrow.parquet as pq

    from petseg.io import urls

    filesystem, root = urls.arrow_filesystem(dataset_url)
    path = posixpath.join(root, COMMON_METADATA)
    try:
        with filesystem.open_input_file(path) as f:
            metadata = pq.read_metadata(f).metadata or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{dataset_url} has no {COMMON_METADATA}: it is not a dataset petseg's ingest "
                                "wrote; re-run ingest into it") from None
    if UNISCHEMA_KEY not in metadata:
        raise ValueError(f"{dataset_url}/{COMMON_METADATA} holds no Petastorm Unischema; re-run ingest into it")
    return read_fields(metadata[UNISCHEMA_KEY], where=f"{dataset_url}/{COMMON_METADATA}")
