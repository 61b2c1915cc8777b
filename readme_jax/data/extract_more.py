"""The four domains added for eight experts: scripture, man pages, Perl and PostgreSQL docs.

Each comes from one pinned Debian package (`sources.json`) and is split by document:
- scripture: the King James Bible (`bible-kjv-text`), one document per chapter. The package
  stores the text as 64 KiB windows, each compressed with LZW (the Unix `compress` format
  without its 3-byte magic) behind an `EC02` header of window offsets; decoded with `unlzw3`.
- man_pages: the Linux man-pages project's pages in `manpages` (sections 1, 4, 5, 7, 8 ...)
  and `manpages-dev` (system calls and C library, sections 2 and 3), roff source converted to
  plain text, one document per page.
- perl_docs: Perl's core documentation (`perl-doc`, POD sources), one document per
  `=head1` section of each page (pages are up to 0.8 MB; sections give the splits enough
  documents). The table of contents and the Unicode property tables are left out.
- sql_docs: the PostgreSQL 15 manual (`postgresql-doc-15`, DocBook HTML), one document per
  page, navigation and tables of contents removed.

Dimension letters: none (text only).
"""

from __future__ import annotations

import gzip
import re
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import unlzw3

import readme_jax.data.fetch as fetch
from readme_jax.data.extract import Document, clean_text, html_to_text
from readme_jax.errors import UserError

EXTRACTOR_VERSION = 2  # bump to invalidate these four prepared domains (2: perl dedup)


class ExtractError(UserError, ValueError):
    """A package file is not in the format its extractor reads."""


# ---------------------------------------------------------------- scripture
_EC02_MAGIC = b"EC02"
_LZW_MAGIC = b"\x1f\x9d\x90"  # compress(1) header: block mode, 16-bit codes
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def decode_ec02(data: bytes) -> str:
    """The text of a Bible Retrieval System `EC02` file (e.g. /usr/lib/bible.data).

    Layout (big-endian, read from bible-kjv-text 4.38): magic "EC02" + a NUL-padded title up to
    byte 0x54; uint32 window size; uint32 window count n; n + 1 uint32 file offsets; window i is
    the LZW code stream at [offset_i, offset_{i+1}), decoding to `window size` bytes (the last
    may be shorter).

    Raises:
      ExtractError: wrong magic, truncated header, or offsets outside the file.
    """
    if not data.startswith(_EC02_MAGIC) or len(data) < 0x5C:
        raise ExtractError("not an EC02 compressed data file (magic 'EC02' missing)")
    _, n = struct.unpack(">II", data[0x54:0x5C])
    table_end = 0x5C + 4 * (n + 1)
    if len(data) < table_end:
        raise ExtractError(f"EC02 header announces {n} windows but the file is truncated")
    offs = struct.unpack(f">{n + 1}I", data[0x5C:table_end])
    if offs[0] < table_end or offs[-1] > len(data) or list(offs) != sorted(offs):
        raise ExtractError(f"EC02 window offsets {offs[0]}..{offs[-1]} do not fit the file")
    parts = [unlzw3.unlzw(_LZW_MAGIC + data[a:b]) for a, b in zip(offs[:-1], offs[1:], strict=True)]
    return b"".join(parts).decode("latin-1")


def kjv_chapters(text: str) -> list[Document]:
    """One document per chapter from "Ge1:1 In the beginning ..." lines (one verse each).

    Lines that are not verses (the title line, a verse cut at the start of an excerpt) are
    skipped. Document ids: "kjv/<book number>-<abbreviation>/<chapter>"; the text is the
    chapter's verses, one per line, without references.
    """
    chapters: dict[tuple[str, int], list[str]] = {}
    books: dict[str, int] = {}
    for line in text.splitlines():
        m = _VERSE.match(line)
        if not m:
            continue
        book, chapter = m.group(1), int(m.group(2))
        books.setdefault(book, len(books))
        chapters.setdefault((book, chapter), []).append(m.group(4).strip())
    return [
        Document(f"kjv/{books[b]:02d}-{b}/{c:03d}", clean_text("\n".join(verses)))
        for (b, c), verses in chapters.items()
    ]


def extract_scripture(cache: Path | None) -> tuple[list[Document], list[str]]:
    deb = fetch.fetch("bible-kjv-text", cache, context="domain 'scripture'")
    files = dict(fetch.iter_deb_files(deb, lambda p: p == "usr/lib/bible.data"))
    if not files:
        raise ExtractError("bible-kjv-text has no usr/lib/bible.data")
    return kjv_chapters(decode_ec02(files["usr/lib/bible.data"])), ["bible-kjv-text"]


# ---------------------------------------------------------------- man pages
_ROFF_CHARS = {
    "em": "\u2014",
    "en": "\u2013",
    "hy": "-",
    "aq": "'",
    "dq": '"',
    "lq": "\u201c",
    "rq": "\u201d",
    "oq": "\u2018",
    "cq": "\u2019",
    "bu": "\u2022",
    "co": "\u00a9",
    "rg": "\u00ae",
    "mu": "\u00d7",
    "ti": "~",
    "ha": "^",
    "ga": "`",
    "at": "@",
    "sh": "#",
    "rs": "\\",
    "sl": "/",
    "lB": "[",
    "rB": "]",
    "lC": "{",
    "rC": "}",
    "ra": "\u2192",
    "la": "\u2190",
    "ua": "\u2191",
    "da": "\u2193",
    "de": "\u00b0",
    "+-": "\u00b1",
    "R": "\u00ae",
    "Tm": "\u2122",
    "mc": "\u00b5",
    "<=": "\u2264",
    ">=": "\u2265",
    "!=": "\u2260",
}
_ROFF_ESCAPE = re.compile(
    r"\\(?:f(?:\[[^\]]*\]|\(..|.)"  # font changes
    r"|s[+-]?\d+"  # size changes
    r"|\*(?:\[[^\]]*\]|\(..|.)"  # strings
    r"|\((..)|\[([^\]]*)\]"  # special characters \(xx and \[name]
    r"|[&|^:%c]|[ ~0]|-)"
)
_ROFF_ALT = {"BR", "BI", "IB", "IR", "RB", "RI"}  # alternating fonts: arguments run together
_ROFF_BREAK = {"PP", "P", "LP", "sp", "TP", "HP", "IP", "SH", "SS", "TQ"}
_ROFF_SKIP_BLOCK = {"de": "..", "ig": "..", "TS": ".TE"}


def _roff_escapes(text: str) -> str:
    text = text.replace("\\\\", "\x00").replace("\\e", "\x00")
    text = re.sub(r'\\".*$', "", text)  # comment to end of line

    def sub(m: re.Match) -> str:
        s = m.group(0)
        name = m.group(1) or m.group(2)
        if name is not None:
            return _ROFF_CHARS.get(name, "")
        if s.startswith("\\*"):
            key = s[2:].strip("[]").removeprefix("(")
            return _ROFF_CHARS.get(key, "")
        return {"\\-": "-", "\\ ": " ", "\\~": " ", "\\0": " "}.get(s, "")

    return _ROFF_ESCAPE.sub(sub, text).replace("\x00", "\\")


def _roff_args(rest: str) -> list[str]:
    """Macro arguments: whitespace-separated, double quotes group ("" inside is a quote)."""
    return [u or q.replace('""', '"') for q, u in re.findall(r'"((?:[^"]|"")*)"|(\S+)', rest)]


def _roff_table(lines: list[str]) -> list[str]:
    """Rows of a tbl(1) table: the lines after the format section (ending in '.')."""
    i = next((k + 1 for k, line in enumerate(lines) if line.rstrip().endswith(".")), 0)
    return [
        "  ".join(cell.strip() for cell in line.replace("T{", "").replace("T}", "").split("\t"))
        for line in lines[i:]
        if not line.startswith(".")
    ]


def _roff_render(out: list[tuple[str, bool]]) -> str:
    """Lines tagged (text, filled) -> text: filled lines join into one line per paragraph,
    no-fill lines (.nf, .EX) keep their breaks, "" is a paragraph break."""
    paras, cur, cur_fill = [], [], True
    for text, fill in out + [("", True)]:
        if text == "" or fill != cur_fill:
            if cur:
                paras.append((" " if cur_fill else "\n").join(cur))
            cur, cur_fill = [], fill
            if text == "":
                paras.append("")
                continue
        cur.append(text.strip() if fill else text)
    return clean_text("\n".join(p if p else "\n" for p in paras))


def roff_to_text(source: str) -> str:
    """Plain text of a man page's roff source (man(7) macros, tbl tables).

    Headings (.SH, .SS) and paragraphs become blank-line separated blocks, filled text joins
    into one line per paragraph and .nf/.EX blocks keep their lines; font macros keep their
    words (.BR runs alternate-font arguments together); requests that only format (.in, .ft,
    ...) and conditionals are dropped; a .so redirect gives empty text.
    """
    lines, out, i, fill = source.split("\n"), [], 0, True
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith(('.\\"', "'\\\"")) or line.strip() in (".", "'"):
            continue
        if not line.startswith((".", "'")):
            out.append((_roff_escapes(line), fill))
            continue
        m = re.match(r"[.']\s*(\S+)\s*(.*)$", line)
        name, rest = (m.group(1), m.group(2)) if m else ("", "")
        if name in _ROFF_SKIP_BLOCK:
            end = _ROFF_SKIP_BLOCK[name]
            j = next((k for k in range(i, len(lines)) if lines[k].startswith(end)), len(lines))
            if name == "TS":
                out += [(_roff_escapes(r), False) for r in _roff_table(lines[i:j])]
            i = j + 1
            continue
        args = [_roff_escapes(a) for a in _roff_args(rest)]
        if name == "so":
            return ""
        if name in ("nf", "EX", "fi", "EE"):
            fill = name in ("fi", "EE")
        if name in _ROFF_BREAK:
            out.append(("", True))
        if name == "TH" and args:
            out += [(f"{args[0]}({args[1]})" if len(args) > 1 else args[0], True), ("", True)]
        elif name in ("SH", "SS"):
            out += [(" ".join(args), True), ("", True)]
        elif name in ("B", "I", "SM", "SB", "UR", "MT", "UE", "ME", "OP"):
            out.append((" ".join(args), fill))
        elif name in _ROFF_ALT:
            out.append(("".join(args), fill))
        elif name == "IP" and args:
            out += [(args[0], True), ("", True)]
    return _roff_render(out)


def extract_man_pages(cache: Path | None) -> tuple[list[Document], list[str]]:
    page = re.compile(r"usr/share/man/(man\d)/([^/]+)\.gz$")
    docs = []
    for key in SOURCES["man_pages"]:  # symbolic links (aliases of a page) are not files: skipped
        deb = fetch.fetch(key, cache, context="domain 'man_pages'")
        for path, data in fetch.iter_deb_files(deb, lambda p: bool(page.match(p))):
            section, name = page.match(path).groups()
            text = roff_to_text(gzip.decompress(data).decode("utf-8", errors="replace"))
            docs.append(Document(f"man/{section}/{name}", text))
    return docs, list(SOURCES["man_pages"])


# ---------------------------------------------------------------- perl docs
_POD_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}
_POD_DOUBLE = re.compile(r"([A-Z])<{2,}\s+(.*?)\s+>{2,}", re.DOTALL)
_POD_SINGLE = re.compile(r"([A-Z])<([^<>]*)>")
_POD_SKIPPED_PAGES = {"perltoc", "perluniprops"}  # a table of contents; property tables


def _pod_code(code: str, body: str) -> str:
    if code == "E":
        if body.isdigit() or body.lower().startswith("0x"):
            return chr(int(body, 0))
        return _POD_ENTITIES.get(body, "")
    if code in ("X", "Z"):
        return ""
    if code == "L":
        text, bar, target = body.partition("|")
        if bar:
            return text
        page, _, section = body.partition("/")
        section = section.strip('"')
        return f'"{section}" in {page}' if page and section else (section or page)
    return body  # B I C F S: the words, without the font


def pod_inline(text: str) -> str:
    """Resolves POD formatting codes (B<>, C<< >>, L<>, E<>, nested) to plain text."""
    text = _POD_DOUBLE.sub(lambda m: _pod_code(m.group(1), m.group(2)), text)
    # innermost first; "<" and ">" produced by E<lt>/E<gt> are shielded until the end
    while True:
        new = _POD_SINGLE.sub(
            lambda m: _pod_code(m.group(1), m.group(2)).replace("<", "\x01").replace(">", "\x02"),
            text,
        )
        if new == text:
            break
        text = new
    return text.replace("\x01", "<").replace("\x02", ">")


def pod_sections(name: str, source: str) -> list[Document]:
    """A POD page as plain text, one document per `=head1` section ("perl/<page>/<nn>").

    Verbatim paragraphs (indented) are kept as they are; =begin/=end and =for blocks (other
    formats) and =pod/=cut/=encoding/=over/=back are dropped; =item becomes "- item".
    """
    sections: list[list[str]] = [[]]
    skipping = None
    for para in re.split(r"\n\s*\n", source.replace("\r\n", "\n")):
        stripped = para.strip("\n")
        if not stripped.strip():
            continue
        if skipping is not None:
            if re.match(rf"=end\s+{re.escape(skipping)}\b", stripped):
                skipping = None
            continue
        m = re.match(r"=(\w+)\s*(.*)", stripped, re.DOTALL)
        if m and not stripped[0].isspace():
            cmd, rest = m.group(1), " ".join(m.group(2).split())
            if cmd == "begin":
                skipping = rest.split()[0] if rest else ""
            elif cmd == "head1":
                sections.append([pod_inline(rest)])
            elif cmd.startswith("head"):
                sections[-1].append(pod_inline(rest))
            elif cmd == "item":
                sections[-1].append("- " + pod_inline(rest) if rest not in ("*", "") else "-")
            continue
        if stripped[0].isspace():  # verbatim
            sections[-1].append(stripped)
        else:
            sections[-1].append(pod_inline(" ".join(stripped.split())))
    blocks = [clean_text("\n\n".join(s)) for s in sections if s]
    return [Document(f"perl/{name}/{i:02d}", b) for i, b in enumerate(blocks) if b]


def perl_documents(pages: Iterable[tuple[str, str]]) -> list[Document]:
    """Sections of POD pages (name, source), without the skipped pages and without repeats:
    the perl*delta pages repeat boilerplate sections verbatim, which would leak across splits."""
    docs, seen = [], set()
    for name, source in pages:
        if name in _POD_SKIPPED_PAGES:
            continue
        for d in pod_sections(name, source):
            if d.text not in seen:
                seen.add(d.text)
                docs.append(d)
    return docs


def extract_perl_docs(cache: Path | None) -> tuple[list[Document], list[str]]:
    deb = fetch.fetch("perl-doc", cache, context="domain 'perl_docs'")
    page = re.compile(r"usr/share/perl/[\d.]+/pod/(\w+)\.pod$")
    files = fetch.iter_deb_files(deb, lambda p: bool(page.match(p)))
    pages = ((page.match(p).group(1), data.decode("utf-8", errors="replace")) for p, data in files)
    return perl_documents(pages), ["perl-doc"]


# ---------------------------------------------------------------- sql docs
_PG_SKIP_CLASSES = frozenset({"navheader", "navfooter", "toc", "index"})
_PG_SKIPPED_PAGES = {"bookindex", "index"}  # the book's index and its title page


def extract_sql_docs(cache: Path | None) -> tuple[list[Document], list[str]]:
    deb = fetch.fetch("postgresql-doc-15", cache, context="domain 'sql_docs'")
    page = re.compile(r"usr/share/doc/postgresql-doc-15/html/([\w.-]+)\.html$")
    docs = []
    for path, data in fetch.iter_deb_files(deb, lambda p: bool(page.match(p))):
        name = page.match(path).group(1)
        if name in _PG_SKIPPED_PAGES:
            continue
        text = html_to_text(data.decode("utf-8"), skip_classes=_PG_SKIP_CLASSES)
        docs.append(Document(f"pg/{name}", text))
    return docs, ["postgresql-doc-15"]


EXTRACTORS: dict[str, Callable[[Path | None], tuple[list[Document], list[str]]]] = {
    "scripture": extract_scripture,
    "man_pages": extract_man_pages,
    "perl_docs": extract_perl_docs,
    "sql_docs": extract_sql_docs,
}
DESCRIPTIONS = {
    "scripture": "The King James Bible (bible-kjv-text), one document per chapter",
    "man_pages": "Linux man-pages (manpages and manpages-dev: sections 1 to 8), roff converted to "
    "text, one document per page",
    "perl_docs": "Perl 5.36 core documentation (perl-doc, POD), one document per =head1 section",
    "sql_docs": "The PostgreSQL 15 manual (postgresql-doc-15, HTML), one document per page",
}
SOURCES = {
    "scripture": ["bible-kjv-text"],
    "man_pages": ["manpages", "manpages-dev"],
    "perl_docs": ["perl-doc"],
    "sql_docs": ["postgresql-doc-15"],
}
