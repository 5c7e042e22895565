"""Opening a GGUF file (llama.cpp's format, v2/v3): a bounded reader and typed metadata access.

The header, the key/value metadata and the tensor infos are parsed here, not by
``gguf.GGUFReader``: gguf-py reads arrays element by element (a numpy view per element, about
1 KB of memory each) and returns empty reads past the end of the file, so a 49-byte file that
claims 2^62 array elements makes it loop while memory grows without bound. Here every count
and length is checked against the bytes left in the file before anything is read or
allocated, arrays are read in one piece, and failures are :class:`InputError` /
:class:`UnsupportedError` naming the file, the key or the tensor. :class:`BoundedGGUFReader`
is a ``GGUFReader`` (same ``fields`` and ``tensors``, tensor data memory-mapped as gguf-py maps it).
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderField, ReaderTensor
from gguf.constants import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUFEndian

from llmc.compiler.errors import InputError, UnsupportedError
from llmc.compiler.frontends.gguf_tensors import DEQUANTIZED_TYPES

V = GGUFValueType
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4
SCALAR_FORMATS: dict[GGUFValueType, str] = {
    V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i", V.FLOAT32: "f",
    V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d",
}
INTEGER_TYPES = frozenset({V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64})
FLOAT_TYPES = frozenset({V.FLOAT32, V.FLOAT64})
_ITEM_TYPES: dict[GGMLQuantizationType, type[np.generic]] = {
    GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


def _min_size(vtype: GGUFValueType) -> int:
    """The fewest bytes a value of ``vtype`` takes (a string: its length; an array: type and count)."""
    if vtype == V.STRING:
        return 8
    if vtype == V.ARRAY:
        return 12
    return struct.calcsize(SCALAR_FORMATS[vtype])


class MetadataField(ReaderField):
    """A key/value field holding its decoded value (``parts[0]``: a scalar, the string's bytes, a
    numpy array of scalars, or a list of such values for arrays of strings or arrays)."""

    __slots__ = ()

    def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
        return _decode(self.parts[0], index_or_slice)


def _decode(value: Any, index_or_slice: int | slice = slice(None)) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return value[index_or_slice].tolist()
    if isinstance(value, list):
        if isinstance(index_or_slice, int):
            return _decode(value[index_or_slice])
        return [_decode(v) for v in value[index_or_slice]]
    return value


class _Cursor:
    """Bounds-checked little- (or big-) endian reads from a buffer; errors name the file."""

    def __init__(self, buffer: Any, path: Path, order: str) -> None:
        self.buffer = buffer
        self.size = len(buffer)
        self.path = path
        self.order = order
        self.offset = 0

    def fail(self, what: str) -> InputError:
        return InputError(f"{self.path}: cannot read GGUF file: {what} at byte {self.offset} of {self.size} "
                          "(truncated or corrupt?)")

    def left(self) -> int:
        return self.size - self.offset

    def need(self, nbytes: int, what: str) -> None:
        if nbytes < 0 or nbytes > self.left():
            raise self.fail(f"{what} needs {nbytes} bytes, only {self.left()} left")

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(self.order + fmt, self.buffer, self.offset)
        self.offset += size
        return value

    def count(self, what: str, item_bytes: int) -> int:
        """A u64 count of items of at least ``item_bytes`` bytes each, checked against the bytes left."""
        n = int(self.scalar("Q", what))
        if item_bytes and n > self.left() // item_bytes:
            raise self.fail(f"{what} {n} cannot fit in the {self.left()} bytes left")
        return n

    def raw(self, nbytes: int, what: str) -> bytes:
        self.need(nbytes, what)
        data = bytes(self.buffer[self.offset:self.offset + nbytes])
        self.offset += nbytes
        return data

    def string(self, what: str) -> bytes:
        return self.raw(self.count(f"{what} length", 1), what)

    def array(self, vtype: GGUFValueType, n: int, what: str) -> np.ndarray:
        itemsize = struct.calcsize(SCALAR_FORMATS[vtype])
        self.need(n * itemsize, what)
        dtype = np.dtype(GGUFReader.gguf_scalar_to_np[vtype]).newbyteorder(self.order)
        values = np.frombuffer(self.buffer, dtype=dtype, count=n, offset=self.offset).copy()
        self.offset += n * itemsize
        return values


def _value_type(cursor: _Cursor, what: str) -> GGUFValueType:
    raw = cursor.scalar("I", f"{what} type")
    try:
        return V(raw)
    except ValueError:
        raise cursor.fail(f"{what} has unknown value type {raw}") from None


def _read_value(cursor: _Cursor, vtype: GGUFValueType, what: str, depth: int = 0) -> tuple[Any, list[GGUFValueType]]:
    """The value of ``vtype`` at the cursor and its type list (as gguf-py's ``ReaderField.types``)."""
    if vtype == V.STRING:
        return cursor.string(what), [vtype]
    if vtype != V.ARRAY:
        return cursor.scalar(SCALAR_FORMATS[vtype], what), [vtype]
    if depth >= MAX_ARRAY_DEPTH:
        raise cursor.fail(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
    itype = _value_type(cursor, f"{what} element")
    n = cursor.count(f"{what} element count", _min_size(itype))
    if itype not in (V.STRING, V.ARRAY):
        return cursor.array(itype, n, what), [vtype, itype]
    items: list[Any] = []
    types = [vtype, itype]
    for i in range(n):
        item, item_types = _read_value(cursor, itype, f"{what}[{i}]", depth + 1)
        if i == 0:
            types = [vtype, *item_types]
        items.append(item)
    return items, types


class BoundedGGUFReader(GGUFReader):
    """A ``GGUFReader`` whose header, metadata and tensor infos are parsed with every count and
    length checked against the file size first (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:  # GGUFReader.__init__ is replaced, not called
        path = Path(path)
        try:
            self.data = np.memmap(path, mode="r")
        except ValueError as exc:  # an empty file cannot be mapped
            raise InputError(f"{path}: cannot read GGUF file: {exc} (truncated?)") from exc
        cursor = _Cursor(self.data, path, "<")
        if cursor.size < 4 or cursor.scalar("I", "magic") != GGUF_MAGIC:
            raise InputError(f"{path}: cannot read GGUF file: bad magic: not a GGUF file")
        version = cursor.scalar("I", "version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.byte_order, cursor.order = "S", ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in SUPPORTED_VERSIONS:
            raise InputError(f"{path}: GGUF version {version} is not supported; llmc reads GGUF v2 and v3")
        self.endianess = GGUFEndian.LITTLE if cursor.order == "<" else GGUFEndian.BIG
        self.fields: OrderedDict[str, ReaderField] = OrderedDict()
        self.tensors: list[ReaderTensor] = []
        self.alignment = GGUF_DEFAULT_ALIGNMENT
        tensor_count = cursor.count("tensor count", 8 + 4 + 4 + 8)
        kv_count = cursor.count("metadata key count", 8 + 4 + 1)
        self._add("GGUF.version", 4, version, [V.UINT32])
        self._add("GGUF.tensor_count", 8, tensor_count, [V.UINT64])
        self._add("GGUF.kv_count", 16, kv_count, [V.UINT64])
        for _ in range(kv_count):
            start = cursor.offset
            key = _utf8(cursor.string("metadata key"), cursor, "metadata key")
            vtype = _value_type(cursor, f"metadata key {key!r}")
            value, types = _read_value(cursor, vtype, f"metadata key {key!r}")
            if key in self.fields:
                raise InputError(f"{path}: metadata key {key!r} appears twice")
            self._add(key, start, value, types)
        infos = [self._tensor_info(cursor) for _ in range(tensor_count)]
        alignment = self.fields.get("general.alignment")
        if alignment is not None:
            value = alignment.contents()
            if alignment.types != [V.UINT32] or value == 0 or value & (value - 1):
                raise InputError(f"{path}: general.alignment must be a uint32 power of two, got {value!r}")
            self.alignment = int(value)
        self.data_offset = -(-cursor.offset // self.alignment) * self.alignment
        self._build(path, infos)

    def _add(self, key: str, offset: int, value: Any, types: list[GGUFValueType]) -> None:
        data: Any = range(len(value)) if types[0] == V.ARRAY else [0]
        self.fields[key] = MetadataField(offset, key, [value], data, types)

    def _tensor_info(self, cursor: _Cursor) -> tuple[str, list[int], int, int, int]:
        start = cursor.offset
        name = _utf8(cursor.string("tensor name"), cursor, "tensor name")
        n_dims = cursor.scalar("I", f"tensor {name!r} dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise InputError(f"{cursor.path}: tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
        dims = [int(cursor.scalar("Q", f"tensor {name!r} dimension")) for _ in range(n_dims)]
        raw_type = cursor.scalar("I", f"tensor {name!r} type")
        offset = int(cursor.scalar("Q", f"tensor {name!r} offset"))
        return name, dims, raw_type, offset, start

    def _build(self, path: Path, infos: list[tuple[str, list[int], int, int, int]]) -> None:
        known = {int(t) for t in GGMLQuantizationType}
        names: set[str] = set()
        size = len(self.data)
        for name, dims, raw_type, offset, start in infos:
            if name in names:
                raise InputError(f"{path}: tensor {name!r} appears twice")
            names.add(name)
            if raw_type not in known:
                raise UnsupportedError(f"{path}: tensor {name!r} has unknown ggml type {raw_type}; supported: "
                                       + ", ".join(t.name for t in DEQUANTIZED_TYPES))
            ggml_type = GGMLQuantizationType(raw_type)
            if any(d < 1 for d in dims):
                raise InputError(f"{path}: tensor {name!r} has a dimension of 0 in {dims}")
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            if dims[0] % block_size:
                raise InputError(f"{path}: tensor {name!r}: row size {dims[0]} is not a multiple of the "
                                 f"{ggml_type.name} block size {block_size}")
            n_elements = math.prod(dims)
            n_bytes = n_elements // block_size * type_size
            data_offset = self.data_offset + offset
            if offset % self.alignment:
                raise InputError(f"{path}: tensor {name!r} data offset {offset} is not a multiple of the "
                                 f"alignment {self.alignment}")
            if data_offset + n_bytes > size:
                raise InputError(f"{path}: tensor {name!r} ends past the end of the file (truncated?): "
                                 f"{n_bytes} bytes at {data_offset}, file size {size}")
            np_dims = tuple(reversed(dims))
            item_type = _ITEM_TYPES.get(ggml_type)
            if item_type is None:
                item_type, item_count = np.uint8, n_bytes
                np_dims = (*np_dims[:-1], np_dims[-1] // block_size * type_size)
            else:
                item_count = n_elements
            tensor_data = self._get(data_offset, item_type, item_count).reshape(np_dims)
            field = ReaderField(start, name, [], [], [])
            self.tensors.append(ReaderTensor(name=name, tensor_type=ggml_type, shape=np.asarray(dims, dtype=np.uint64),
                                             n_elements=n_elements, n_bytes=n_bytes, data_offset=data_offset,
                                             data=tensor_data, field=field))


def _utf8(raw: bytes, cursor: _Cursor, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise cursor.fail(f"{what} is not UTF-8 ({exc})") from None


def open_gguf(path: Path) -> GGUFReader:
    """Open a GGUF file with :class:`BoundedGGUFReader` (errors are :class:`InputError`)."""
    try:
        return BoundedGGUFReader(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read GGUF file: {exc}") from exc


_TYPE_NAMES = {V.STRING: "a string", V.ARRAY: "an array", V.BOOL: "a bool", V.FLOAT32: "a float32",
               V.FLOAT64: "a float64"}


class Metadata:
    """Typed access to a reader's key/value fields, with errors naming the file and key."""

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self.reader = reader
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise InputError(f"{self.path}: metadata key {key!r} cannot be read: {exc}") from exc

    def require(self, key: str) -> Any:
        if key not in self.reader.fields:
            raise InputError(f"{self.path}: missing required metadata key {key!r}")
        return self.get(key)

    def _typed(self, key: str, required: bool, allowed: frozenset[GGUFValueType], expected: str) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if required:
                raise InputError(f"{self.path}: missing required metadata key {key!r}")
            return None
        vtype = field.types[0] if field.types else None
        if vtype not in allowed:
            got = _TYPE_NAMES.get(vtype, f"a {vtype.name.lower()}" if vtype is not None else "nothing")
            raise InputError(f"{self.path}: metadata key {key!r} must be {expected}, got {got}")
        return self.get(key)

    def integer(self, key: str, default: int | None = None, *, required: bool = False, minimum: int | None = None,
                maximum: int | None = None) -> int | None:
        """An integer-typed key (``default`` when absent), within ``[minimum, maximum]``."""
        value = self._typed(key, required, INTEGER_TYPES, "an integer")
        if value is None:
            return default
        value = int(value)
        if minimum is not None and value < minimum:
            raise InputError(f"{self.path}: metadata key {key!r} must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise InputError(f"{self.path}: metadata key {key!r} must be at most {maximum}, got {value}")
        return value

    def number(self, key: str, default: float | None = None, *, required: bool = False,
               positive: bool = False) -> float | None:
        """A float- or integer-typed key, finite (and > 0 when ``positive``)."""
        value = self._typed(key, required, FLOAT_TYPES | INTEGER_TYPES, "a number")
        if value is None:
            return default
        value = float(value)
        if not math.isfinite(value) or (positive and value <= 0):
            raise InputError(f"{self.path}: metadata key {key!r} must be a {'positive ' if positive else ''}finite "
                             f"number, got {value}")
        return value

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self._typed(key, required, frozenset({V.STRING}), "a string")
        return default if value is None else str(value)

    def require_integer(self, key: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
        """:meth:`integer` for a key that must be present."""
        value = self.integer(key, required=True, minimum=minimum, maximum=maximum)
        assert value is not None  # required=True raises when absent
        return value

    def require_number(self, key: str, *, positive: bool = False) -> float:
        """:meth:`number` for a key that must be present."""
        value = self.number(key, required=True, positive=positive)
        assert value is not None
        return value

    def require_string(self, key: str) -> str:
        """:meth:`string` for a key that must be present."""
        value = self.string(key, required=True)
        assert value is not None
        return value

    def boolean(self, key: str, default: bool) -> bool:
        """A bool key (integers 0 and 1 are taken too, as llama.cpp does)."""
        value = self._typed(key, False, frozenset({V.BOOL}) | INTEGER_TYPES, "a bool")
        if value is None:
            return default
        if value not in (0, 1):
            raise InputError(f"{self.path}: metadata key {key!r} must be a bool, got {value}")
        return bool(value)

    def array(self, key: str, element: str, *, required: bool = False) -> list[Any] | None:
        """An array key whose elements are ``element`` (``string``, ``integer`` or ``number``)."""
        field = self.reader.fields.get(key)
        value = self._typed(key, required, frozenset({V.ARRAY}), f"an array of {element}s")
        if value is None or field is None:
            return None
        allowed = {"string": frozenset({V.STRING}), "integer": INTEGER_TYPES,
                   "number": FLOAT_TYPES | INTEGER_TYPES}[element]
        item_type = field.types[1] if len(field.types) > 1 else None
        if value and item_type not in allowed:
            got = item_type.name.lower() if item_type is not None else "unknown"
            raise InputError(f"{self.path}: metadata key {key!r} must be an array of {element}s, got an array of "
                             f"{got} values")
        return list(value)
