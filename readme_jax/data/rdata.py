"""A small reader for R's serialization format (XDR/binary) and lazy-load databases.

R packages ship their data as lazy-load databases: `name.rdx` is a gzip-compressed serialized
index and `name.rdb` holds one compressed serialized object per variable. This module reads
them without R, which is how the default `fiction` corpus gets Jane Austen and Moby Dick out
of Debian's `r-cran-janeaustenr` and `r-cran-tokenizers`.

Supported: NULL, symbols, pairlists/language objects, character/logical/integer/double/complex/
raw vectors, lists, environments, references, ALTREP compact sequences and wrappers, and
attributes. Closures and bytecode are read far enough to be skipped, not interpreted.

Values map to Python as: character vector -> list[str | None]; integer/logical -> np.int32
array; double -> np.float64 array; list -> list; pairlist -> dict (tagged) or list. A value
with attributes becomes `RObject(value, attrs)`; `as_data_frame` turns an R data.frame into
a dict of columns.
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

# SEXP types (R internals, serialize.c).
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP = 7, 8, 9, 10, 13, 14, 15
STRSXP, DOTSXP, VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP = 16, 17, 19, 20, 21, 22, 23
RAWSXP, S4SXP = 24, 25
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP = 255, 254, 253, 252, 251
BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP, PERSISTSXP = 250, 249, 248, 247
EMPTYENV_SXP, BASEENV_SXP, ATTRLANGSXP, ATTRLISTSXP, ALTREP_SXP = 242, 241, 240, 239, 238
_BC_REPS = {243, 244}  # BCREPREF, BCREPDEF: only inside bytecode constant pools
NA_INTEGER = -(2**31)


class RDataError(ValueError):
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
    """Something we do not interpret: builtins, bytecode, external pointers, global env."""

    kind: str
    value: Any = None


class _Reader:
    def __init__(self, data: bytes):
        self.buf = memoryview(data)
        self.pos = 0
        self.refs: list[Any] = []
        fmt = bytes(self.buf[:2])
        if fmt == b"X\n":
            self.endian = ">"
        elif fmt == b"B\n":
            self.endian = "<"
        else:
            raise RDataError(f"unsupported R serialization format {fmt!r} (want XDR 'X\\n')")
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # writer version, minimal reader version
        if version == 3:
            self.encoding = self.bytes(self.int()).decode("ascii")
        elif version == 2:
            self.encoding = "latin1"
        else:
            raise RDataError(f"unsupported R serialization version {version}")

    def bytes(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise RDataError("truncated R serialization stream")
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(self.endian + "i", self.bytes(4))[0]

    def array(self, dtype: str, n: int) -> np.ndarray:
        dt = np.dtype(dtype).newbyteorder(self.endian)
        return np.frombuffer(self.bytes(n * dt.itemsize), dtype=dt).astype(dtype)

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def charsxp(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None
        raw = self.bytes(n)
        if levels & 4:  # LATIN1_MASK
            return raw.decode("latin1")
        if levels & 2:  # BYTES_MASK
            return raw.decode("latin1")
        return raw.decode("utf-8", errors="replace")

    def item(self) -> Any:
        flags = self.int()
        t = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        simple = self._special(t, flags)
        if simple is not _NOT_SPECIAL:
            return simple
        if t in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP):
            return self._pairlist(t, has_attr, has_tag)
        if t == CHARSXP:
            return self.charsxp(levels)
        value = self._vector(t, levels)
        if has_attr:
            return RObject(value, _attrs(self.item()), t)
        return value

    def _special(self, t: int, flags: int) -> Any:
        if t == NILVALUE_SXP or t == NILSXP:
            return None
        if t == REFSXP:
            idx = flags >> 8
            return self.refs[(idx if idx else self.int()) - 1]
        if t in (GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP, BASENAMESPACE_SXP):
            return RSpecial("environment", t)
        if t in (UNBOUNDVALUE_SXP, MISSINGARG_SXP):
            return RSpecial("missing", t)
        if t in (NAMESPACESXP, PACKAGESXP, PERSISTSXP):
            if self.int() != 0:
                raise RDataError("bad persistent-name string vector")
            names = [self.item() for _ in range(self.int())]
            out = RSpecial("namespace" if t == NAMESPACESXP else "persistent", names)
            self.refs.append(out)
            return out
        if t == SYMSXP:
            sym = RSymbol(self.item() or "")
            self.refs.append(sym)
            return sym
        if t == ENVSXP:
            env = REnvironment()
            self.refs.append(env)
            self.int()  # locked
            env.enclosure = self.item()
            env.frame = self.item()
            hashtab = self.item()
            self.item()  # attributes
            if env.frame is None and hashtab is not None:
                env.frame = hashtab
            return env
        if t == ALTREP_SXP:
            return self._altrep()
        return _NOT_SPECIAL

    def _pairlist(self, t: int, has_attr: bool, has_tag: bool) -> Any:
        items: list[tuple[str | None, Any]] = []
        attrs = None
        while True:
            if has_attr:
                a = _attrs(self.item())
                attrs = attrs or a
            tag = self.item() if has_tag else None
            items.append((tag.name if isinstance(tag, RSymbol) else None, self.item()))
            # The cdr is read iteratively so that long pairlists do not recurse deeply.
            flags = self.int()
            nt = flags & 0xFF
            if nt not in (LISTSXP, LANGSXP, DOTSXP, ATTRLISTSXP, ATTRLANGSXP) or t == CLOSXP:
                self.pos -= 4
                tail = self.item()
                if tail is not None:
                    items.append((None, tail))
                break
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if t in (LANGSXP, ATTRLANGSXP, CLOSXP, PROMSXP):
            value: Any = RSpecial("language", items)
        elif all(k is not None for k, _ in items):
            value = dict(items)
        else:
            value = [v for _, v in items]
        return RObject(value, attrs) if attrs else value

    def _vector(self, t: int, levels: int) -> Any:
        if t == STRSXP:
            out = []
            for _ in range(self.length()):
                flags = self.int()
                out.append(self.charsxp(flags >> 12))
            return out
        if t in (LGLSXP, INTSXP):
            return self.array("i4", self.length())
        if t == REALSXP:
            return self.array("f8", self.length())
        if t == CPLXSXP:
            v = self.array("f8", 2 * self.length())
            return v[0::2] + 1j * v[1::2]
        if t == RAWSXP:
            return self.bytes(self.length())
        if t in (VECSXP, EXPRSXP):
            return [self.item() for _ in range(self.length())]
        if t == S4SXP:
            return RSpecial("s4")
        if t in (SPECIALSXP, BUILTINSXP):
            return RSpecial("builtin", self.bytes(self.int()).decode("latin1"))
        if t in (EXTPTRSXP, WEAKREFSXP):
            out = RSpecial("pointer")
            self.refs.append(out)
            if t == EXTPTRSXP:
                self.item(), self.item()  # protected value, tag
            return out
        if t == BCODESXP:
            return self._bytecode()
        raise RDataError(f"unsupported R SEXP type {t} at byte {self.pos}")

    def _altrep(self) -> Any:
        info = self.item()
        state = self.item()
        attr = self.item()
        cls = info[0].name if isinstance(info, list) and isinstance(info[0], RSymbol) else ""
        if cls == "compact_intseq":
            n, start, step = (int(x) for x in state)
            value: Any = np.arange(start, start + n * step, step, dtype=np.int32)
        elif cls == "compact_realseq":
            n, start, step = state
            value = start + step * np.arange(int(n), dtype=np.float64)
        elif cls.startswith("wrap_"):
            value = state[0] if isinstance(state, list) else state
        elif cls == "deferred_string":
            arg = state[0] if isinstance(state, list) else state
            arg = arg.value if isinstance(arg, RObject) else arg
            value = [None if x == NA_INTEGER else str(x) for x in np.asarray(arg).tolist()]
        else:
            raise RDataError(f"unsupported ALTREP class {cls!r}")
        if attr is not None:
            return RObject(value, _attrs(attr))
        return value

    def _bytecode(self) -> RSpecial:
        reps = [None] * self.int()
        self._bc(reps)
        return RSpecial("bytecode")

    def _bc(self, reps: list) -> None:
        self.item()  # code (integer vector)
        for _ in range(self.int()):  # constant pool
            t = self.int()
            if t == BCODESXP:
                self._bc(reps)
            elif t in (LANGSXP, LISTSXP, ATTRLANGSXP, ATTRLISTSXP) or t in _BC_REPS:
                self._bclang(t, reps)
            else:
                self.item()

    def _bclang(self, t: int, reps: list) -> None:
        # Mirrors ReadBCLang in R's serialize.c; a non-language slot is a 0 pad then an item.
        if t == 243:  # BCREPREF
            self.int()
            return
        if t in (244, LANGSXP, LISTSXP, ATTRLANGSXP, ATTRLISTSXP):
            if t == 244:  # BCREPDEF: position, then the real type
                self.int()
                t = self.int()
            if t in (ATTRLANGSXP, ATTRLISTSXP):
                self.item()
            self.item()  # tag
            self._bclang(self.int(), reps)  # car
            self._bclang(self.int(), reps)  # cdr
            return
        self.item()


_NOT_SPECIAL = object()


def _attrs(pairlist: Any) -> dict[str, Any]:
    if isinstance(pairlist, dict):
        return pairlist
    return {}


def unserialize(data: bytes) -> Any:
    """Parses one serialized R object (the bytes after decompression)."""
    return _Reader(data).item()


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
