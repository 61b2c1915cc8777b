"""R lazy-load databases, read with the `rdata` package (PyPI).

R packages ship their data as lazy-load databases: `name.rdx` is a compressed serialized index
and `name.rdb` holds one compressed serialized object per variable. The `rdata` package parses
R's serialization format; what it lacks, and this module adds, is the database plumbing (the
index, the per-record compression) and the persistent references (PERSISTSXP, PACKAGESXP) by
which a database's objects point at environments stored elsewhere in it. That is how the
default `fiction` corpus gets Jane Austen and Moby Dick out of Debian's `r-cran-janeaustenr`
and `r-cran-tokenizers` without R.

Values map to Python as: character vector -> list[str | None]; integer/logical -> np.int32
array (NA as NA_INTEGER); double -> np.float64 array; list -> list; pairlist -> dict (tagged)
or list. A value with attributes becomes `RObject(value, attrs)`; `as_data_frame` turns an R
data.frame into a dict of columns. Closures, bytecode, builtins and pointers are read past and
returned as `RSpecial` placeholders, not interpreted. (`rdata.conversion` maps to pandas and
xarray instead and drops attributes such as the Rd help pages' `Rd_tag`, so the mapping is ours.)
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from rdata.parser import DEFAULT_ALTREP_MAP, CharFlags, RObjectType
from rdata.parser import RObject as ParsedObject
from rdata.parser._binary import ParserBinary
from rdata.parser._xdr import ParserXDR

from readme_jax.errors import UserError

NA_INTEGER = -(2**31)
_PERSISTSXP, _PACKAGESXP = 247, 248  # persistent-name references (R's serialize.c)


class RDataError(UserError, ValueError):
    """Raised when bytes are not a readable R serialization stream."""


@dataclasses.dataclass
class RObject:
    """An R value that carries attributes (names, class, dim, ...)."""

    value: Any
    attrs: dict[str, Any]
    rtype: int = 0


@dataclasses.dataclass(frozen=True)
class RSymbol:
    name: str


@dataclasses.dataclass
class REnvironment:
    frame: Any = None
    enclosure: Any = None


@dataclasses.dataclass
class RSpecial:
    """Something we do not interpret: builtins, bytecode, closures, pointers, environments."""

    kind: str
    value: Any = None


# ---------------------------------------------------------------- parsing (rdata)
class _PersistentRefs:
    """rdata's parser plus persistent-name references: a PERSISTSXP/PACKAGESXP item is a string
    vector naming an object stored outside the stream; it joins the reference table as R does."""

    file: Any

    def parse_R_object(self, reference_list=None, bytecode_rep_list=None, info_int=None):  # noqa: N802
        if info_int is None:
            pos = self.file.tell()
            t = self.parse_int() & 0xFF
            if t in (_PERSISTSXP, _PACKAGESXP):
                if reference_list is None:
                    reference_list = []
                return self._persistent(reference_list, t)
            self.file.seek(pos)
        return super().parse_R_object(reference_list, bytecode_rep_list, info_int=info_int)

    def _persistent(self, reference_list: list, t: int) -> ParsedObject:
        if self.parse_int() != 0:
            raise RDataError("bad persistent-name string vector")
        names = [self.parse_R_object(reference_list) for _ in range(self.parse_int())]
        kind = "persistent" if t == _PERSISTSXP else "package"
        out = ParsedObject(info=_Persistent(kind), value=names, attributes=None)
        reference_list.append(out)
        return out


@dataclasses.dataclass
class _Persistent:
    """The parsed info of a persistent reference (stands in for rdata's RObjectInfo)."""

    kind: str
    type: str = "persistent"
    attributes: bool = False


class _XDR(_PersistentRefs, ParserXDR):
    pass


class _Native(_PersistentRefs, ParserBinary):
    pass


def unserialize(data: bytes) -> Any:
    """Parses one serialized R object (the bytes after decompression). Raises RDataError for
    bytes that are not an XDR or native-binary R stream, or a truncated or corrupt one."""
    fmt = bytes(data[:2])
    parsers = {b"X\n": _XDR, b"B\n": _Native}
    if fmt not in parsers:
        raise RDataError(f"unsupported R serialization format {fmt!r} (want XDR 'X\\n')")
    parser = parsers[fmt](
        memoryview(data)[2:], expand_altrep=True, altrep_constructor_dict=DEFAULT_ALTREP_MAP
    )
    try:
        parsed = parser.parse_all()
    except RDataError:
        raise
    except (ValueError, IndexError, KeyError, AssertionError, NotImplementedError) as e:
        raise RDataError(f"truncated or corrupt R serialization stream ({e!r})") from e
    return _Converter().convert(parsed.object)


# ---------------------------------------------------------------- parsed tree -> Python
_PAIRLISTS = (RObjectType.LIST, RObjectType.DOT, RObjectType.ATTRLIST)
_LANGUAGE = (RObjectType.LANG, RObjectType.PROM, RObjectType.ATTRLANG)
_ENVS = (RObjectType.GLOBALENV, RObjectType.BASEENV, RObjectType.EMPTYENV)


class _Converter:
    """rdata's parsed tree -> the mapping in the module docstring. References resolve to the
    same Python object (environments are memoized before their frames, which may refer back)."""

    def __init__(self):
        self.memo: dict[int, Any] = {}

    def convert(self, obj: ParsedObject | None) -> Any:
        if obj is None:
            return None
        if obj.referenced_object is not None:  # REFSXP
            return self.convert(obj.referenced_object)
        if id(obj) in self.memo:
            return self.memo[id(obj)]
        t = obj.info.type
        if t in _PAIRLISTS or t in _LANGUAGE:
            return self._pairlist(obj)
        value = self._value(obj, t)
        if t in (RObjectType.SYM, RObjectType.NAMESPACE, "persistent"):
            self.memo[id(obj)] = value
        if obj.attributes is not None and t != RObjectType.ENV:
            return RObject(value, _attrs(self.convert(obj.attributes)), getattr(t, "value", 0))
        return value

    def _value(self, obj: ParsedObject, t: Any) -> Any:
        v = obj.value
        if t == "persistent":
            return RSpecial(obj.info.kind, [self.convert(x) for x in v])
        if t in (RObjectType.NIL, RObjectType.NILVALUE):
            return None
        if t == RObjectType.CHAR:
            return _char(obj)
        if t == RObjectType.SYM:
            return RSymbol(self.convert(v) or "")
        if t == RObjectType.STR:
            return [self.convert(x) for x in v]
        if t in (RObjectType.INT, RObjectType.LGL):
            data = np.asarray(np.ma.getdata(v)).astype(np.int32)
            return np.where(np.ma.getmaskarray(v), NA_INTEGER, data).astype(np.int32)
        if t in (RObjectType.REAL, RObjectType.CPLX):
            return np.asarray(v)
        if t == RObjectType.RAW:
            return bytes(np.asarray(v, np.uint8))
        if t in (RObjectType.VEC, RObjectType.EXPR):
            return [self.convert(x) for x in v]
        if t == RObjectType.ENV:
            env = self.memo[id(obj)] = REnvironment()
            env.enclosure = self.convert(v.enclosure)
            env.frame = self.convert(v.frame)
            if env.frame is None:
                env.frame = self.convert(v.hash_table)
            return env
        if t == RObjectType.NAMESPACE:
            return RSpecial("namespace", [self.convert(x) for x in v])
        if t in _ENVS:
            return RSpecial("environment", t.value)
        if t == RObjectType.MISSINGARG:
            return RSpecial("missing", t.value)
        if t in (RObjectType.SPECIAL, RObjectType.BUILTIN):
            return RSpecial("builtin", bytes(v or b"").decode("latin1"))
        kinds = {RObjectType.CLO: "closure", RObjectType.BCODE: "bytecode", RObjectType.S4: "s4"}
        return RSpecial(kinds.get(t, "pointer"))

    def _pairlist(self, obj: ParsedObject) -> Any:
        """A (possibly long) pairlist walked iteratively: dict if every node is tagged."""
        items: list[tuple[str | None, Any]] = []
        attrs = _attrs(self.convert(obj.attributes)) if obj.attributes is not None else None
        kind = obj.info.type
        node = obj
        while True:
            tag = self.convert(node.tag)
            car, cdr = node.value
            items.append((tag.name if isinstance(tag, RSymbol) else None, self.convert(car)))
            nt = cdr.info.type if cdr.referenced_object is None else None
            if nt not in _PAIRLISTS and nt not in _LANGUAGE:
                tail = self.convert(cdr)
                if tail is not None:
                    items.append((None, tail))
                break
            node = cdr
        if kind in _LANGUAGE:
            value: Any = RSpecial("language", items)
        elif all(k is not None for k, _ in items):
            value = dict(items)
        else:
            value = [v for _, v in items]
        return RObject(value, attrs) if attrs else value


def _char(obj: ParsedObject) -> str | None:
    if obj.value is None:
        return None
    raw = bytes(obj.value)
    if obj.info.gp & (CharFlags.LATIN1 | CharFlags.BYTES):
        return raw.decode("latin1")
    return raw.decode("utf-8", errors="replace")


def _attrs(pairlist: Any) -> dict[str, Any]:
    if isinstance(pairlist, dict):
        return pairlist
    return {}


# ---------------------------------------------------------------- files and databases
def read_rds(path: str | Path) -> Any:
    """Reads an `.rds` file (gzip, bzip2, xz or uncompressed serialization)."""
    return unserialize(_decompress_any(Path(path).read_bytes()))


def _decompress_any(raw: bytes) -> bytes:
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    if raw[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(raw)
    return raw


def _rdb_entry(blob: bytes, compressed: int) -> bytes:
    """Decodes one lazy-load record: 4-byte big-endian length, then the payload."""
    (n,) = struct.unpack(">I", blob[:4])
    if compressed in (2, 3):
        kind, body = blob[4:5], blob[5:]
        if kind == b"Z":
            out = lzma.decompress(body)
        elif kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"0":
            out = body
        else:
            out = zlib.decompress(body)
    else:
        out = zlib.decompress(blob[4:])
    if len(out) != n:
        raise RDataError(f"lazy-load record decompressed to {len(out)} bytes, expected {n}")
    return out


def read_lazyload_db(base: str | Path, names: list[str] | None = None) -> dict[str, Any]:
    """Reads variables from an R lazy-load database `base.rdb` + `base.rdx`.

    Args:
      base: path without extension, e.g. `.../janeaustenr/data/Rdata`.
      names: variables to read; all when None.
    """
    base = Path(base)
    rdx_path, rdb_path = base.with_suffix(".rdx"), base.with_suffix(".rdb")
    for p in (rdx_path, rdb_path):
        if not p.is_file():
            raise FileNotFoundError(f"R lazy-load database file missing: {p}")
    return read_lazyload_bytes(rdx_path.read_bytes(), rdb_path.read_bytes(), names)


def read_lazyload_bytes(rdx: bytes, rdb: bytes, names: list[str] | None = None) -> dict[str, Any]:
    """Like `read_lazyload_db`, from the contents of the .rdx and .rdb files."""
    index = unserialize(_decompress_any(rdx))
    index = _named_list(index) if isinstance(index, RObject) else index
    if not isinstance(index, dict) or "variables" not in index:
        raise RDataError("not a lazy-load index (no 'variables' entry)")
    table = _named_list(index["variables"])
    comp = index.get("compressed")
    comp = int(np.asarray(comp).ravel()[0]) if comp is not None else 1
    out = {}
    for name in list(table) if names is None else names:
        if name not in table:
            raise KeyError(f"{name!r} not in lazy-load database; available: {sorted(table)}")
        offset, length = (int(x) for x in np.asarray(table[name]).ravel()[:2])
        out[name] = unserialize(_rdb_entry(rdb[offset : offset + length], comp))
    return out


def _named_list(obj: Any) -> dict[str, Any]:
    """An R list with a `names` attribute -> dict."""
    if isinstance(obj, RObject) and "names" in obj.attrs:
        return dict(zip(obj.attrs["names"], obj.value, strict=True))
    if isinstance(obj, dict):
        return obj
    raise RDataError(f"expected a named R list, got {type(obj).__name__}")


def as_data_frame(obj: Any) -> dict[str, Any]:
    """An R data.frame (or tibble) -> {column name: column values}."""
    if not isinstance(obj, RObject) or "names" not in obj.attrs:
        raise RDataError("not an R data.frame: no names attribute")
    cols = {}
    for name, col in zip(obj.attrs["names"], obj.value, strict=True):
        if isinstance(col, RObject) and "levels" in col.attrs:  # factor -> labels
            levels = col.attrs["levels"]
            col = [None if c == NA_INTEGER else levels[c - 1] for c in np.asarray(col.value)]
        elif isinstance(col, RObject):
            col = col.value
        cols[name] = col
    return cols
